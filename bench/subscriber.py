"""The witness of E, L, R and D: ``mosquitto_sub`` (C, MQTT 5, QoS 1: far cheaper per message
on the shared cores than a Python client) writes each message on the bench topic as one
fixed-length line of hex (``-F %x``), so counting is a ``stat``; the first 8 payload bytes are
the sequence id. Readiness: probe messages (``mosquitto_pub``) until one shows up.

With ``json_seq`` (E with a template: the broker gets the translation's JSON, of varying
length), each message is written as its own line of text (``-F %p``; compact JSON holds no
newline) and the sequence id is that key of the object; lines are counted as they grow."""

from __future__ import annotations

import json
import subprocess
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from bench.services import Service, which

FOREIGN = 0xFFFFFFFFFFFFFFFF  # a message that is not ours


def check_delivery(acked: Iterable[int], seen: Counter[int]) -> tuple[int, int]:
    """``(lost, duplicated)``: acknowledged ids never delivered, and ids delivered more than
    once (each extra copy counts)."""
    lost = sum(1 for seq in acked if seen.get(seq, 0) == 0)
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    return lost, duplicated


class Subscriber:
    PAYLOAD = 100  # bytes per message, so 2 * PAYLOAD + 1 bytes per line

    def __init__(self, url: str, topic: str, workdir: Path, json_seq: str | None = None) -> None:
        parts = urlsplit(url)
        self._broker = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 1883),
                        "-V", "mqttv5", "-q", "1", "-t", topic]  # fmt: skip
        workdir.mkdir(parents=True, exist_ok=True)
        self._out = workdir / f"sub-{time.monotonic_ns()}.hex"
        self._json_seq = json_seq
        self._counted = (0, 0)  # JSON mode: (bytes read, lines in them)
        layout = "%x" if json_seq is None else "%p"
        argv = [which("mosquitto_sub"), *self._broker, "-F", layout, "-i", self._out.stem]
        self.service = Service("mosquitto_sub", argv, workdir)
        self.service.log_path = self._out  # stdout is the data
        self._probes = 0
        self._seqs: array[int] | None = None

    def __enter__(self) -> Subscriber:
        self.service.start()
        probe = ("PROBE" + "." * self.PAYLOAD)[: self.PAYLOAD]
        if self._json_seq is not None:
            probe = '{"probe":true}'
        publish = [which("mosquitto_pub"), *self._broker, "-m", probe]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self.service.check_alive()
            subprocess.run(publish, check=False, capture_output=True, timeout=10)
            time.sleep(0.1)
            if lines := self._lines():
                self._probes = lines
                return self
        self.close()
        raise RuntimeError("mosquitto_sub received no probe message within 15 s")

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _lines(self) -> int:
        if self._json_seq is not None:
            return self._json_lines()
        try:
            return self._out.stat().st_size // (2 * self.PAYLOAD + 1)
        except OSError:
            return 0

    def _json_lines(self) -> int:
        """Lines so far, reading only what was appended since the last call."""
        done, lines = self._counted
        try:
            with self._out.open("rb") as out:
                out.seek(done)
                more = out.read()
        except OSError:
            return lines
        # Up to the last newline only: a line being written is counted once it is whole.
        whole = more.rfind(b"\n") + 1
        self._counted = (done + whole, lines + more.count(b"\n", 0, whole))
        return self._counted[1]

    @property
    def count(self) -> int:
        return max(0, self._lines() - self._probes)

    def settle(self, expected: int, quiet: float = 1.0, limit: float = 10.0) -> None:
        """Wait until ``expected`` messages arrived, or nothing arrived for ``quiet`` seconds,
        or ``limit`` seconds passed."""
        deadline = time.monotonic() + limit
        last, last_change = self.count, time.monotonic()
        while time.monotonic() < deadline:
            now_count = self.count
            if now_count >= expected:
                time.sleep(min(quiet, 0.3))  # a duplicate may still be on its way
                return
            if now_count != last:
                last, last_change = now_count, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                return
            time.sleep(0.05)

    def close(self) -> array[int]:
        if self._seqs is not None:
            return self._seqs
        time.sleep(0.05)
        self.service.stop()
        text = self._out.read_text() if self._out.exists() else ""
        if self._json_seq is not None:
            key = self._json_seq
            self._seqs = array("Q", (_json_seq(line, key) for line in text.splitlines() if line))
        else:
            lines = text.splitlines()
            self._seqs = array("Q", (_seq(line) for line in lines if len(line) >= 16))
        return self._seqs


def _seq(line: str) -> int:
    try:
        return int(line[:16], 16)
    except ValueError:
        return FOREIGN


def _json_seq(line: str, key: str) -> int:
    """The sequence id in a JSON line; FOREIGN for anything else (a probe included, as in
    the hex layout)."""
    try:
        document = json.loads(line)
    except ValueError:
        return FOREIGN
    if not isinstance(document, dict):
        return FOREIGN
    seq = document.get(key)
    return seq if isinstance(seq, int) and 0 <= seq <= FOREIGN else FOREIGN
