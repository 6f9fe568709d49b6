"""A raw CoAP datagram client for tests: send exact bytes, read exact bytes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from proxy.coap import options as opt
from proxy.coap.codec import CON, Message, decode, encode_parts


def request_datagram(
    code: int,
    mid: int,
    path: str,
    *,
    token: bytes = b"",
    queries: Iterable[str] = (),
    payload: bytes = b"",
    extra: Iterable[tuple[int, bytes]] = (),
    mtype: int = CON,
) -> bytes:
    """A request to ``path`` (one Uri-Path per segment) with Uri-Query ``queries`` and any
    ``extra`` options, sorted by number as the codec wants them."""
    options = [
        (opt.URI_PATH, segment.encode()) for segment in path.strip("/").split("/") if segment
    ]
    options += [(opt.URI_QUERY, query.encode()) for query in queries]
    options += list(extra)
    options.sort(key=lambda option: option[0])
    return encode_parts(mtype, code, mid, token, options, payload)


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


class _DatagramClient:
    _transport: asyncio.DatagramTransport

    def close(self) -> None:
        self._transport.close()

    async def aclose(self) -> None:
        """Close and let the loop run once: a datagram transport closes its socket in a
        callback, which never runs if the loop ends first (ResourceWarning: unclosed)."""
        self._transport.close()
        await asyncio.sleep(0)


class RawClient(_DatagramClient):
    """One UDP socket (one source port) talking to one server address."""

    def __init__(self, transport: asyncio.DatagramTransport, collector: _Collector) -> None:
        self._transport = transport
        self._collector = collector

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        loop = asyncio.get_running_loop()
        transport, collector = await loop.create_datagram_endpoint(
            _Collector, remote_addr=(host, port)
        )
        return cls(transport, collector)

    @property
    def port(self) -> int:
        return int(self._transport.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    async def recv(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self._collector.queue.get(), timeout)

    async def recv_message(self, timeout: float = 2.0) -> Message:
        return decode(await self.recv(timeout))

    async def expect_silence(self, seconds: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            data = await self.recv(seconds)
            raise AssertionError(f"expected no datagram, got {data.hex()}")

    async def request(self, data: bytes, timeout: float = 2.0) -> Message:
        self.send(data)
        return await self.recv_message(timeout)


class _AddressedCollector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


class PortClient(_DatagramClient):
    """One UDP socket (one source port) talking to several servers: a device whose datagrams a
    load balancer sends to different replicas."""

    def __init__(self, transport: asyncio.DatagramTransport, collector: _AddressedCollector):
        self._transport = transport
        self._collector = collector

    @classmethod
    async def open(cls) -> PortClient:
        loop = asyncio.get_running_loop()
        transport, collector = await loop.create_datagram_endpoint(
            _AddressedCollector, local_addr=("127.0.0.1", 0)
        )
        return cls(transport, collector)

    def send(self, data: bytes, port: int) -> None:
        self._transport.sendto(data, ("127.0.0.1", port))

    async def recv_any(self, timeout: float = 2.0) -> tuple[bytes, int]:
        """The next datagram and the server port it came from."""
        data, addr = await asyncio.wait_for(self._collector.queue.get(), timeout)
        return data, addr[1]

    async def recv_from(self, port: int, timeout: float = 2.0) -> bytes:
        """The next datagram from ``port`` (others are dropped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            data, addr = await asyncio.wait_for(
                self._collector.queue.get(), max(0.0, deadline - loop.time())
            )
            if addr[1] == port:
                return data

    async def request(self, data: bytes, port: int, *, tries: int = 4, wait: float = 0.6) -> bytes:
        """Send, and retransmit like a device (same bytes) until ``port`` answers."""
        for _ in range(tries):
            self.send(data, port)
            with contextlib.suppress(TimeoutError):
                return await self.recv_from(port, wait)
        raise AssertionError(f"no answer from port {port} after {tries} tries")
