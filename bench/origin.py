"""Scenario B's HTTP origin: one resource (:func:`bench.blockload.resource_body`, so the load
generator checks every byte without a copy) at ``--path``, plain asyncio HTTP/1.1 keep-alive.
GET/HEAD answer 200, or 206 for one ``Range: bytes=…`` (RFC 9110 §14), 416 past the end; a
strong ETag each time. At exit it prints its answer counts, which tell the bench how the proxy
fetched the blocks (a 206 per block, or a 200 kept for the following ones)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
from collections import Counter

from bench.blockload import resource_body
from bench.loadgen import run_loop

_RANGE = re.compile(rb"bytes=(\d*)-(\d*)$")
UNSATISFIABLE = (-1, -1)
ANSWERS: Counter[str] = Counter()


def parse_range(value: bytes, size: int) -> tuple[int, int] | None:
    """``(first, last)`` inclusive; None: not one byte range we read (the whole body, RFC 9110
    §14.2 allows ignoring it); :data:`UNSATISFIABLE` past the end (416, RFC 9110 §15.5.17)."""
    match = _RANGE.match(value.strip())
    first, last = (int(x) if x else None for x in (match.groups() if match else (b"", b"")))
    if first is None:  # a suffix: the last N bytes
        return None if last is None else (max(0, size - last), size - 1) if last else UNSATISFIABLE
    if first >= size:
        return UNSATISFIABLE
    if last is None:
        return first, size - 1
    return None if last < first else (first, min(size - 1, last))


class Origin(asyncio.Protocol):
    def __init__(self, path: bytes, body: bytes) -> None:
        self.path, self.body, self.buffer = path, body, b""
        self.etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:16].encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            request, *lines = head.split(b"\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)
            }
            method, target, *_ = [*request.split(b" "), b"", b""]
            self.answer(method, target.split(b"?")[0], headers.get(b"range"))
        if len(self.buffer) > 65536:  # no request head is that long
            self.transport.close()

    def answer(self, method: bytes, path: bytes, range_: bytes | None) -> None:
        size, body, extra = len(self.body), b"", b""
        wanted = None if range_ is None else parse_range(range_, size)
        if path != self.path:
            status = b"404 Not Found"
        elif method not in (b"GET", b"HEAD"):
            status, extra = b"405 Method Not Allowed", b"Allow: GET, HEAD\r\n"
        elif wanted == UNSATISFIABLE:
            status, extra = b"416 Range Not Satisfiable", b"Content-Range: bytes */%d\r\n" % size
        elif wanted is not None:
            status, body = b"206 Partial Content", self.body[wanted[0] : wanted[1] + 1]
            extra = b"Content-Range: bytes %d-%d/%d\r\n" % (*wanted, size)
        else:
            status, body = b"200 OK", self.body
        ANSWERS[status[:3].decode()] += 1
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n"
            b"Accept-Ranges: bytes\r\nETag: %s\r\n%s\r\n" % (status, len(body), self.etag, extra)
            + (b"" if method == b"HEAD" else body)
        )  # fmt: skip


async def serve(host: str, port: int, path: str, size: int) -> None:
    loop, body, stop = asyncio.get_running_loop(), resource_body(size), asyncio.Event()
    server = await loop.create_server(lambda: Origin(path.encode(), body), host, port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print("answers " + json.dumps(dict(ANSWERS), sort_keys=True), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__)
    for flag, default in (("--host", "127.0.0.1"), ("--port", 8099), ("--path", "/blob")):
        parser.add_argument(flag, default=default, type=type(default))
    parser.add_argument("--size", type=int, default=256 * 1024)
    args = parser.parse_args()
    run_loop(serve(args.host, args.port, args.path, args.size))
