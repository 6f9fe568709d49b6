"""Per-request work: route, check, forward to HTTP, translate the answer (SPEC §3, §9, §10)."""

from __future__ import annotations

import logging
from urllib.parse import quote

from policies import forwarding, media, status
from policies.batch import BatchItem
from policies.routes import Policy, Route
from policies.topics import TopicError, topic_from_queries
from proxy.batching import GroupCommit
from proxy.coap import options as opt
from proxy.coap.codec import uint_bytes
from proxy.coap.messaging import Request, Response
from proxy.errors import ProxyError
from proxy.upstream import Upstream, UpstreamResponse

log = logging.getLogger(__name__)

WELL_KNOWN_CORE = "/.well-known/core"
# SPEC §5, production mode (require_dtls): on plain CoAP a device may only fetch its PSK.
PLAIN_PATHS_IN_PRODUCTION = frozenset({"/bootstrap"})
LINK_FORMAT = 40


def _max_age_from_retry_after(value: str | None) -> int | None:
    """Retry-After in delta-seconds → Max-Age (an HTTP-date is not worth parsing here)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(int(value.strip()), 0xFFFFFFFF)


def translate(upstream: UpstreamResponse, method: int) -> Response:
    """An HTTP answer as a CoAP response. Errors carry no payload (SPEC §3, seed 004)."""
    code = status.coap_code_for(upstream.status, method)
    if code >= status.BAD_REQUEST:
        max_age = (
            _max_age_from_retry_after(upstream.retry_after)
            if code == status.SERVICE_UNAVAILABLE
            else None
        )
        options = [(opt.MAX_AGE, uint_bytes(max_age))] if max_age is not None else []
        return Response(code, options)
    options = []
    if upstream.body and upstream.content_type:
        content_format = media.content_format_for(upstream.content_type)
        if content_format is not None:
            options.append((opt.CONTENT_FORMAT, uint_bytes(content_format)))
    return Response(code, options, upstream.body)


class ProxyHandler:
    """Routes each request by the policy and forwards it through one :class:`Upstream`."""

    def __init__(
        self,
        *,
        policy: Policy,
        upstream: Upstream,
        base_url: str,
        proxy_token: str | None,
        proto: str = "coap",
        max_payload: int = 65536,
        max_batch: int = 256,
        batch_concurrency: int = 1,
        plain_paths: frozenset[str] | None = None,
    ) -> None:
        """``plain_paths``: when set, the only paths served (others → 4.01); production mode
        gives the plain-CoAP handler ``PLAIN_PATHS_IN_PRODUCTION``."""
        self._policy = policy
        self._upstream = upstream
        self._base_url = base_url.rstrip("/")
        self._proxy_token = proxy_token
        self._proto = proto
        self._max_payload = max_payload
        self._well_known = ",".join(f"<{path}>" for path in policy.routes).encode()
        self._max_batch = max_batch
        self._batch_concurrency = batch_concurrency
        self._batchers: dict[str, GroupCommit] = {}
        self._plain_paths = plain_paths

    async def handle(self, request: Request) -> Response:
        if self._plain_paths is not None and request.path not in self._plain_paths:
            return Response(status.UNAUTHORIZED)
        if request.path == WELL_KNOWN_CORE:
            return self._discovery(request)
        match = self._policy.match(request.path, request.method)
        route = match.route
        if route is None:
            return Response(match.error)
        if route.topic_query:
            try:
                topic_from_queries(request.queries)
            except TopicError:
                return Response(status.BAD_REQUEST)
        payload = request.message.payload
        if len(payload) > self._max_payload:
            return Response(
                status.REQUEST_ENTITY_TOO_LARGE, [(opt.SIZE1, uint_bytes(self._max_payload))]
            )
        return await self._forward(request, route)

    def _discovery(self, request: Request) -> Response:
        """RFC 6690 resource discovery, served by the proxy itself."""
        if request.method != status.GET:
            return Response(status.METHOD_NOT_ALLOWED)
        return Response(
            status.CONTENT, [(opt.CONTENT_FORMAT, uint_bytes(LINK_FORMAT))], self._well_known
        )

    def _url(self, target: str) -> str:
        return target if target.startswith("http") else self._base_url + target

    def _batcher(self, target: str) -> GroupCommit:
        batcher = self._batchers.get(target)
        if batcher is None:
            headers = {}
            if self._proxy_token is not None:
                headers[forwarding.TOKEN_HEADER] = self._proxy_token
            batcher = GroupCommit(
                self._upstream,
                self._url(target),
                headers,
                max_batch=self._max_batch,
                max_concurrency=self._batch_concurrency,
            )
            self._batchers[target] = batcher
        return batcher

    async def _forward(self, request: Request, route: Route) -> Response:
        message = request.message
        ip, port = request.peer
        content_type: str | None = None
        if request.content_format is not None:
            content_type = media.content_type_for(request.content_format)
            if content_type is None:
                return Response(status.UNSUPPORTED_CONTENT_FORMAT)
        accept: str | None = None
        if request.accept is not None:
            accept = media.content_type_for(request.accept)
            if accept is None:
                return Response(status.NOT_ACCEPTABLE)
        query = "&".join(_encode_query(q) for q in request.queries)
        forwarded = forwarding.format_forwarded(ip, port, self._proto)
        key = forwarding.idempotency_key(ip, port, message.mid, message.token, request.identity)
        try:
            if route.batch_target is not None and accept is None:
                item = BatchItem(
                    forwarded,
                    request.identity or "",
                    key,
                    query,
                    content_type or "",
                    message.payload,
                )
                http_status, retry_after = await self._batcher(route.batch_target).call(item)
                return translate(
                    UpstreamResponse(http_status, None, retry_after, b""), request.method
                )
            headers = {forwarding.FORWARDED_HEADER: forwarded, forwarding.IDEMPOTENCY_HEADER: key}
            if request.identity is not None:
                headers[forwarding.IDENTITY_HEADER] = request.identity
            if self._proxy_token is not None:
                headers[forwarding.TOKEN_HEADER] = self._proxy_token
            if content_type is not None:
                headers["Content-Type"] = content_type
            if accept is not None:
                headers["Accept"] = accept
            url = self._url(route.target) + ("?" + query if query else "")
            answer = await self._upstream.request(
                route.http_method_for(request.method), url, headers, message.payload
            )
        except ProxyError as exc:
            log.warning("upstream call failed: %s", exc)
            return Response(exc.coap_code)
        return translate(answer, request.method)

    async def drain(self) -> None:
        for batcher in self._batchers.values():
            await batcher.drain()


def _encode_query(query: str) -> str:
    name, sep, value = query.partition("=")
    return quote(name, safe="") + sep + quote(value, safe="/")
