"""The driver (proxy/coap/driver.py) over real loopback UDP, with a handler of our own.

The rules of RFC 7252 §4 are tested without sockets against the endpoint
(tests/proxy/test_endpoint.py); what is left here is what only a socket and a running loop
show: datagrams actually sent, handlers run as tasks, the one timer firing the empty ACK and
the retransmissions, and an ACK or RST from the peer stopping them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, RST, encode_empty, encode_parts
from proxy.coap.driver import CoapDriver
from proxy.coap.endpoint import Endpoint
from proxy.coap.requests import Request, Response
from tests.support.coap import RawClient


class ScriptedHandler:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.delay = 0.0
        self.response = Response(status.CHANGED)
        self.release: asyncio.Event | None = None
        self.immediate: Response | None = None  # what answer_now gives
        self.answered_now: list[Request] = []

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if self.release is not None:
            await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.response

    def answer_now(self, request: Request) -> Response | None:
        if self.immediate is not None:
            self.answered_now.append(request)
        return self.immediate

    def needs_claim(self, request: Request) -> bool:
        return True


@pytest.fixture
async def server() -> AsyncIterator[tuple[CoapDriver, ScriptedHandler, RawClient]]:
    handler = ScriptedHandler()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: CoapDriver(Endpoint(ack_window=0.2, ack_timeout=0.2), handler),
        local_addr=("127.0.0.1", 0),
    )
    port = transport.get_extra_info("sockname")[1]
    client = await RawClient.connect("127.0.0.1", port)
    yield protocol, handler, client
    client.close()
    transport.close()
    await protocol.drain()


def post(mid: int, mtype: int = CON, token: bytes = b"\x01\x02", options=None, payload=b"hi"):
    return encode_parts(mtype, status.POST, mid, token, options or [(11, b"data")], payload)


async def test_con_gets_piggybacked_response_with_token(server) -> None:
    _, handler, client = server
    reply = await client.request(post(100, token=b"\xaa\xbb\xcc"))
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (
        ACK,
        status.CHANGED,
        100,
        b"\xaa\xbb\xcc",
    )
    assert handler.requests[0].path == "/data"
    assert handler.requests[0].message.payload == b"hi"


async def test_non_request_gets_non_response(server) -> None:
    _, _, client = server
    reply = await client.request(post(101, mtype=NON, token=b"\x07"))
    assert reply.mtype == NON
    assert reply.code == status.CHANGED
    assert reply.token == b"\x07"


async def test_empty_con_is_reset(server) -> None:
    _, handler, client = server
    reply = await client.request(encode_empty(CON, 4242))
    assert (reply.mtype, reply.code, reply.mid) == (RST, 0, 4242)
    assert handler.requests == []


async def test_duplicate_con_gets_identical_bytes_and_one_handler_call(server) -> None:
    _, handler, client = server
    handler.response = Response(status.CONTENT, [(opt.CONTENT_FORMAT, b"")], b"payload")
    datagram = post(105)
    first = await client.request(datagram)
    client.send(datagram)
    again = await client.recv()
    assert again == encode_parts(ACK, first.code, 105, first.token, first.options, first.payload)
    assert len(handler.requests) == 1


async def test_duplicate_non_is_ignored(server) -> None:
    _, handler, client = server
    datagram = post(106, mtype=NON)
    await client.request(datagram)
    client.send(datagram)
    await client.expect_silence()
    assert len(handler.requests) == 1


async def test_slow_handler_gets_empty_ack_then_separate_con(server) -> None:
    protocol, handler, client = server
    handler.delay = 0.5
    client.send(post(107, token=b"\x55"))
    empty = await client.recv_message()
    assert (empty.mtype, empty.code, empty.mid) == (ACK, 0, 107)
    separate = await client.recv_message()
    assert (separate.mtype, separate.code, separate.token) == (CON, status.CHANGED, b"\x55")
    # Not acknowledged: it comes again with the same MID (RFC 7252 §4.2).
    again = await client.recv_message(timeout=1.0)
    assert (again.mtype, again.mid) == (CON, separate.mid)
    client.send(encode_empty(ACK, separate.mid))
    await client.expect_silence(0.8)
    assert protocol.stats.separate_responses == 1
    assert protocol.stats.retransmissions >= 1


async def test_duplicate_while_in_flight_is_acked_and_not_handled_twice(server) -> None:
    _, handler, client = server
    handler.release = asyncio.Event()
    datagram = post(108)
    client.send(datagram)
    await asyncio.sleep(0.05)
    client.send(datagram)
    empty = await client.recv_message()
    assert (empty.mtype, empty.code, empty.mid) == (ACK, 0, 108)
    handler.release.set()
    separate = await client.recv_message()
    assert (separate.mtype, separate.code) == (CON, status.CHANGED)
    client.send(encode_empty(ACK, separate.mid))
    # A later duplicate is acknowledged again (the answer already went separately).
    client.send(datagram)
    again = await client.recv_message()
    assert (again.mtype, again.code, again.mid) == (ACK, 0, 108)
    assert len(handler.requests) == 1


async def test_reset_stops_separate_response_retransmission(server) -> None:
    protocol, handler, client = server
    handler.delay = 0.4
    client.send(post(109))
    await client.recv_message()  # empty ACK
    separate = await client.recv_message()
    client.send(encode_empty(RST, separate.mid))
    await client.expect_silence(0.8)
    assert protocol.stats.retransmissions == 0


async def test_handler_exception_is_internal_server_error(server) -> None:
    _, handler, client = server

    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    handler.handle = broken  # type: ignore[method-assign]
    reply = await client.request(post(110))
    assert reply.code == status.INTERNAL_SERVER_ERROR
    assert reply.payload == b""


async def test_an_answer_that_needs_no_io_is_sent_without_running_the_handler(server) -> None:
    # answer_now: discovery, 4.04, 4.05 ... cost no task; the duplicate still gets the same
    # bytes from the exchange cache.
    protocol, handler, client = server
    handler.immediate = Response(status.NOT_FOUND)
    datagram = post(120, token=b"\x09")
    reply = await client.request(datagram)
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (ACK, status.NOT_FOUND, 120, b"\t")
    client.send(datagram)
    assert await client.recv() == encode_parts(ACK, status.NOT_FOUND, 120, b"\t", [], b"")
    assert handler.requests == []
    assert len(handler.answered_now) == 1
    assert not protocol._tasks
