"""The HTTP origin of scenario B: one large resource with byte ranges (RFC 9110 §14), plain
asyncio HTTP/1.1 with keep-alive, run under uvloop when available.

    python -m bench.origin --host 127.0.0.1 --port 8099 --path /blob --size 262144

``GET``/``HEAD`` on ``--path``: 200 with the whole body, or 206 with ``Content-Range`` for a
single ``Range: bytes=first-last`` (also ``first-`` and ``-suffix``), 416 with
``Content-Range: bytes */size`` when the range starts past the end. A strong ``ETag`` and
``Accept-Ranges: bytes`` on every answer. Anything else: 404 (405 for another method). The body
is :func:`bench.blockload.resource_body`, so the load generator can check every byte without a
copy of the file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal

from bench.blockload import resource_body

_RANGE = re.compile(rb"bytes=(\d*)-(\d*)$")


UNSATISFIABLE = (-1, -1)


def parse_range(value: bytes, size: int) -> tuple[int, int] | None:
    """``(first, last)`` inclusive for one satisfiable range; ``None`` when the header is not
    one byte range we read (the whole body is sent, RFC 9110 §14.2 allows ignoring it);
    :data:`UNSATISFIABLE` when it starts past the end (416, RFC 9110 §15.5.17)."""
    match = _RANGE.match(value.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if first >= size:
        return UNSATISFIABLE
    last = int(last_text) if last_text else size - 1
    if last < first:
        return None
    return first, min(last, size - 1)


# Answers by status, over all connections: printed at exit, so the bench can tell how the proxy
# fetched the blocks (206 per block, or one 200 per transfer kept for the following blocks).
ANSWERS: dict[str, int] = {}


class Origin(asyncio.Protocol):
    def __init__(self, path: bytes, body: bytes) -> None:
        self.path = path
        self.body = body
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self._close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            lines = head.split(b"\r\n")
            try:
                method, target, _ = lines[0].split(b" ", 2)
            except ValueError:
                self._answer(b"400 Bad Request", [], b"", close=True)
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"content-length", b"0") not in (b"", b"0"):
                # The bench sends no request bodies; refuse rather than parse one.
                self._answer(b"400 Bad Request", [], b"", close=True)
                return
            self._respond(method, target, headers)
            if headers.get(b"connection", b"").lower() == b"close":
                self._close()
                return

    def _respond(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> None:
        path = target.split(b"?", 1)[0]
        if path != self.path:
            self._answer(b"404 Not Found", [], b"")
            return
        if method not in (b"GET", b"HEAD"):
            self._answer(b"405 Method Not Allowed", [(b"Allow", b"GET, HEAD")], b"")
            return
        size = len(self.body)
        common = [
            (b"Content-Type", b"application/octet-stream"),
            (b"Accept-Ranges", b"bytes"),
            (b"ETag", self.etag),
        ]
        wanted = parse_range(headers[b"range"], size) if b"range" in headers else None
        if wanted == UNSATISFIABLE:
            self._answer(
                b"416 Range Not Satisfiable",
                [*common, (b"Content-Range", b"bytes */%d" % size)],
                b"",
            )
        elif wanted is None:
            self._answer(b"200 OK", common, self.body, head=method == b"HEAD")
        else:
            first, last = wanted
            self._answer(
                b"206 Partial Content",
                [*common, (b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))],
                self.body[first : last + 1],
                head=method == b"HEAD",
            )

    def _answer(
        self,
        status: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        assert self.transport is not None
        code = status[:3].decode()
        ANSWERS[code] = ANSWERS.get(code, 0) + 1
        lines = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body)]
        lines += [name + b": " + value for name, value in headers]
        if close:
            lines.append(b"Connection: close")
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body))
        if close:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int, path: str, size: int) -> None:
    loop = asyncio.get_running_loop()
    body = resource_body(size)
    server = await loop.create_server(lambda: Origin(path.encode(), body), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print("answers " + json.dumps(ANSWERS, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--path", default="/blob")
    parser.add_argument("--size", type=int, default=256 * 1024)
    args = parser.parse_args(argv)
    coro = serve(args.host, args.port, args.path, args.size)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(coro)
        return
    uvloop.run(coro)


if __name__ == "__main__":
    main()
