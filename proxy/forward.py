"""Per-request work: route, check, forward to HTTP, translate the answer.

The rules are docs/CONTRACT.md §3 (resources), §10 (translation) and §11 (internal headers).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from policies import forwarding, media, status, translation
from policies.batch import BatchItem
from policies.discovery import Discovery
from policies.routes import Policy, PolicyError, Route, RouteMatch
from policies.topics import TopicError, topic_from_options
from proxy.batching import GroupCommit
from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import uint_bytes
from proxy.coap.observe import ObserveRoute
from proxy.coap.requests import Request, Response
from proxy.errors import ProxyError
from proxy.request_log import DEFAULT_INTERVAL, FailureLog, device_of
from proxy.upstream import NO_HEADERS, Upstream, UpstreamResponse

log = logging.getLogger(__name__)

WELL_KNOWN_CORE = "/.well-known/core"
LINK_FORMAT = 40
_SAFE = frozenset({codes.GET, codes.FETCH})  # RFC 7252 §5.1, RFC 8132 §2


# Answers that tell the device when to come back: the origin's Retry-After becomes Max-Age
# (RFC 8075 §7.1.2 for 5.03; 4.29 per RFC 8516 §3 carries Max-Age the same way).
_RETRY_LATER = frozenset({codes.SERVICE_UNAVAILABLE, codes.TOO_MANY_REQUESTS})
# Success codes a client may cache, and so the ones Max-Age speaks about (RFC 7252 §5.9.1:
# 2.01, 2.02 and 2.04 are not cacheable); every error code is cacheable (§5.9.2, §5.9.3).
_CACHEABLE_SUCCESS = frozenset({codes.VALID, codes.CONTENT})
# The route policy's answers where no route serves the request (policies/routes.py), and the
# method names it is asked with.
_ROUTE_ERRORS = {"4.04": codes.NOT_FOUND, "4.05": codes.METHOD_NOT_ALLOWED}
_METHOD_NAME_OF = codes.METHOD_NAME_OF


class StatusTable:
    """The translation rules (policies/status.py, in RFC notation) compiled into CoAP code
    numbers for the hot path, once at start-up: one list index per answer.

    Built from :data:`policies.status.HTTP_TO_COAP` by default; a profile may pass its own
    rows, and a route policy its ``overrides`` (a route's ``status`` rows), which win over
    every row of ``table``.
    """

    __slots__ = ("_cells", "overrides")

    def __init__(
        self, table: status.Rows = status.HTTP_TO_COAP, overrides: status.Rows | None = None
    ) -> None:
        self.overrides: status.Rows = dict(overrides or {})
        self._cells = [
            _number(
                status.lookup_with(self.overrides, table, http_status, codes.METHOD_NAME_OF[method])
            )
            for http_status in range(1000)
            for method in range(8)
        ]

    def code_for(self, http_status: int, method: int) -> int:
        if 0 <= http_status < 1000 and 0 <= method < 8:
            return self._cells[http_status * 8 + method]
        return _UNMAPPED


@functools.cache  # a table names a handful of codes in 8000 cells
def _number(text: str) -> int:
    number = codes.parse_code_text(text)
    if number is None:
        raise ValueError(f"{text!r} is not a CoAP response code like 2.05")
    return number


_UNMAPPED = _number(status.UNMAPPED)


DEFAULT_TABLE = StatusTable()
# Compiled tables shared between routes with the same rows (each is 8000 cells).
_TABLES: dict[tuple[tuple[tuple[int | str, str], str], ...], StatusTable] = {}


def table_for(route: Route) -> StatusTable:
    """The route's table: its own ``status`` rows over the default ones."""
    if not route.status:
        return DEFAULT_TABLE
    table = _TABLES.get(route.status)
    if table is None:
        table = _TABLES[route.status] = StatusTable(status.HTTP_TO_COAP, dict(route.status))
    return table


def coap_code_for(http_status: int, method: int) -> int:
    """The CoAP response code for an HTTP status answering a request with CoAP ``method``."""
    return DEFAULT_TABLE.code_for(http_status, method)


def _error(
    code: int, http_status: int, retry_after: str | None, headers: Mapping[str, str]
) -> Response:
    """An error answer: no payload (docs/CONTRACT.md §3), Max-Age from Retry-After on
    5.03/4.29, else from the origin's freshness information (policies/translation.py: 0 when
    it must not be reused, absent when HTTP would let a cache keep it)."""
    max_age = translation.max_age_from_retry_after(retry_after) if code in _RETRY_LATER else None
    if max_age is None:
        max_age = translation.max_age(http_status, headers, time.time())
    return Response(code, [(opt.MAX_AGE, uint_bytes(max_age))] if max_age is not None else [])


def translate(
    upstream: UpstreamResponse, method: int, table: StatusTable = DEFAULT_TABLE
) -> Response:
    """An HTTP answer as a CoAP response (docs/ARCHITECTURE.md, "Translation"): the code by
    ``table``; ETag, Content-Format and Max-Age from the origin's headers. Errors carry no
    payload (docs/CONTRACT.md §3). Location and preconditions are the forwarder's."""
    code = table.code_for(upstream.status, method)
    headers = upstream.headers
    if code >= codes.BAD_REQUEST:
        return _error(code, upstream.status, upstream.retry_after, headers)
    options: list[tuple[int, bytes]] = []
    if headers:
        etag = headers.get("etag")
        if etag is not None:
            value = translation.coap_etag(etag)
            if value is not None:
                options.append((opt.ETAG, value))
    if upstream.body and upstream.content_type:
        content_format = media.content_format_for(upstream.content_type)
        if content_format is not None:
            options.append((opt.CONTENT_FORMAT, uint_bytes(content_format)))
    if code in _CACHEABLE_SUCCESS and (
        headers or upstream.status not in translation.HEURISTICALLY_CACHEABLE
    ):
        max_age = translation.max_age(upstream.status, headers, time.time())
        if max_age is not None:
            options.append((opt.MAX_AGE, uint_bytes(max_age)))
    return Response(code, options, upstream.body)


def translate_status(
    http_status: int, retry_after: str | None, method: int, table: StatusTable
) -> Response:
    """A batch item's answer: a status alone (policies/batch.py carries no headers)."""
    code = table.code_for(http_status, method)
    if code >= codes.BAD_REQUEST:
        return _error(code, http_status, retry_after, NO_HEADERS)
    return Response(code)


class _Conditions:
    """The request's preconditions and validators (RFC 7252 §5.10.6, §5.10.8), read from its
    options. ``interpret`` has already refused a malformed If-Match / If-None-Match (both
    critical); an ETag of a wrong length is elective and skipped here (§5.4.3)."""

    __slots__ = ("etags", "if_match", "if_none_match")

    def __init__(self, options: list[tuple[int, bytes]]) -> None:
        self.if_match: list[bytes] = []
        self.etags: list[bytes] = []
        self.if_none_match = False
        for number, value in options:
            if number > opt.IF_NONE_MATCH:
                break  # options are sorted: the three come first
            if number == opt.IF_MATCH:
                self.if_match.append(value)
            elif number == opt.ETAG and 1 <= len(value) <= translation.ETAG_MAX:
                self.etags.append(value)
            elif number == opt.IF_NONE_MATCH:
                self.if_none_match = True


def _named(values: list[bytes]) -> list[str] | None:
    """The HTTP entity-tags for these CoAP values; None if any cannot be named (hashed)."""
    tags = []
    for value in values:
        tag = translation.http_etag(value)
        if tag is None:
            return None
        tags.append(tag)
    return tags


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
        plain_only: bool = False,
        failure_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        """``plain_only``: serve only the routes marked ``plain`` and answer 4.01 to everything
        else, discovery included (docs/CONTRACT.md §6): production mode gives it to the
        plain-CoAP handler. ``upstream_timeout``: the
        upstream client's timeout, told to internal origins (forwarding.TIMEOUT_HEADER) so they
        answer before it runs out. ``failure_interval``: at most one "upstream call failed" line
        per cause per that many seconds (proxy/request_log.py, FailureLog)."""
        self._policy = policy
        self._failures = FailureLog("upstream call failed", log, interval=failure_interval)
        self._upstream = upstream
        self._base_url = base_url.rstrip("/")
        self._proto = proto
        self._max_payload = max_payload
        self._discovery = Discovery(policy.routes.values())
        self._all_links = Response(
            codes.CONTENT, [(opt.CONTENT_FORMAT, uint_bytes(LINK_FORMAT))], self._discovery.payload
        )
        self._templates = any(route.variables for route in policy.routes.values())
        # Each route's status rows compiled into code numbers once (policies/status.py).
        self._tables = {path: table_for(route) for path, route in policy.routes.items()}
        self._max_batch = max_batch
        self._batch_concurrency = batch_concurrency
        self._batchers: dict[str, GroupCommit] = {}
        self._plain_only = plain_only
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
            if route.observe and not self._is_internal(route.target):
                # The change feed is the upstream's (docs/ARCHITECTURE.md, "Observe").
                raise PolicyError(
                    f"route {route.path!r}: an observable route must target the upstream or a "
                    "trusted origin; add its origin to 'trusted_origins'"
                )
        self._observe_routes: dict[str, ObserveRoute] = {}

    def needs_claim(self, request: Request) -> bool:
        """Only what is forwarded, and is not a safe request on an idempotent route, needs the
        cross-replica claim: what this handler answers itself (discovery, 4.01 in production
        mode, 4.04, 4.05) is the same on every replica, and a GET the policy calls idempotent
        may run twice (docs/ARCHITECTURE.md)."""
        matched = self._match(request)
        if isinstance(matched, Response):
            return False
        route = matched.route
        assert route is not None  # _match answered every match without a route
        return not (route.idempotent and request.method in _SAFE)

    def answer_now(self, request: Request) -> Response | None:
        """What this handler answers itself, without a call: the production-mode 4.01,
        discovery, no route 4.04, wrong method 4.05, a bad topic 4.00, a payload over the
        limit 4.13 with Size1. None: the request is forwarded by :meth:`handle`."""
        answer = self._check(request)
        return answer if isinstance(answer, Response) else None

    async def handle(self, request: Request) -> Response:
        checked = self._check(request)
        if isinstance(checked, Response):
            return checked
        route = checked.route
        assert route is not None  # _check answered every match without a route
        return await self._forward(request, route, checked.params)

    def _match(self, request: Request) -> Response | RouteMatch:
        """The route, or this handler's own answer where there is none to forward to: 4.01 in
        production mode, discovery, 4.04, 4.05."""
        if request.path == WELL_KNOWN_CORE:
            return Response(codes.UNAUTHORIZED) if self._plain_only else self._discover(request)
        segments = self._segments(request)
        match = self._policy.match(request.path, _METHOD_NAME_OF[request.method], segments)
        if match.route is None:
            if self._plain_only and not self._plain_route_at(request.path, segments):
                # Production mode tells an unauthenticated peer nothing about what DTLS serves.
                return Response(codes.UNAUTHORIZED)
            return Response(_ROUTE_ERRORS[match.error])
        if self._plain_only and not match.route.plain:
            return Response(codes.UNAUTHORIZED)
        return match

    def _plain_route_at(self, path: str, segments: list[str] | None) -> bool:
        """A ``plain`` route serves ``path`` (with another method: the 4.05 stays a 4.05)."""
        route = self._policy.route_at(path, segments)
        return route is not None and route.plain

    def _check(self, request: Request) -> Response | RouteMatch:
        """:meth:`_match`, then the checks before forwarding: the topic rules, the payload
        limit."""
        match = self._match(request)
        if isinstance(match, Response):
            return match
        route = match.route
        assert route is not None
        if route.topic_query:
            try:
                _topic(request)
            except TopicError:
                return Response(codes.BAD_REQUEST)
        payload = request.message.payload
        if len(payload) > self._max_payload:
            return Response(
                codes.REQUEST_ENTITY_TOO_LARGE, [(opt.SIZE1, uint_bytes(self._max_payload))]
            )
        return match

    def observe_route(self, request: Request) -> ObserveRoute | None:
        """What Observe needs of the route ``request`` reaches (RFC 7641), None when the route
        is not observable or the request is not a GET to it: the origin path the change feed
        names (the target expanded), the notification type, whether deliveries are
        acknowledged (policies/routes.py)."""
        if request.method != codes.GET:
            return None
        match = self._match(request)
        if isinstance(match, Response) or match.route is None or not match.route.observe:
            return None
        route = match.route
        target = route.target if match.params is None else route.target_for(match.params)
        path = urlsplit(self._url(target)).path
        found = self._observe_routes.get(path)
        if found is None:
            found = ObserveRoute(path, route.observe_con or route.observe_ack, route.observe_ack)
            if len(self._observe_routes) < 100_000:
                self._observe_routes[path] = found
        return found

    @property
    def observe_events_url(self) -> str:
        """The change feed on the upstream (policy ``observe_events``)."""
        return self._base_url + self._policy.observe_events

    @property
    def internal_headers(self) -> dict[str, str]:
        return dict(self._internal_headers)

    async def acknowledge(self, request: Request, etag: bytes) -> int:
        """Tell the origin the device confirmed the representation tagged ``etag`` (an
        observe_ack route, obs contract §4): ``DELETE`` on the route's target with
        ``If-Match`` and the device's headers, as its GETs carry them. Returns the HTTP status
        (2xx: done; 412: not the head any more); raises ProxyError when the origin could not be
        reached. A tag the proxy hashed cannot be named: the current tag is read first and
        sent when it is the one the device confirmed (as for a device's If-Match)."""
        match = self._match(request)
        if isinstance(match, Response) or match.route is None:
            return 404
        route = match.route
        target = route.target if match.params is None else route.target_for(match.params)
        url = self._url(target)
        ip, port = request.peer
        headers = {forwarding.FORWARDED_HEADER: forwarding.format_forwarded(ip, port, self._proto)}
        if self._is_internal(route.target):
            if request.identity is not None:
                headers[forwarding.IDENTITY_HEADER] = request.identity
            headers.update(self._internal_headers)
        conditions = _Conditions([(opt.IF_MATCH, etag)])
        refused = await self._preconditions(conditions, request, "DELETE", url, headers)
        if refused is not None:
            return 412
        answer = await self._upstream.request("DELETE", url, headers, b"")
        return answer.status

    def _segments(self, request: Request) -> list[str] | None:
        """The Uri-Path values, for template matching only (a value may hold a "/")."""
        if not self._templates:
            return None
        return [v.decode() for n, v in request.message.options if n == opt.URI_PATH]

    def _discover(self, request: Request) -> Response:
        """RFC 6690 resource discovery, served by the proxy itself, with query filtering
        (§4.1). The block-wise layer slices an answer larger than one block."""
        if request.method != codes.GET:
            return Response(codes.METHOD_NOT_ALLOWED)
        if not request.queries:
            return self._all_links  # built once: nothing downstream changes a Response
        return Response(
            codes.CONTENT,
            [(opt.CONTENT_FORMAT, uint_bytes(LINK_FORMAT))],
            self._discovery.filtered(request.queries),
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

    async def _forward(
        self, request: Request, route: Route, params: dict[str, str] | None
    ) -> Response:
        message = request.message
        ip, port = request.peer
        content_type: str | None = None
        if request.content_format is not None:
            content_type = media.content_type_for(request.content_format)
            if content_type is None:
                return Response(codes.UNSUPPORTED_CONTENT_FORMAT)
        accept: str | None = None
        if request.accept is not None:
            accept = media.content_type_for(request.accept)
            if accept is None:
                return Response(codes.NOT_ACCEPTABLE)
        key = forwarding.idempotency_key(ip, port, message.mid, message.token, request.identity)
        options = message.options
        # If-Match (1), ETag (4), If-None-Match (5) sort first: one look at the first option.
        conditions = (
            _Conditions(options) if options and options[0][0] <= opt.IF_NONE_MATCH else None
        )
        try:
            if route.batch_target is not None and accept is None and conditions is None:
                # The item carries the facts, not their HTTP spelling (policies/batch.py): the
                # topic checked here (on a topic_query route _check asked the same question),
                # the address in the backend's canonical form.
                try:
                    topic = _topic(request) or ""
                except TopicError:
                    return Response(codes.BAD_REQUEST)
                item = BatchItem(
                    ip if ":" not in ip else (forwarding.canonical_ip(ip) or ip),
                    port,
                    self._proto,
                    request.identity or "",
                    key,
                    topic,
                    request.content_format,
                    message.payload,
                )
                # Template routes have no batch_target (policies/routes.py).
                http_status, retry_after = await self._batcher(route.batch_target).call(item)
                return translate_status(
                    http_status, retry_after, request.method, self._tables[route.path]
                )
            queries = request.queries
            if route.topic_query:
                # A topic given as Location-Query travels as the query ``t``, as if the device
                # had sent it as Uri-Query (_check has refused both at once), so the origin
                # needs no second rule.
                try:
                    located = _topic(request)
                except TopicError:
                    return Response(codes.BAD_REQUEST)
                if located is not None and f"t={located}" not in queries:
                    queries = [*queries, f"t={located}"]
            query = "&".join(_encode_query(q) for q in queries)
            forwarded = forwarding.format_forwarded(ip, port, self._proto)
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
            target = route.target if params is None else route.target_for(params)
            url = self._url(target) + ("?" + query if query else "")
            method = route.http_method_for(_METHOD_NAME_OF[request.method])
            if conditions is not None:
                refused = await self._preconditions(conditions, request, method, url, headers)
                if refused is not None:
                    return refused
            byte_range = request.byte_range if method == "GET" else None
            if byte_range is not None:
                headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            answer = await self._upstream.request(method, url, headers, message.payload)
            size = None
            if byte_range is not None:
                ranged = await self._ranged(answer, byte_range, method, url, headers)
                if isinstance(ranged, Response):
                    return ranged
                answer, size = ranged
        except ProxyError as exc:
            # A down upstream fails every message: one line per cause per interval.
            self._failures.failed(type(exc).__name__, device_of(request), str(exc))
            return Response(exc.coap_code)
        response = translate(answer, request.method, self._tables[route.path])
        response.size = size
        if request.method in _SAFE and (conditions is not None or answer.status == 304):
            return _validated(
                response, answer, conditions.etags if conditions else [], device_of(request)
            )
        if response.code == codes.CREATED and "location" in answer.headers:
            _add_location(response, answer.headers["location"], url, target, request.path)
        return response

    async def _preconditions(
        self,
        conditions: _Conditions,
        request: Request,
        method: str,
        url: str,
        headers: dict[str, str],
    ) -> Response | None:
        """Put the request's conditions into HTTP terms (RFC 7252 §5.10.6.2, §5.10.8;
        RFC 9110 §13.1.1, §13.1.2); a Response when the answer is already known (4.12).

        An If-Match value that is one of the origin's own short strong tags is sent as is.
        One the proxy hashed (policies.translation.coap_etag) cannot be named to the origin:
        the proxy asks the origin for the current tag (a GET of the same URL) and sends
        ``If-Match`` with that tag when it is one the device named, so the origin still decides
        atomically; otherwise the precondition has failed: 4.12 without forwarding."""
        if conditions.if_none_match:
            headers["If-None-Match"] = "*"  # §5.10.8.2: only if there is none yet
        elif conditions.etags and request.method in _SAFE:
            # §5.10.6.2: a GET with ETags asks to validate them. The ones the origin can match
            # go along; hashed ones are compared with the answer's (see _validated).
            known = [tag for tag in map(translation.http_etag, conditions.etags) if tag]
            if known:
                headers["If-None-Match"] = ", ".join(known)
        if not conditions.if_match:
            return None
        if b"" in conditions.if_match:
            headers["If-Match"] = "*"  # §5.10.8.1: an empty value matches any representation
            return None
        tags = _named(conditions.if_match)
        if tags is not None:
            headers["If-Match"] = ", ".join(tags)
            return None
        # The probe is a plain GET: no body, no conditions, and not the request's
        # Idempotency-Key (the origin would take the real request for a repeat of the probe).
        probe = {
            k: v
            for k, v in headers.items()
            if not k.startswith(("If-", "Content-")) and k != forwarding.IDEMPOTENCY_HEADER
        }
        current = await self._upstream.request("GET", url, probe, b"")
        tag = current.headers.get("etag") if 200 <= current.status < 300 else None
        if tag is None or translation.coap_etag(tag) not in conditions.if_match:
            return Response(codes.PRECONDITION_FAILED)
        headers["If-Match"] = tag.strip()
        return None

    async def _ranged(
        self,
        answer: UpstreamResponse,
        byte_range: tuple[int, int],
        method: str,
        url: str,
        headers: dict[str, str],
    ) -> tuple[UpstreamResponse, int | None] | Response:
        """The answer to a ``Range`` request, per the block-wise contract (docs/ARCHITECTURE.md):
        206 → the slice and the representation's size; 416 → 4.02 with the size if the origin
        said it; anything else (200: no range support) → the whole body, size None. A 206
        that is not the asked-for slice of a known length is fetched again whole."""
        if answer.status == 416:
            total = translation.content_range(answer.headers.get("content-range"))[2]
            return Response(codes.BAD_OPTION, size=total)
        if answer.status != 206:
            return answer, None
        first, _last, total = translation.content_range(answer.headers.get("content-range"))
        if first == byte_range[0] and total is not None:
            return answer, total
        del headers["Range"]
        return await self._upstream.request(method, url, headers, b""), None

    async def drain(self) -> None:
        for batcher in self._batchers.values():
            await batcher.drain()
        self._failures.flush()  # the failures held back since the last line


def _validated(
    response: Response, answer: UpstreamResponse, etags: list[bytes], device: str = "-"
) -> Response:
    """A safe request that named ETags gets 2.03 Valid with the matching ETag and no payload
    when the origin said 304, or sent a representation whose (hashed) tag is one the device
    named (RFC 7252 §5.10.6.2, §5.9.1.3). A 304 the proxy cannot pin to one of the device's
    ETags is 5.02: 2.03 without an ETag means nothing to a CoAP client."""
    if response.code >= codes.BAD_REQUEST:
        return response
    etag = next((v for n, v in response.options if n == opt.ETAG), None)
    if answer.status == 304:
        if etag is None and len(etags) == 1:
            etag = etags[0]
        if etag is None or etag not in etags:
            log.warning(
                "origin answered 304 without one of the request's ETags: 5.02 to device %s",
                device,
                extra={"device": device},
            )
            return Response(codes.BAD_GATEWAY)
    elif etag is None or etag not in etags:
        return response
    kept = [(opt.ETAG, etag)] + [(n, v) for n, v in response.options if n == opt.MAX_AGE]
    return Response(codes.VALID, kept)


def _add_location(response: Response, location: str, url: str, target: str, path: str) -> None:
    """2.01's Location-Path / Location-Query from the origin's Location (RFC 7252 §5.10.7,
    policies.translation.location_parts); a Location on another origin is left out."""
    parts = translation.location_parts(location, url, urlsplit(target).path or "/", path)
    if parts is None:
        log.debug("Location %r cannot be said in CoAP: left out", location)
        return
    segments, queries = parts
    extra = [(opt.LOCATION_PATH, s.encode()) for s in segments]
    extra += [(opt.LOCATION_QUERY, q.encode()) for q in queries]
    response.options = sorted(response.options + extra, key=lambda option: option[0])


# RFC 7252 §5.10: a Location-Query value is 0–255 bytes; an occurrence outside that range is
# treated like an unrecognized elective option (§5.4.3): ignored.
_LOCATION_QUERY_MAX = 255


def _topic(request: Request) -> str | None:
    """The request's topic ``t`` (policies/topics.py), from its Uri-Query or its Location-Query
    values (docs/CONTRACT.md §3). Location-Query is a response option in RFC 7252 (§5.10.7),
    so the option interpreter does not read it in a request; it is read here, and only where a
    topic is asked for. Raises TopicError for a bad topic, a ``t`` in both, or a Location-Query
    that is not UTF-8 (4.00, as for a Uri-Query)."""
    located: list[str] = []
    # Options are sorted by number: walking back from the end, the first one below 20 ends
    # the search; a typical telemetry request (Uri-Query 15 last) costs one comparison.
    for number, value in reversed(request.message.options):
        if number < opt.LOCATION_QUERY:
            break
        if number == opt.LOCATION_QUERY and len(value) <= _LOCATION_QUERY_MAX:
            try:
                located.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise TopicError("Location-Query is not UTF-8") from None
    if located:
        located.reverse()
    return topic_from_options(request.queries, located)


def _encode_query(query: str) -> str:
    name, sep, value = query.partition("=")
    return quote(name, safe="") + sep + quote(value, safe="/")
