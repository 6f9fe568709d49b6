"""Block-wise transfer (RFC 7959) on the wire: real clients (libcoap's coap-client, aiocoap's
client, raw datagrams) through a real proxy in front of a real HTTP origin of the test's own,
one with byte-range support and one without; and two proxy replicas sharing one Redis, a
device's Block1 blocks alternating between them."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, decode, encode_parts, parse_uint, uint_bytes
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.clients import aiocoap_client, coap_client
from tests.support.coap import PortClient
from tests.support.http import serve_app
from tests.support.services import RedisServer

pytestmark = pytest.mark.interop

BIG = hashlib.sha256(b"seed").digest() * 160  # 5120 bytes, no two 64-byte blocks alike
POLICY = """
[[route]]
path = "/big"
methods = ["GET"]
target = "/big"

[[route]]
path = "/plain"
methods = ["GET"]
target = "/plain"

[[route]]
path = "/upload"
methods = ["PUT", "POST"]
target = "/upload"
"""
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Origin:
    """``/big`` serves BIG with byte ranges (RFC 9110 §14) and an ETag; ``/plain`` serves it
    whole, without an ETag; ``/upload`` records every body it receives."""

    gets: list[tuple[str, str | None]] = field(default_factory=list)
    uploads: list[tuple[str, bytes]] = field(default_factory=list)

    async def big(self, request: HttpRequest) -> HttpResponse:
        asked = request.headers.get("range")
        self.gets.append(("/big", asked))
        headers = {"ETag": '"big-v1"', "Accept-Ranges": "bytes"}
        match = _RANGE.fullmatch(asked or "")
        if match is None:
            return HttpResponse(BIG, headers=headers, media_type="application/octet-stream")
        first, last = int(match.group(1)), min(int(match.group(2)), len(BIG) - 1)
        if first >= len(BIG):
            return HttpResponse(status_code=416, headers={"Content-Range": f"bytes */{len(BIG)}"})
        headers["Content-Range"] = f"bytes {first}-{last}/{len(BIG)}"
        return HttpResponse(
            BIG[first : last + 1],
            status_code=206,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def plain(self, request: HttpRequest) -> HttpResponse:
        self.gets.append(("/plain", request.headers.get("range")))
        return HttpResponse(BIG, media_type="application/octet-stream")

    async def upload(self, request: HttpRequest) -> HttpResponse:
        self.uploads.append((request.method, await request.body()))
        return HttpResponse(status_code=204)


@dataclass
class Rig:
    origin: Origin
    proxies: list[RunningProxy]

    def url(self, path: str, replica: int = 0) -> str:
        host, port = self.proxies[replica].address
        return f"coap://{host}:{port}{path}"


async def _rig(tmp_path: Path, replicas: int, redis_url: str | None) -> AsyncIterator[Rig]:
    origin = Origin()
    app = Starlette(
        routes=[
            Route("/big", origin.big, methods=["GET"]),
            Route("/plain", origin.plain, methods=["GET"]),
            Route("/upload", origin.upload, methods=["PUT", "POST"]),
        ]
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port=None,
            upstream=base_url,
            policy=str(policy),
            upstream_timeout=5.0,
            ack_window=3.0,
            redis_url=redis_url,
        )
        proxies = [await start_proxy(settings) for _ in range(replicas)]
        try:
            yield Rig(origin, proxies)
        finally:
            for proxy in proxies:
                await proxy.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for made in _rig(tmp_path, 1, None):
        yield made


@pytest.fixture
async def replicas(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Rig]:
    async for made in _rig(tmp_path, 2, redis_server.url):
        yield made


# -- Block2: libcoap fetches a 5 KB resource in 64-byte blocks ----------------------------------


async def test_coap_client_gets_5kb_in_blocks_from_an_origin_with_ranges(
    rig: Rig, tmp_path: Path
) -> None:
    out = tmp_path / "big.bin"
    run = await coap_client("-b", "64", "-m", "get", "-o", str(out), rig.url("/big"))
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == BIG
    assert set(run.codes) == {"2.05"}
    assert len(run.codes) == len(BIG) // 64
    # Every block was a byte range of the origin: nothing kept in the proxy (stateless).
    ranges = [asked for path, asked in rig.origin.gets]
    assert ranges == [f"bytes={n}-{n + 63}" for n in range(0, len(BIG), 64)]


async def test_coap_client_gets_5kb_in_blocks_from_an_origin_without_ranges(
    rig: Rig, tmp_path: Path
) -> None:
    out = tmp_path / "plain.bin"
    run = await coap_client("-b", "64", "-m", "get", "-o", str(out), rig.url("/plain"))
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == BIG
    assert len(run.codes) == len(BIG) // 64
    # The origin answered once, whole; the proxy cut the blocks from what it kept.
    assert len(rig.origin.gets) == 1


async def test_coap_client_without_b_gets_5kb_in_1024_byte_blocks(rig: Rig, tmp_path: Path) -> None:
    out = tmp_path / "default.bin"
    run = await coap_client("-m", "get", "-o", str(out), rig.url("/plain"))
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == BIG
    assert len(run.codes) == len(BIG) // 1024


async def test_aiocoap_client_gets_5kb(rig: Rig) -> None:
    # aiocoap-client writes a binary payload to a pipe as it is: read its stdout as bytes.
    exe = Path(sys.executable).parent / "aiocoap-client"
    proc = await asyncio.create_subprocess_exec(
        str(exe), "-m", "GET", rig.url("/plain"), stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert out.rstrip(b"\n") == BIG


async def test_raw_block2_every_block_carries_the_etag_and_none_exceeds_1024(rig: Rig) -> None:
    device = await PortClient.open()
    port = rig.proxies[0].address[1]
    mids = itertools.count(1)
    try:
        body, etags, num, more = b"", set(), 0, True
        while more:
            options = [(opt.URI_PATH, b"plain")]
            if num:
                options.append((opt.BLOCK2, uint_bytes(num << 4 | 6)))
            datagram = encode_parts(CON, status.GET, next(mids), b"\x07", options, b"")
            reply = decode(await device.request(datagram, port))
            assert (reply.mtype, reply.code) == (ACK, status.CONTENT)
            assert len(reply.payload) <= 1024
            found = dict(reply.options)
            etags.add(found[opt.ETAG])
            block = parse_uint(found[opt.BLOCK2])
            assert block >> 4 == num
            more = bool(block & 8)
            if num == 0:
                assert parse_uint(found[opt.SIZE2]) == len(BIG)
            body += reply.payload
            num += 1
        assert body == BIG
        assert len(etags) == 1
        # A block past the end: 4.00 (what libcoap's and aiocoap's servers answer).
        options = [(opt.URI_PATH, b"big"), (opt.BLOCK2, uint_bytes(80 << 4 | 6))]
        reply = decode(
            await device.request(
                encode_parts(CON, status.GET, next(mids), b"\x08", options, b""), port
            )
        )
        assert (reply.code, reply.payload) == (status.BAD_REQUEST, b"")
    finally:
        await device.aclose()


# -- Block1: bodies larger than one datagram ------------------------------------------------------


@pytest.mark.parametrize("method", ["put", "post"])
async def test_coap_client_sends_10kb_in_64_byte_blocks_arriving_whole(
    rig: Rig, tmp_path: Path, method: str
) -> None:
    body = (hashlib.sha256(b"up").digest() * 320)[:10_000]
    source = tmp_path / "body.bin"
    source.write_bytes(body)
    run = await coap_client("-b", "64", "-m", method, "-f", str(source), rig.url("/upload"))
    assert run.returncode == 0, run.stderr
    # libcoap prints the final answer only (the 2.31s stay inside it): Block1 echoed, M clear.
    assert run.codes == ["2.04"]
    assert re.search(r"c:2\.04 .*Block1:156/_/64", run.stdout), run.stdout
    assert rig.origin.uploads == [(method.upper(), body)]


async def test_aiocoap_client_posts_3kb_which_it_sends_block_wise(rig: Rig, tmp_path: Path) -> None:
    body = (hashlib.sha256(b"aio").digest() * 100)[:3000]
    source = tmp_path / "body.bin"
    source.write_bytes(body)
    run = await aiocoap_client("-m", "POST", "--payload", f"@{source}", rig.url("/upload"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert rig.origin.uploads == [("POST", body)]


async def test_a_70kb_body_is_4_13_with_size1(rig: Rig, tmp_path: Path) -> None:
    source = tmp_path / "huge.bin"
    source.write_bytes(b"z" * 70_000)
    run = await coap_client("-b", "1024", "-m", "put", "-f", str(source), rig.url("/upload"))
    assert "4.13" in run.codes
    assert rig.origin.uploads == []
    # Raw: the block that crosses the maximum gets 4.13 with Size1 = the maximum.
    device = await PortClient.open()
    port = rig.proxies[0].address[1]
    try:
        for num in range(64):
            options = [(opt.URI_PATH, b"upload"), (opt.BLOCK1, uint_bytes(num << 4 | 8 | 6))]
            datagram = encode_parts(CON, status.PUT, 100 + num, b"\x09", options, b"z" * 1024)
            reply = decode(await device.request(datagram, port))
            assert reply.code == status.code(2, 31), num
        options = [(opt.URI_PATH, b"upload"), (opt.BLOCK1, uint_bytes(64 << 4 | 8 | 6))]
        datagram = encode_parts(CON, status.PUT, 200, b"\x09", options, b"z" * 1024)
        reply = decode(await device.request(datagram, port))
        assert reply.code == status.REQUEST_ENTITY_TOO_LARGE
        assert dict(reply.options)[opt.SIZE1] == uint_bytes(65536)
        # Size1 announcing too much is refused at the first block.
        options = [
            (opt.URI_PATH, b"upload"),
            (opt.BLOCK1, uint_bytes(8 | 6)),
            (opt.SIZE1, uint_bytes(70_000)),
        ]
        datagram = encode_parts(CON, status.PUT, 201, b"\x0a", options, b"z" * 1024)
        reply = decode(await device.request(datagram, port))
        assert reply.code == status.REQUEST_ENTITY_TOO_LARGE
    finally:
        await device.aclose()
    assert rig.origin.uploads == []


# -- two replicas, one Redis ---------------------------------------------------------------------


async def test_block1_blocks_alternating_between_replicas_arrive_whole(replicas: Rig) -> None:
    body = (hashlib.sha256(b"two").digest() * 40)[:1200]
    ports = [proxy.address[1] for proxy in replicas.proxies]
    device = await PortClient.open()
    try:
        blocks = [body[i : i + 64] for i in range(0, len(body), 64)]
        for num, chunk in enumerate(blocks):
            more = num < len(blocks) - 1
            options = [
                (opt.URI_PATH, b"upload"),
                (opt.CONTENT_FORMAT, b""),
                (opt.BLOCK1, uint_bytes(num << 4 | (8 if more else 0) | 2)),
            ]
            datagram = encode_parts(CON, status.POST, 300 + num, b"\x0b", options, chunk)
            port = ports[num % 2]
            reply = decode(await device.request(datagram, port))
            block1 = parse_uint(dict(reply.options)[opt.BLOCK1])
            assert block1 >> 4 == num
            if more:
                assert reply.code == status.code(2, 31), (num, reply)
                # The same block again, at the other replica: harmless, 2.31 again.
                again = encode_parts(CON, status.POST, 400 + num, b"\x0b", options, chunk)
                repeat = decode(await device.request(again, ports[(num + 1) % 2]))
                assert repeat.code == status.code(2, 31)
            else:
                assert reply.code == status.CHANGED
    finally:
        await device.aclose()
    assert replicas.origin.uploads == [("POST", body)]


async def test_block2_from_alternating_replicas_is_one_representation(replicas: Rig) -> None:
    ports = [proxy.address[1] for proxy in replicas.proxies]
    device = await PortClient.open()
    try:
        body, etags = b"", set()
        for num in range(len(BIG) // 256):
            options = [(opt.URI_PATH, b"plain"), (opt.BLOCK2, uint_bytes(num << 4 | 4))]
            datagram = encode_parts(CON, status.GET, 500 + num, b"\x0c", options, b"")
            reply = decode(await device.request(datagram, ports[num % 2]))
            assert reply.code == status.CONTENT
            etags.add(dict(reply.options)[opt.ETAG])
            body += reply.payload
        assert body == BIG
        assert len(etags) == 1
    finally:
        await device.aclose()
