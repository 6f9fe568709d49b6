"""A small HTTP/1.1 client for the proxy's upstream calls: keep-alive pool, one write per request.

The product's one :class:`~proxy.upstream.Upstream`: it does only what the proxy asks of HTTP, a
request with a body, answered with a status, a body and the few headers the translation reads
(Content-Type, Retry-After and policies.translation.KEPT_HEADERS; every other header is dropped
as it is parsed). Why a client of our own rather than a general library: docs/ARCHITECTURE.md,
"Own wire clients on the hot path"; httpx stays in the tests as its oracle.

What it does: one :class:`asyncio.Protocol` per TCP connection, or TLS for an ``https`` origin
(the certificate and the host name checked against the system's trust store, as
:func:`ssl.create_default_context` sets up; ``SSL_CERT_FILE`` names another bundle, and
``--upstream-ca`` a bundle of the origin's own CAs, :func:`upstream_tls`); the request
(head and body) goes out in one write; the answer is parsed by ``httptools`` (llhttp:
Content-Length, chunked, and bodies delimited by the server closing). Connections are kept
alive and reused, most recently used first, at most ``max_connections`` per origin; a request
on a reused connection that closes before any byte of the answer is sent once more on a fresh
one. The usual cause is a server closing an idle connection (uvicorn after 5 s) just as it is
reused; a server that had read the request and died can tell the repeat by its
Idempotency-Key, which every forwarded request carries. Every failure becomes the project's own
error: refused, reset, malformed or a certificate that does not verify →
:class:`UpstreamUnreachable` (5.02); no answer within ``timeout`` (connecting included) →
:class:`UpstreamTimeout` (5.04).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from functools import lru_cache
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from policies.translation import KEPT_HEADERS
from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.upstream import NO_HEADERS, UpstreamResponse

_FORBIDDEN_IN_HEADERS = frozenset("\r\n\0")
# RFC 9110 §8.6: no Content-Length on a request without content whose method expects none.
_NO_CONTENT_EXPECTED = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
_KEPT = frozenset(name.encode() for name in KEPT_HEADERS) - {b"date"}


class _Target(NamedTuple):
    origin: tuple[str, str, int]  # scheme, host, port: one pool each
    head: bytes  # request line target and Host header: b"/path?q HTTP/1.1\r\nHost: h\r\n"


@lru_cache(maxsize=512)
def _target(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamUnreachable(f"not an http(s) URL: {url!r}")
    default = 443 if scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError as exc:
        raise UpstreamUnreachable(f"bad port in {url!r}") from exc
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port != default:
        netloc += f":{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(c in _FORBIDDEN_IN_HEADERS or c in " \t" for c in path):
        raise UpstreamUnreachable(f"URL not sendable as a request target: {url!r}")
    return _Target((scheme, host, port), f"{path} HTTP/1.1\r\nHost: {netloc}\r\n".encode())


def _encode_head(method: str, target: _Target, headers: dict[str, str], length: int) -> bytes:
    lines = [method.encode("ascii"), b" ", target.head]
    for name, value in headers.items():
        if _FORBIDDEN_IN_HEADERS.intersection(name) or _FORBIDDEN_IN_HEADERS.intersection(value):
            # Header injection (RFC 9112 §2.2: CR/LF end a field line): refused, never sent.
            raise UpstreamUnreachable(f"header {name!r} holds CR, LF or NUL: not sent")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if length or method not in _NO_CONTENT_EXPECTED:
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


class _Dropped(Exception):
    """The connection ended before the answer was complete; ``answered``: bytes had arrived."""

    def __init__(self, answered: bool, cause: BaseException | None) -> None:
        super().__init__(f"connection closed{' mid-answer' if answered else ''}: {cause!r}")
        self.answered = answered


class _Connection(asyncio.Protocol):
    """One connection, one request at a time; the parser's callbacks fill in the answer."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._answered = False
        self._reset_answer()

    def _reset_answer(self) -> None:
        self._status = 0
        self._content_type: str | None = None
        self._retry_after: str | None = None
        self._headers: dict[str, str] | None = None  # the KEPT_HEADERS present, if any
        # Date only matters beside Expires (policies.translation.max_age); nearly every server
        # sends it, so it is held aside and kept only with another of the headers.
        self._date: bytes | None = None
        self._delimited = False  # Content-Length or chunked: the end is not the close
        self._headers_done = False
        self._body: list[bytes] = []
        self._size = 0
        self.reusable = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and not self._delimited:
            self._complete()  # the body ran until the server closed (RFC 9112 §6.3 rule 8)
        else:
            waiter.set_exception(_Dropped(self._answered, exc))

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self._answered = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnreachable(f"malformed HTTP answer: {exc}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key == b"content-type":
            self._content_type = value.decode("latin-1").strip(" \t")  # RFC 9110 §5.5
        elif key == b"retry-after":
            self._retry_after = value.decode("latin-1").strip(" \t")
        elif key in (b"content-length", b"transfer-encoding"):
            self._delimited = True
        elif key == b"date":
            self._date = value
        elif key in _KEPT:
            self._keep(key.decode("latin-1"), value.decode("latin-1").strip(" \t"))

    def _keep(self, name: str, value: str) -> None:
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
        previous = headers.get(name)
        headers[name] = value if previous is None else f"{previous}, {value}"

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            self._fail(UpstreamUnreachable(f"answer larger than {self._max_body} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            self._reset_answer()  # an interim answer (RFC 9110 §15.2): the real one follows
            return
        self._complete()

    # the request

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        # An answer that ended by itself (its length known, chunked, or none by its status)
        # leaves the connection usable; one delimited by the close has closed it.
        parser = self._parser
        self.reusable = parser is not None and parser.should_keep_alive() and not self.closed
        headers = self._headers
        if headers is not None and self._date is not None:
            headers["date"] = self._date.decode("latin-1").strip(" \t")
        waiter.set_result(
            UpstreamResponse(
                status=self._status,
                content_type=self._content_type,
                retry_after=self._retry_after,
                body=b"".join(self._body),
                headers=headers or NO_HEADERS,
            )
        )

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    async def exchange(self, data: bytes, deadline: float) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        self._reset_answer()
        self._answered = False
        self._parser = httptools.HttpResponseParser(self)
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(deadline, self._fail, UpstreamTimeout("no answer in time"))
        try:
            self.transport.write(data)
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._parser = None
            if not waiter.done() or waiter.cancelled():
                self.close()  # our caller was cancelled mid-request: the answer is unusable


class _Pool:
    """Connections to one origin: idle ones reused most recent first, at most ``limit`` open."""

    def __init__(
        self, origin: tuple[str, str, int], limit: int, max_body: int, tls: ssl.SSLContext | None
    ) -> None:
        _, self._host, self._port = origin
        self._tls = tls  # None: plain TCP
        self._limit = limit
        self._max_body = max_body
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, deadline: float) -> tuple[_Connection, bool]:
        """A connection and whether it was used before."""
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
                self._open.discard(conn)
            if len(self._open) + self._connecting < self._limit:
                return await self._connect(deadline), False
            await self._wait_for_release(deadline)

    async def _wait_for_release(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, waiter.cancel)
        try:
            await waiter
        except asyncio.CancelledError:
            if loop.time() >= deadline and not _cancelling():
                raise UpstreamTimeout("every pooled connection stayed busy") from None
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._max_body),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connecting to {self._host}:{self._port}: timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachable(f"connecting to {self._host}:{self._port}: {exc}") from exc
        finally:
            self._connecting -= 1
            self._wake()
        self._open.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        if conn.reusable and not conn.closed:
            self._idle.append(conn)
        else:
            conn.close()
            self._open.discard(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def upstream_tls(ca_file: str | None) -> ssl.SSLContext | None:
    """The context for ``https`` origins when ``upstream_ca`` is set: certificate and host name
    verified as by default, against the CAs in ``ca_file`` only; None without one (the
    default context, made on first use)."""
    if ca_file is None:
        return None
    return ssl.create_default_context(cafile=ca_file)


class Http1Upstream:
    """The proxy's :class:`~proxy.upstream.Upstream` (see the module docstring).

    ``tls``: the context for ``https`` origins; by default :func:`ssl.create_default_context`
    (certificate and host name verified), made when the first ``https`` origin is met."""

    def __init__(
        self,
        *,
        timeout: float,
        max_connections: int = 100,
        max_response_bytes: int = 16 * 1024 * 1024,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = timeout
        self._limit = max_connections
        self._max_body = max_response_bytes
        self._tls = tls
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    def _new_pool(self, origin: tuple[str, str, int]) -> _Pool:
        tls = None
        if origin[0] == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        return _Pool(origin, self._limit, self._max_body, tls)

    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse:
        target = _target(url)
        data = _encode_head(method, target, headers, len(content)) + content
        pool = self._pools.get(target.origin)
        if pool is None:
            pool = self._pools[target.origin] = self._new_pool(target.origin)
        deadline = asyncio.get_running_loop().time() + self._timeout
        while True:
            conn, reused = await pool.acquire(deadline)
            try:
                return await conn.exchange(data, deadline)
            except _Dropped as exc:
                if reused and not exc.answered:
                    continue  # the server had closed this idle connection: a fresh one
                raise UpstreamUnreachable(f"{method} {url}: {exc}") from exc
            except (UpstreamUnreachable, UpstreamTimeout) as exc:
                raise type(exc)(f"{method} {url}: {exc}") from exc
            finally:
                pool.release(conn)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
