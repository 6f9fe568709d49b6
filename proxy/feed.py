"""The change feed: one long-lived HTTP/1.1 request per proxy process to the --upstream origin,
which tells what changed so the proxy can notify observers (RFC 7641) without an HTTP request
per device (docs/ARCHITECTURE.md, "Observe").

``GET {upstream}{observe_events}`` with ``Accept: text/event-stream`` and the proxy token; the
answer is a server-sent event stream (https://html.spec.whatwg.org/multipage/server-sent-events.html)
of ``event: changed`` / ``data: <origin path>`` events and ``:`` comment lines that keep it
open. The stream is read here on a connection of its own (the pooled client, proxy/http1.py,
reads whole answers). On loss it reconnects with backoff (0.1 s doubling to 5 s); every
successful connect calls ``on_connect`` so the caller fetches every observed resource once
(events may have been missed while it was down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# A stream silent for this long is taken for dead (the origin sends a comment every 15 s).
IDLE_TIMEOUT = 45.0
_MAX_LINE = 64 * 1024


class FeedError(Exception):
    """The origin's answer is not an event stream (status, content type, framing)."""


class ChangeFeed:
    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        on_change: Callable[[str], None],
        on_connect: Callable[[], None],
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        connect: Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
        | None = None,
    ) -> None:
        self._url = url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"change feed URL must be http(s)://host/path, not {url!r}")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self._headers = headers
        self._on_change = on_change
        self._on_connect = on_connect
        self._idle_timeout = idle_timeout
        self._connect = connect or asyncio.open_connection
        self._task: asyncio.Task[None] | None = None
        self._connected_once = False
        self.connects = 0  # successful connects (tests and logs)
        self.events = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def want(self, wanted: bool) -> None:
        """Keep the stream open while ``wanted`` (while there is at least one relation)."""
        if wanted and not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif not wanted and self.running:
            assert self._task is not None
            self._task.cancel()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._stream()
                log.info("change feed %s ended; reconnecting", self._url)
            except asyncio.CancelledError:
                raise
            except (OSError, FeedError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("change feed %s: %s; retrying in %.1f s", self._url, exc, delay)
            if self._connected_once:
                delay = BACKOFF_FIRST
                self._connected_once = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _stream(self) -> None:
        if self._tls:
            opening = self._connect(
                self._host,
                self._port,
                limit=_MAX_LINE,
                ssl=ssl.create_default_context(),
                server_hostname=self._host,
            )
        else:
            opening = self._connect(self._host, self._port, limit=_MAX_LINE)
        reader, writer = await asyncio.wait_for(opening, 10.0)
        try:
            host = self._host if self._port in (80, 443) else f"{self._host}:{self._port}"
            lines = [
                f"GET {self._target} HTTP/1.1",
                f"Host: {host}",
                "Accept: text/event-stream",
                "Cache-Control: no-cache",
            ]
            lines += [f"{name}: {value}" for name, value in self._headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            chunked = await self._head(reader)
            self._connected_once = True
            self.connects += 1
            self._on_connect()
            body = (
                _chunks(reader, self._idle_timeout) if chunked else _raw(reader, self._idle_timeout)
            )
            await self._events(body)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _head(self, reader: asyncio.StreamReader) -> bool:
        """Read the status line and headers; True when the body is chunked."""
        status_line = (await asyncio.wait_for(reader.readline(), 10.0)).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise FeedError(f"not an HTTP answer: {status_line.strip()[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = (await asyncio.wait_for(reader.readline(), 10.0)).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            raise FeedError(f"status {status}")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "text/event-stream":
            raise FeedError(f"content type {media or 'missing'}, not text/event-stream")
        return "chunked" in headers.get("transfer-encoding", "").lower()

    async def _events(self, body: _Body) -> None:
        """Parse the event stream: ``event:`` and ``data:`` fields, dispatched at a blank line;
        comments (``:``) ignored. Only ``changed`` events are used."""
        buffer = b""
        event, data = "", list[str]()
        async for piece in body:
            buffer += piece
            if len(buffer) > _MAX_LINE and b"\n" not in buffer:
                raise FeedError("event line too long")
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
                if not line:
                    if event == "changed" and data:
                        self.events += 1
                        self._on_change("\n".join(data))
                    event, data = "", []
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)


class _Body:
    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


class _raw(_Body):
    def __init__(self, reader: asyncio.StreamReader, idle: float) -> None:
        self._reader = reader
        self._idle = idle

    async def __anext__(self) -> bytes:
        data = await asyncio.wait_for(self._reader.read(4096), self._idle)
        if not data:
            raise StopAsyncIteration
        return data


class _chunks(_Body):
    """RFC 9112 §7.1 chunked transfer coding, chunk by chunk."""

    def __init__(self, reader: asyncio.StreamReader, idle: float) -> None:
        self._reader = reader
        self._idle = idle

    async def __anext__(self) -> bytes:
        line = await asyncio.wait_for(self._reader.readline(), self._idle)
        if not line:
            raise StopAsyncIteration
        size_text = line.split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise FeedError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            raise StopAsyncIteration
        data = await asyncio.wait_for(self._reader.readexactly(size + 2), self._idle)
        return data[:-2]
