"""The change feed client (proxy/feed.py) against a real TCP server: chunked SSE parsing,
reconnect after loss, and a refused answer."""

from __future__ import annotations

import asyncio

import pytest

from proxy.feed import ChangeFeed

pytestmark = pytest.mark.asyncio

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_events_are_parsed_and_a_lost_stream_reconnects() -> None:
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(HEAD)
        # An event split across chunks, a comment, CRLF line ends, an event of another type.
        writer.write(chunk(b": keep-alive\n\nevent: chan"))
        writer.write(chunk(b"ged\r\ndata: /commands/1\r\n\r\nevent: other\ndata: /x\n\n"))
        await writer.drain()
        if len(requests) > 1:
            await reader.read()  # open until the feed closes it
        writer.close()  # the first stream is lost at once
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    changes: list[str] = []
    connects: list[int] = []
    two = asyncio.Event()

    def changed(path: str) -> None:
        changes.append(path)
        if len(changes) == 2:
            two.set()

    feed = ChangeFeed(
        f"http://127.0.0.1:{port}/observe/events",
        {"X-Bridge-Token": "secret"},
        changed,
        lambda: connects.append(1),
    )
    feed.want(True)
    try:
        await asyncio.wait_for(two.wait(), 10)
    finally:
        await feed.aclose()
        server.close()
        await server.wait_closed()
    assert changes == ["/commands/1", "/commands/1"]
    assert len(connects) == 2  # every connect asks for a re-fetch of every relation
    assert requests[0].startswith(b"GET /observe/events HTTP/1.1\r\n")
    assert b"Accept: text/event-stream" in requests[0]
    assert b"X-Bridge-Token: secret" in requests[0]


async def test_an_answer_that_is_not_an_event_stream_is_retried_not_used() -> None:
    calls = 0
    retried = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            retried.set()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connects: list[int] = []
    feed = ChangeFeed(
        f"http://127.0.0.1:{port}/observe/events", {}, lambda p: None, lambda: connects.append(1)
    )
    feed.want(True)
    try:
        await asyncio.wait_for(retried.wait(), 10)
    finally:
        await feed.aclose()
        server.close()
        await server.wait_closed()
    assert connects == []
