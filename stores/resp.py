"""One Redis connection of our own for script calls on the hot paths: RESP2 commands, pipelined,
over one :class:`asyncio.Protocol`.

Why: the exactly-once ledger (stores/ledger.py) sends one script call per batch of claims on
both sides (the proxy's dedup; the API's admission, api/admission.py), and on that path
redis-py's command packing, connection pool and reply parser in Python cost about twice this
link's CPU per call (docs/ARCHITECTURE.md, "Own wire clients on the hot path"; BENCHMARKS.md,
"Fourth session").

What it speaks: requests as RESP arrays of bulk strings; replies of the five RESP2 types
(simple string, error, integer, bulk string, array; nil bulk and nil array as ``None``). Replies
come back in request order, so each call is a future in a queue. The link authenticates (AUTH)
and selects the database (SELECT) of the URL when it connects.

Where it is used: one server reached by ``redis://`` or ``unix://``. TLS (``rediss://``),
Sentinel and Cluster keep redis-py, which knows how to follow them. redis-py tuning parameters
in the URL's query (``socket_timeout`` …) do not apply to this link; its ``wait_limit`` does.

Failures: an error reply is :class:`RespError`; a connection that cannot be made, is lost, or
does not answer within ``wait_limit`` is :class:`LinkDown` (the link closes; open another).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

# A reply: bytes (simple and bulk strings), int, None (nil), a list of replies, or an error
# reply inside an array.
Reply = Union[bytes, int, None, "RespError", list["Reply"]]


class RespError(Exception):
    """An error reply (``-ERR …``, ``-NOSCRIPT …``)."""


class LinkDown(ConnectionError):
    """No connection, a lost one, or no reply within the timeout."""


@dataclass(frozen=True)
class Address:
    """Where and as whom to connect: ``host``/``port``, or a unix socket ``path``."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0


def address_of(url: str) -> Address | None:
    """The address of a one-server URL, or ``None`` when the link cannot serve it (TLS)."""
    options = parse_url(url)
    connection_class = options.get("connection_class")
    if connection_class is not None and connection_class is not UnixDomainSocketConnection:
        return None  # rediss://: left to redis-py
    return Address(
        host=options.get("host", "localhost"),
        port=int(options.get("port", 6379)),
        path=options.get("path"),
        username=options.get("username"),
        password=options.get("password"),
        db=int(options.get("db", 0)),
    )


def encode_command(*args: bytes | str | int) -> bytes:
    """A command as a RESP array of bulk strings (Redis's request format)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, int):
            value = b"%d" % arg
        elif isinstance(arg, str):
            value = arg.encode()
        else:
            value = arg
        parts.append(b"$%d\r\n%b\r\n" % (len(value), value))
    return b"".join(parts)


class ProtocolViolation(Exception):
    """Bytes that are not RESP2."""


def parse_reply(buffer: bytes, at: int = 0) -> tuple[Reply, int] | None:
    """The reply starting at ``at`` and where the next begins, or ``None`` if ``buffer`` does not
    hold all of it yet."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        return None
    kind = buffer[at]
    line = buffer[at + 1 : end]
    after = end + 2
    if kind == 0x24:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return None
        return buffer[after : after + size], after + size + 2
    if kind == 0x2A:  # * array
        count = int(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            parsed = parse_reply(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    if kind == 0x3A:  # : integer
        return int(line), after
    if kind == 0x2B:  # + simple string
        return line, after
    if kind == 0x2D:  # - error
        return RespError(line.decode("utf-8", "replace")), after
    raise ProtocolViolation(f"not a RESP2 reply type: {bytes([kind])!r}")


class RespLink(asyncio.Protocol):
    """One connection; :meth:`call` sends a command and returns the future of its reply."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._loop = asyncio.get_running_loop()
        self._deadline: asyncio.TimerHandle | None = None
        self.closed = False

    @classmethod
    async def open(cls, address: Address, *, wait_limit: float = 1.0) -> RespLink:
        """Connect, authenticate and select the database; :class:`LinkDown` if any of it fails
        (a refused AUTH or SELECT included). ``wait_limit`` seconds for all of that, and later
        for each reply."""
        loop = asyncio.get_running_loop()
        link: RespLink | None = None
        try:
            async with asyncio.timeout(wait_limit):
                if address.path is not None:
                    _, link = await loop.create_unix_connection(
                        lambda: cls(wait_limit), address.path
                    )
                else:
                    _, link = await loop.create_connection(
                        lambda: cls(wait_limit), address.host, address.port
                    )
                setup: list[asyncio.Future[Reply]] = []
                if address.password is not None:
                    who = () if address.username is None else (address.username,)
                    setup.append(link.call(b"AUTH", *who, address.password))
                if address.db:
                    setup.append(link.call(b"SELECT", address.db))
                for future in setup:
                    reply = await future
                    if isinstance(reply, RespError):
                        raise LinkDown(f"redis refused the connection's setup: {reply}")
        except BaseException as exc:
            if link is not None:
                link.close()
            if isinstance(exc, LinkDown):
                raise
            if isinstance(exc, TimeoutError):
                raise LinkDown(f"redis: no connection within {wait_limit:g} s") from exc
            if isinstance(exc, OSError):
                raise LinkDown(f"redis: {exc}") from exc
            raise
        return link

    def call(self, *args: bytes | str | int) -> asyncio.Future[Reply]:
        """Send one command. The future's result is the reply (an error reply is a
        :class:`RespError` result, not an exception); :class:`LinkDown` if the link goes down
        or no reply comes within the timeout."""
        future: asyncio.Future[Reply] = self._loop.create_future()
        if self.closed or self._transport is None:
            future.set_exception(LinkDown("redis: link closed"))
            return future
        self._waiting.append(future)
        self._transport.write(encode_command(*args))
        if self._deadline is None:
            self._deadline = self._loop.call_later(self._timeout, self._expired)
        return future

    def close(self) -> None:
        """Close the connection (after writing what is queued); what waits fails."""
        if self._transport is not None and not self.closed:
            self._transport.close()
        self._end(LinkDown("redis: link closed"))

    def _expired(self) -> None:
        self._deadline = None
        if self._waiting:
            self._end(LinkDown(f"redis: no reply within {self._timeout:g} s"))

    def _end(self, exc: LinkDown) -> None:
        self.closed = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(exc)

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(LinkDown(f"redis: connection lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        at = 0
        waiting = self._waiting
        try:
            while at < len(buffer):
                parsed = parse_reply(buffer, at)
                if parsed is None:
                    break
                reply, at = parsed
                if not waiting:
                    raise ProtocolViolation("a reply to no command")
                future = waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except (ProtocolViolation, ValueError) as exc:
            self._end(LinkDown(f"redis: unreadable reply: {exc}"))
            return
        self._buffer = buffer[at:]
        # The deadline covers the oldest unanswered command: restart it for the next one.
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if waiting:
            self._deadline = self._loop.call_later(self._timeout, self._expired)


class ScriptLink:
    """Lua scripts over a :class:`RespLink` that is opened when first needed and again after it
    went down. A script goes as EVALSHA; one that Redis does not know (a fresh or restarted
    server, SCRIPT FLUSH) is sent once more as EVAL, which loads it."""

    def __init__(self, address: Address, *, wait_limit: float = 1.0) -> None:
        self._address = address
        self._wait_limit = wait_limit
        self._link: RespLink | None = None
        self._opening = asyncio.Lock()
        self._shas: dict[str, str] = {}

    async def _open(self) -> RespLink:
        async with self._opening:
            if self._link is None or self._link.closed:
                self._link = await RespLink.open(self._address, wait_limit=self._wait_limit)
            return self._link

    async def run(
        self, script: str, keys: Sequence[str], args: Sequence[bytes | str | int]
    ) -> Reply:
        """The script's reply; :class:`RespError` if it failed, :class:`LinkDown` if Redis could
        not be asked."""
        link = self._link
        if link is None or link.closed:
            link = await self._open()
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        reply = await link.call(b"EVALSHA", sha, len(keys), *keys, *args)
        if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
            reply = await link.call(b"EVAL", script, len(keys), *keys, *args)
        if isinstance(reply, RespError):
            raise reply
        return reply

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
