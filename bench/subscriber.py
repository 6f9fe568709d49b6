"""The E scenario's witness: an MQTT 5 subscriber (QoS 1) in its own process that records the
sequence id (first 8 payload bytes, big endian) of every message on the bench topic.

    with Subscriber(url, "bench/x") as sub:   # returns once SUBACK arrived
        ...load...
        sub.settle(expected_ids)               # waits for stragglers
        seen = sub.seen()                      # Counter of sequence ids
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def _subscriber_main(url: str, topic: str, ready: Any, stop: Any, count: Any, conn: Any) -> None:
    import aiomqtt

    logging.basicConfig(level=logging.ERROR)
    parts = urlsplit(url)
    seqs = array("Q")

    async def pump(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray) and len(payload) >= 8:
                seqs.append(int.from_bytes(payload[:8], "big"))
            else:
                seqs.append(0xFFFFFFFFFFFFFFFF)  # not ours: counted as a foreign message
            count.value = len(seqs)

    async def run() -> None:
        async with aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or 1883,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=10,
            identifier=f"bench-sub-{time.monotonic_ns()}",
        ) as client:
            await client.subscribe(topic, qos=1)
            ready.set()
            task = asyncio.ensure_future(pump(client))
            while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing Event
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:  # pragma: no cover
        asyncio.run(run())
    conn.send_bytes(seqs.tobytes())
    conn.close()


class Subscriber:
    def __init__(self, url: str, topic: str) -> None:
        context = multiprocessing.get_context("fork")
        self._ready = context.Event()
        self._stop = context.Event()
        self._count: Synchronized[int] = context.Value("q", 0, lock=False)  # type: ignore[assignment]
        self._recv, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_subscriber_main,
            args=(url, topic, self._ready, self._stop, self._count, send),
            daemon=True,
        )
        self._seqs: array[int] | None = None

    def __enter__(self) -> Subscriber:
        self._process.start()
        if not self._ready.wait(15):
            self.close()
            raise RuntimeError("MQTT subscriber did not get its SUBACK within 15 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    @property
    def count(self) -> int:
        return int(self._count.value)

    def settle(self, expected: int, quiet: float = 1.0, limit: float = 10.0) -> None:
        """Wait until ``expected`` messages arrived, or nothing arrived for ``quiet`` seconds,
        or ``limit`` seconds passed."""
        deadline = time.monotonic() + limit
        last, last_change = self.count, time.monotonic()
        while time.monotonic() < deadline:
            now_count = self.count
            if now_count >= expected:
                # A duplicate may still be on its way: give it a short moment.
                time.sleep(min(quiet, 0.3))
                return
            if now_count != last:
                last, last_change = now_count, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                return
            time.sleep(0.05)

    def close(self) -> array[int]:
        if self._seqs is not None:
            return self._seqs
        seqs = array("Q")
        if self._process.is_alive():
            self._stop.set()
            if self._recv.poll(10):
                seqs.frombytes(self._recv.recv_bytes())
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._seqs = seqs
        return seqs


def check_delivery(acked: Iterable[int], seen: Counter[int]) -> tuple[int, int]:
    """``(lost, duplicated)``: acknowledged ids never delivered, and ids delivered more than
    once (each extra copy counts)."""
    lost = sum(1 for seq in acked if seen.get(seq, 0) == 0)
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    return lost, duplicated


class MosquittoSubscriber:
    """The same witness with Debian's ``mosquitto_sub`` (C, MQTT 5, QoS 1): it costs the shared
    cores far less CPU per message than a Python client. Each message becomes one line of hex
    (``-F %x``) in a file; lines have a fixed length, so counting is a ``stat``. Readiness is
    proven by publishing probe messages (``mosquitto_pub``) until one shows up."""

    PAYLOAD = 100  # bytes per message, so 2 * PAYLOAD + 1 bytes per line

    def __init__(self, url: str, topic: str, workdir: Path) -> None:
        from bench.services import Service, which

        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", str(parts.port or 1883)
        self._topic = topic
        workdir.mkdir(parents=True, exist_ok=True)
        self._out = workdir / f"sub-{time.monotonic_ns()}.hex"
        self._pub = which("mosquitto_pub")
        client_id = f"bench-sub-{time.monotonic_ns()}"
        argv = [which("mosquitto_sub"), "-h", self._host, "-p", self._port, "-V", "mqttv5",
                "-q", "1", "-t", topic, "-F", "%x", "-i", client_id]  # fmt: skip
        self._service = Service("mosquitto_sub", argv, workdir)
        self._line = 2 * self.PAYLOAD + 1
        self._probes = 0
        self._seqs: array[int] | None = None

    def __enter__(self) -> MosquittoSubscriber:
        import subprocess

        self._service.log_path = self._out  # stdout is the data
        self._service.start()
        probe = ("PROBE" + "." * self.PAYLOAD)[: self.PAYLOAD]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self._service.check_alive()
            subprocess.run(
                [self._pub, "-h", self._host, "-p", self._port, "-V", "mqttv5", "-q", "1",
                 "-t", self._topic, "-m", probe],
                check=False, capture_output=True, timeout=10,
            )  # fmt: skip
            time.sleep(0.1)
            lines = self._lines()
            if lines:
                self._probes = lines
                return self
        self.close()
        raise RuntimeError("mosquitto_sub received no probe message within 15 s")

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _lines(self) -> int:
        try:
            return self._out.stat().st_size // self._line
        except OSError:
            return 0

    @property
    def pid(self) -> int:
        return self._service.pid

    @property
    def count(self) -> int:
        return max(0, self._lines() - self._probes)

    settle = Subscriber.settle

    def close(self) -> array[int]:
        if self._seqs is not None:
            return self._seqs
        time.sleep(0.05)
        self._service.stop()
        seqs = array("Q")
        try:
            text = self._out.read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            if len(line) >= 16:
                try:
                    seqs.append(int(line[:16], 16))
                except ValueError:
                    seqs.append(0xFFFFFFFFFFFFFFFF)
        self._seqs = seqs
        return seqs
