"""A raw CoAP datagram client for tests: send exact bytes, read exact bytes back."""

from __future__ import annotations

import asyncio
import contextlib

from proxy.coap.codec import Message, decode


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


class RawClient:
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

    def close(self) -> None:
        self._transport.close()
