"""Per-request work: route, check, forward to HTTP, translate the answer (SPEC §3, §9, §10)."""

from __future__ import annotations

import logging
from urllib.parse import quote

from policies import forwarding, media, status
from policies.batch import BatchItem
from policies.routes import Policy, PolicyError, Route
from policies.topics import TopicError, topic_from_queries
from proxy.batching import GroupCommit
from proxy.coap import options as opt
from proxy.coap.codec import uint_bytes
from proxy.coap.requests import Request, Response
from proxy.errors import ProxyError
from proxy.upstream import Upstream, UpstreamResponse

log = logging.getLogger(__name__)

WELL_KNOWN_CORE = "/.well-known/core"
# SPEC §5, production mode (require_dtls): on plain CoAP a device may only fetch its PSK.
PLAIN_PATHS_IN_PRODUCTION = frozenset({"/bootstrap"})
LINK_FORMAT = 40
_SAFE = frozenset({status.GET, status.FETCH})  # RFC 7252 §5.1, RFC 8132 §2


def _max_age_from_retry_after(value: str | None) -> int | None:
    """Retry-After in delta-seconds → Max-Age (an HTTP-date is not worth parsing here)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(int(value.strip()), 0xFFFFFFFF)


# Answers that tell the device when to come back: the origin's Retry-After becomes Max-Age
# (RFC 8075 §7.1.2 for 5.03; 4.29 per RFC 8516 §3 carries Max-Age the same way).
_RETRY_LATER = frozenset({status.SERVICE_UNAVAILABLE, status.TOO_MANY_REQUESTS})


def translate(upstream: UpstreamResponse, method: int) -> Response:
    """An HTTP answer as a CoAP response. Errors carry no payload (SPEC §3, docs/API.md)."""
    code = status.coap_code_for(upstream.status, method)
    if code >= status.BAD_REQUEST:
        max_age = _max_age_from_retry_after(upstream.retry_after) if code in _RETRY_LATER else None
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
        upstream_timeout: float | None = None,
        proto: str = "coap",
        max_payload: int = 65536,
        max_batch: int = 256,
        batch_concurrency: int = 1,
        plain_paths: frozenset[str] | None = None,
    ) -> None:
        """``plain_paths``: when set, the only paths served (others → 4.01); production mode
        gives the plain-CoAP handler ``PLAIN_PATHS_IN_PRODUCTION``. ``upstream_timeout``: the
        upstream client's timeout, told to internal origins (forwarding.TIMEOUT_HEADER) so they
        answer before it runs out."""
        self._policy = policy
        self._upstream = upstream
        self._base_url = base_url.rstrip("/")
        self._proto = proto
        self._max_payload = max_payload
        self._well_known = ",".join(f"<{path}>" for path in policy.routes).encode()
        self._max_batch = max_batch
        self._batch_concurrency = batch_concurrency
        self._batchers: dict[str, GroupCommit] = {}
        self._plain_paths = plain_paths
        # Sent to internal origins only, with every call (policies/forwarding.py).
        self._internal_headers: dict[str, str] = {}
        if proxy_token is not None:
            self._internal_headers[forwarding.TOKEN_HEADER] = proxy_token
        if upstream_timeout is not None:
            self._internal_headers[forwarding.TIMEOUT_HEADER] = f"{upstream_timeout:g}"
        # Who may see the internal headers (token, PSK identity, Idempotency-Key): the
        # configured upstream and the origins the policy trusts. Decided once per target.
        upstream_origin = forwarding.http_origin(self._base_url)
        self._insiders = policy.trusted_origins | ({upstream_origin} if upstream_origin else set())
        self._internal: dict[str, bool] = {}
        for route in policy.routes.values():
            if route.batch_target is not None and not self._is_internal(route.batch_target):
                # A batch carries every device's identity and the exchange keys: that contract
                # is between the proxy and a backend it trusts.
                raise PolicyError(
                    f"route {route.path!r}: batch_target {route.batch_target!r} is not the "
                    "upstream nor a trusted origin; add its origin to 'trusted_origins'"
                )

    def needs_claim(self, request: Request) -> bool:
        """Only what is forwarded, and is not a safe request on an idempotent route, needs the
        cross-replica claim: what this handler answers itself (discovery, 4.01 in production
        mode, 4.04, 4.05) is the same on every replica, and a GET the policy calls idempotent
        may run twice (docs/ARCHITECTURE.md)."""
        path = request.path
        if path == WELL_KNOWN_CORE:
            return False
        if self._plain_paths is not None and path not in self._plain_paths:
            return False
        route = self._policy.match(path, request.method).route
        if route is None:
            return False
        return not (route.idempotent and request.method in _SAFE)

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

    def _is_internal(self, target: str) -> bool:
        internal = self._internal.get(target)
        if internal is None:
            internal = forwarding.http_origin(self._url(target)) in self._insiders
            self._internal[target] = internal
        return internal

    def _batcher(self, target: str) -> GroupCommit:
        batcher = self._batchers.get(target)
        if batcher is None:
            batcher = GroupCommit(
                self._upstream,
                self._url(target),
                self._internal_headers,
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
            headers = {forwarding.FORWARDED_HEADER: forwarded}
            if self._is_internal(route.target):
                headers[forwarding.IDEMPOTENCY_HEADER] = key
                if request.identity is not None:
                    headers[forwarding.IDENTITY_HEADER] = request.identity
                headers.update(self._internal_headers)
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
