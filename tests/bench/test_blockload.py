"""Scenario B's parts: the byte-range origin, the block-wise load generator (against libcoap's
example server and against servers that lie), and the memory estimate per transfer."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.blockload import (
    BlockConfig,
    BlockResult,
    block_request,
    block_value,
    fetch_once,
    parse_block,
    resource_body,
    run_blocks,
    szx_of,
)
from bench.harness import block_memory
from bench.loadgen import path_options
from bench.origin import UNSATISFIABLE, parse_range
from bench.services import Service, coap_ready, free_port, tcp_ready, which
from proxy.coap import codec
from proxy.coap.options import BLOCK2, ETAG, SIZE2, URI_PATH

ROOT = Path(__file__).resolve().parents[2]
SIZE = 8 * 1024  # small: the rules are the same as for 256 KiB


# --- pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (b"bytes=0-1023", 4096, (0, 1023)),
        (b"bytes=1024-2047", 4096, (1024, 2047)),
        (b"bytes=4000-9999", 4096, (4000, 4095)),  # last clipped to the end
        (b"bytes=1024-", 4096, (1024, 4095)),
        (b"bytes=-100", 4096, (3996, 4095)),  # suffix
        (b"bytes=-9999", 4096, (0, 4095)),
        (b"bytes=4096-", 4096, UNSATISFIABLE),  # starts at the end: 416
        (b"bytes=5000-6000", 4096, UNSATISFIABLE),
        (b"bytes=-0", 4096, UNSATISFIABLE),
        (b"bytes=10-5", 4096, None),  # invalid: ignored, whole body
        (b"bytes=0-1,5-9", 4096, None),  # several ranges: not served, whole body
        (b"items=0-1", 4096, None),
        (b"bytes=-", 4096, None),
    ],
)
def test_origin_range_rows(header: bytes, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("block_size", "szx"), [(16, 0), (32, 1), (64, 2), (128, 3), (256, 4), (512, 5), (1024, 6)]
)
def test_szx_of(block_size: int, szx: int) -> None:
    assert szx_of(block_size) == szx


@pytest.mark.parametrize("block_size", [0, 8, 100, 2048])
def test_szx_of_refuses_sizes_rfc_7959_has_no_szx_for(block_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        szx_of(block_size)


@pytest.mark.parametrize(
    ("num", "more", "szx", "value"),
    [(0, False, 6, b"\x06"), (0, True, 6, b"\x0e"), (5, False, 6, b"\x56"),
     (255, False, 6, b"\x0f\xf6"), (4096, True, 0, b"\x01\x00\x08")],
)  # fmt: skip
def test_block_option_value(num: int, more: bool, szx: int, value: bytes) -> None:
    assert block_value(num, more, szx) == value
    assert parse_block(value) == (num, more, szx)


def test_block_request_decodes_as_con_get_with_path_and_block2() -> None:
    data = block_request(0x1234, b"\x00\x00\x00\x07", path_options("/a/blob"), 3, 6)
    message = codec.decode(data)
    assert (message.mtype, message.code, message.mid) == (codec.CON, 1, 0x1234)
    assert message.token == b"\x00\x00\x00\x07"
    assert message.options == [(URI_PATH, b"a"), (URI_PATH, b"blob"), (BLOCK2, b"\x36")]
    assert message.payload == b""


def test_resource_body_is_the_same_everywhere_and_not_compressible() -> None:
    assert resource_body(SIZE) == resource_body(SIZE)
    assert resource_body(SIZE)[:100] == resource_body(100)
    assert len(set(resource_body(SIZE))) > 200


def test_block_memory_separates_the_step_of_the_transfers_from_per_request_growth() -> None:
    # Before: 10 MB. The 8 transfers bring 80 KB at once; requests add 1 MB/s from then on.
    before = 10_000_000
    samples = [(t / 10, before + 80_000 + int(1_000_000 * t / 10)) for t in range(1, 31)]
    memory = block_memory(samples, before, window_start=1.0, window_end=3.0, clients=8)
    assert memory["rss_peak"] == samples[-1][1]
    assert memory["rss_per_transfer"] == pytest.approx((samples[-1][1] - before) / 8)
    assert memory["rss_per_transfer_corrected"] == pytest.approx(10_000, abs=1)
    assert memory["rss_growth_per_second"] == pytest.approx(1_000_000, rel=1e-3)


def test_block_memory_without_samples_in_the_window_gives_no_estimate() -> None:
    memory = block_memory([(0.1, 5)], 4, window_start=1.0, window_end=2.0, clients=2)
    assert memory["rss_per_transfer_corrected"] is None
    assert memory["rss_delta"] == 1


def test_block_results_merge() -> None:
    a = BlockResult(blocks_in_window=3, transfers=1, corrupt=1, block_sizes={1024: 3}, clients=2)
    b = BlockResult(blocks_in_window=4, transfers=2, etag_changes=1, block_sizes={1024: 4, 16: 1})
    a.merge(b)
    assert (a.blocks_in_window, a.transfers, a.corrupt, a.etag_changes) == (7, 3, 1, 1)
    assert a.block_sizes == {1024: 7, 16: 1}


# --- real processes --------------------------------------------------------------------------


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    service = Service(
        "origin",
        [sys.executable, "-m", "bench.origin", "--port", str(port), "--path", "/blob",
         "--size", str(SIZE)],
        tmp_path,
    )  # fmt: skip
    service.start(env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        service.wait_until(lambda: tcp_ready(port), 20.0, "accepting HTTP")
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop()


@pytest.mark.integration
def test_origin_serves_ranges_with_one_etag(origin: str) -> None:
    body = resource_body(SIZE)
    with httpx.Client(base_url=origin) as client:
        whole = client.get("/blob")
        part = client.get("/blob", headers={"Range": "bytes=1024-2047"})
        past = client.get("/blob", headers={"Range": f"bytes={SIZE}-"})
        head = client.head("/blob")
        missing = client.get("/other")
        post = client.post("/blob")
    assert whole.status_code == 200
    assert whole.content == body
    assert whole.headers["accept-ranges"] == "bytes"
    assert part.status_code == 206
    assert part.content == body[1024:2048]
    assert part.headers["content-range"] == f"bytes 1024-2047/{SIZE}"
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{SIZE}"
    assert whole.headers["etag"] == part.headers["etag"] == past.headers["etag"]
    assert whole.headers["etag"].startswith('"')  # strong (RFC 9110 §8.8.3)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(SIZE)
    assert missing.status_code == 404
    assert post.status_code == 405


@pytest.fixture
def libcoap(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    service = Service(
        "libcoap",
        [which("coap-server-notls"), "-A", "127.0.0.1", "-p", str(port), "-v", "0"],
        tmp_path,
    )
    service.start()
    try:
        service.wait_until(lambda: coap_ready(port), 20.0, "answering CoAP")
        upload = tmp_path / "resource.bin"
        upload.write_bytes(resource_body(SIZE))
        subprocess.run(
            [which("coap-client-notls"), "-m", "put", "-b", "1024", "-f", str(upload),
             f"coap://127.0.0.1:{port}/example_data"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        yield port
    finally:
        service.stop()


@pytest.mark.integration
def test_fetch_once_gets_every_byte_block_by_block_from_libcoap(libcoap: int) -> None:
    body, sizes, etag = fetch_once("127.0.0.1", libcoap, "/example_data", 1024)
    assert body == resource_body(SIZE)
    assert sizes == [1024] * (SIZE // 1024)
    assert etag is not None
    body, sizes, _ = fetch_once("127.0.0.1", libcoap, "/example_data", 256)
    assert body == resource_body(SIZE)
    assert sizes == [256] * (SIZE // 256)


@pytest.mark.integration
def test_block_load_against_libcoap_completes_clean_transfers(libcoap: int) -> None:
    config = BlockConfig(
        "127.0.0.1", libcoap, path="/example_data", size=SIZE, clients=4, duration=0.5,
        warmup=0.1, timeout=2.0, port_range=(0, 0),  # kernel-chosen source ports
    )  # fmt: skip
    result = run_blocks(config)
    assert set(result.codes) == {"2.05"}
    assert result.corrupt == result.etag_changes == result.timeouts == 0
    assert result.transfers_in_window > 0
    # A transfer whose last block lands in the window may have begun before it.
    blocks = (result.transfers_in_window - config.clients) * (SIZE // 1024)
    assert result.blocks_in_window >= blocks
    assert result.completed == sum(result.block_sizes.values())
    assert set(result.block_sizes) == {1024}
    assert result.transfers_per_second > 0


# --- servers that lie: the checks count what they must ---------------------------------------


def _lying_server(
    lie: Callable[[int, bytes], tuple[bytes, bytes]],
) -> tuple[int, Callable[[], None]]:
    """A block-wise server on a thread: block ``num`` of resource_body(SIZE), its payload and
    ETag passed through ``lie(num, payload) -> (payload, etag)``."""
    body = resource_body(SIZE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            request = codec.decode(data)
            num, _, szx = parse_block(dict(request.options)[BLOCK2])
            size = 16 << szx
            payload = body[num * size : (num + 1) * size]
            more = (num + 1) * size < len(body)
            payload, etag = lie(num, payload)
            options = [(ETAG, etag), (BLOCK2, block_value(num, more, szx))]
            if num == 0:
                options.append((SIZE2, codec.uint_bytes(len(body))))
            sock.sendto(
                codec.encode_parts(codec.ACK, 0x45, request.mid, request.token, options, payload),
                peer,
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join()
        sock.close()

    return sock.getsockname()[1], close


def _run_against(lie: Callable[[int, bytes], tuple[bytes, bytes]]) -> BlockResult:
    port, close = _lying_server(lie)
    try:
        config = BlockConfig(
            "127.0.0.1", port, path="/x", size=SIZE, clients=2, duration=0.4, warmup=0.05,
            timeout=1.0, port_range=(0, 0),
        )  # fmt: skip
        return run_blocks(config)
    finally:
        close()


def test_an_honest_server_passes_the_checks() -> None:
    result = _run_against(lambda num, payload: (payload, b"e"))
    assert result.corrupt == result.etag_changes == 0
    assert result.transfers > 0


def test_a_wrong_byte_counts_as_corrupt_and_no_transfer_completes() -> None:
    def flip(num: int, payload: bytes) -> tuple[bytes, bytes]:
        if num == 3:
            payload = bytes([payload[0] ^ 1]) + payload[1:]
        return payload, b"e"

    result = _run_against(flip)
    assert result.corrupt > 0
    assert result.transfers == 0


def test_an_etag_that_changes_within_a_transfer_is_counted() -> None:
    result = _run_against(lambda num, payload: (payload, b"e" if num < 4 else b"f"))
    assert result.etag_changes > 0
    assert result.transfers == 0


def test_a_short_block_that_claims_more_is_corrupt() -> None:
    result = _run_against(lambda num, payload: (payload[:-1], b"e"))
    assert result.corrupt > 0
    assert result.transfers == 0
