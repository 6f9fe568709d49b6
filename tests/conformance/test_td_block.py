"""TD_COAP_BLOCK_01–06 (ETSI CoAP#4, block.yml; RFC 7959) through the proxy, on the wire.

The block exchanges are driven datagram by datagram (every Block1/Block2 option of every answer
is a check line of the TD); the same transfers then run with libcoap's coap-client (``-b``) and
aiocoap-client (which goes block-wise by itself above 1 KB), and must deliver every byte.
GET /large runs twice: once with an origin that honours ``Range: bytes=`` and once with one
that always sends the whole body (issue 13 §2: the proxy serves both).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from proxy.coap.codec import Message
from proxy.server import RunningProxy
from tests.conformance import wire as w
from tests.conformance.checks import Checks
from tests.conformance.origin import LARGE_ANSWER, LARGE_BODY, OriginState
from tests.conformance.rig import BLOCK_SIZE, running_proxy
from tests.conformance.wire import Block, Wire
from tests.support.clients import aiocoap_client, coap_client

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="session")]

POLICY = """
[[route]]
path = "/large"
methods = ["GET"]
target = "/large"

[[route]]
path = "/large-update"
methods = ["GET", "PUT"]
target = "/large-update"

[[route]]
path = "/large-create"
methods = ["POST"]
target = "/large-create"

[[route]]
path = "/large-create/new"
methods = ["GET"]
target = "/large-create/new"

[[route]]
path = "/large-post"
methods = ["POST"]
target = "/large-post"
"""

TEXT = [(w.CONTENT_FORMAT, w.uint(0))]
# Enough requests for the 16-byte case (2500 / 16 = 157 blocks) and then some: a proxy that
# never ends a transfer must fail the test, not hang it.
MAX_BLOCKS = 200
_MIDDLE = "middle blocks: NUM i, M 1, SZX kept, full size"
_LAST = "last block: NUM n, M 0, payload <= block size"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proxy(
    tmp_path_factory: pytest.TempPathFactory, origin: tuple[OriginState, str]
) -> AsyncIterator[RunningProxy]:
    async with running_proxy(tmp_path_factory.mktemp("block"), POLICY, origin[1]) as running:
        yield running


@pytest.fixture
def state(origin: tuple[OriginState, str]) -> AsyncIterator[OriginState]:
    yield origin[0]
    origin[0].ranges = True


def url(proxy: RunningProxy, path: str) -> str:
    host, port = proxy.address
    return f"coap://{host}:{port}{path}"


def _variant(ranges: bool) -> str:
    return "[origin with Range]" if ranges else "[origin without Range]"


async def _block2_loop(
    c: Checks,
    wire: Wire,
    method: int,
    path: str,
    start: int,
    szx: int,
    *,
    code: int,
    middle: str,
    last: str,
) -> tuple[bytes, list[Message]]:
    """Ask for blocks ``start``, ``start+1``, … with SZX ``szx`` until M = 0 (RFC 7959 §2.4);
    check NUM/M/SZX and size of each; return the bytes and the answers."""
    body = b""
    answers: list[Message] = []
    num = start
    while len(answers) < MAX_BLOCKS:
        _mid, _tok, first = await wire.exchange(
            method, path, options=[(w.BLOCK2, Block(num, False, szx).encode())]
        )
        answer = await wire.response(first)
        answers.append(answer)
        got = w.block(answer, w.BLOCK2)
        if answer.code != code or got is None:
            c.check(
                middle if got is None or got.more else last,
                False,
                f"block {num}: {answer}",
            )
            break
        body += answer.payload
        if got.more:
            c.check(
                middle,
                got.num == num and got.szx == szx and len(answer.payload) == got.size,
                f"asked {num} szx {szx}, got {got} with {len(answer.payload)} bytes",
            )
            num += 1
            continue
        c.check(
            last,
            got.num == num and got.szx == szx and 0 < len(answer.payload) <= got.size,
            f"asked {num}, got {got} with {len(answer.payload)} bytes",
        )
        break
    return body, answers


async def _early_get(c: Checks, wire: Wire, szx: int) -> tuple[bytes, list[Message]]:
    """TD_COAP_BLOCK_01/06 steps 2–7: Block2 (NUM 0, M 0, SZX desired) from the start."""
    _mid, _tok, first = await wire.exchange(
        w.GET, "/large", options=[(w.BLOCK2, Block(0, False, szx).encode())]
    )
    first = await wire.response(first)
    got = w.block(first, w.BLOCK2)
    c.check(
        "block 0: 2.05 with Block2 NUM 0, M 1",
        first.code == w.CONTENT and got is not None and got.num == 0 and got.more,
        f"{first} block2={got}",
    )
    if got is None:
        return first.payload, [first]
    size_label = (
        "block 0: SZX 0, payload = 16 bytes"
        if szx == 0
        else "block 0: SZX <= desired, payload = 2**(SZX+4)"
    )
    c.check(
        size_label,
        got.szx <= szx and len(first.payload) == got.size,
        f"{got}, {len(first.payload)} bytes",
    )
    labels = (
        (
            "middle blocks: NUM i, M 1, SZX 0, 16 bytes",
            "last block: NUM n, M 0, payload <= 16 bytes",
        )
        if szx == 0
        else ("middle blocks: NUM i, M 1, SZX kept, full size", _LAST)
    )
    rest, answers = await _block2_loop(
        c, wire, w.GET, "/large", 1, got.szx, code=w.CONTENT, middle=labels[0], last=labels[1]
    )
    return first.payload + rest, [first, *answers]


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
async def test_td_coap_block_01(
    wire: Wire, proxy: RunningProxy, state: OriginState, tmp_path: Path, ranges: bool
) -> None:
    c = Checks("TD_COAP_BLOCK_01", _variant(ranges))
    state.ranges = ranges
    body, answers = await _early_get(c, wire, 4)
    c.check(
        "blocks reassemble the resource (no gap, right order)",
        body == LARGE_BODY,
        f"{len(body)} bytes, first difference at {_first_difference(body, LARGE_BODY)}",
    )
    c.check(
        "no datagram over the block size",
        all(len(a.payload) <= BLOCK_SIZE for a in answers),
        [len(a.payload) for a in answers],
    )
    out = tmp_path / "large"
    run = await coap_client("-b", "256", "-o", str(out), url(proxy, "/large"))
    c.check(
        "coap-client -b 256 displays the whole resource",
        out.exists() and out.read_bytes() == LARGE_BODY,
        run.stdout[-600:],
    )
    c.done()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
async def test_td_coap_block_02(
    wire: Wire, proxy: RunningProxy, state: OriginState, tmp_path: Path, ranges: bool
) -> None:
    c = Checks("TD_COAP_BLOCK_02", _variant(ranges))
    state.ranges = ranges
    _mid, _tok, first = await wire.exchange(w.GET, "/large")
    first = await wire.response(first)
    got = w.block(first, w.BLOCK2)
    c.check(
        "first answer: 2.05 with Block2 NUM 0, M 1",
        first.code == w.CONTENT and got is not None and got.num == 0 and got.more,
        f"{len(first.payload)}-byte payload, options {first.options}",
    )
    des = got.szx if got is not None else 6
    c.check(
        "first answer: payload = 2**(SZX+4) (DES_SZX)",
        got is not None and len(first.payload) == got.size <= BLOCK_SIZE,
        f"{got}, {len(first.payload)} bytes",
    )
    # The client switches to 256-byte blocks: the next block is k = 2**(DES_SZX - ACT_SZX).
    act = min(4, des)
    k = 1 << (des - act)
    _mid, _tok, switched = await wire.exchange(
        w.GET, "/large", options=[(w.BLOCK2, Block(k, False, act).encode())]
    )
    switched = await wire.response(switched)
    sw = w.block(switched, w.BLOCK2)
    c.check(
        "switch to smaller SZX: NUM k = 2**(DES-ACT) answered, M 1, full",
        switched.code == w.CONTENT
        and sw is not None
        and (sw.num, sw.more, sw.szx) == (k, True, act)
        and len(switched.payload) == sw.size,
        f"asked NUM {k} SZX {act}: {switched}, block2={sw}",
    )
    body = first.payload[: k * (1 << (act + 4))] + switched.payload
    if sw is not None and sw.more:
        rest, _answers = await _block2_loop(
            c, wire, w.GET, "/large", k + 1, act, code=w.CONTENT, middle=_MIDDLE, last=_LAST
        )
        body += rest
    c.check(
        "blocks reassemble the resource",
        body == LARGE_BODY,
        f"{len(body)} bytes, first difference at {_first_difference(body, LARGE_BODY)}",
    )
    out = tmp_path / "large"
    run = await coap_client("-o", str(out), url(proxy, "/large"))
    c.check(
        "coap-client (no -b) displays the whole resource",
        out.exists() and out.read_bytes() == LARGE_BODY,
        f"{out.stat().st_size if out.exists() else 'no'} bytes; {run.stdout[-400:]}",
    )
    c.done()


async def _block1_upload(
    c: Checks,
    wire: Wire,
    method: int,
    path: str,
    body: bytes,
    szx: int,
    *,
    first_label: str,
    middle_label: str,
    continue_codes: tuple[int, ...],
) -> Message | None:
    """Send ``body`` in Block1 blocks (RFC 7959 §2.5) and check each 2.31; follow a smaller
    SZX if the server asks for one. Returns the answer to the last block."""
    token = w.next_token()
    offset, num, current = 0, 0, szx
    while offset < len(body):
        size = 1 << (current + 4)
        chunk = body[offset : offset + size]
        more = offset + size < len(body)
        _mid, _tok, answer = await wire.exchange(
            method,
            path,
            token=token,
            options=[(w.BLOCK1, Block(num, more, current).encode()), *TEXT],
            payload=chunk,
        )
        answer = await wire.response(answer)
        got = w.block(answer, w.BLOCK1)
        if not more:
            return answer
        label = first_label if num == 0 else middle_label
        ok = (
            answer.code in continue_codes
            and got is not None
            and got.num == num
            and got.more == (answer.code == w.CONTINUE)
            and got.szx <= current
        )
        c.check(label, ok, f"block {num}: {answer}, block1={got}")
        if not ok or got is None:
            return None
        offset += size
        if got.szx < current:  # the server asked for smaller blocks: go on from there
            current = got.szx
        num = offset >> (current + 4)
    return None


def _check_last_block1(
    c: Checks, label: str, answer: Message | None, code: int, body: bytes, szx: int
) -> None:
    if answer is None:
        return
    got = w.block(answer, w.BLOCK1)
    last = (len(body) - 1) >> (szx + 4)
    c.check(
        label,
        answer.code == code and got is not None and (got.num, got.more) == (last, False),
        f"{answer}, block1={got} (expected NUM {last})",
    )


async def test_td_coap_block_03(
    wire: Wire, proxy: RunningProxy, state: OriginState, tmp_path: Path
) -> None:
    c = Checks("TD_COAP_BLOCK_03")
    answer = await _block1_upload(
        c,
        wire,
        w.PUT,
        "/large-update",
        LARGE_BODY,
        4,
        first_label="block 0: 2.31 (M 1) or 2.04 (M 0) with Block1 NUM 0, SZX <= desired",
        middle_label="middle blocks: 2.31/2.04 with Block1 NUM i, SZX kept",
        continue_codes=(w.CONTINUE, w.CHANGED),
    )
    _check_last_block1(
        c, "last block: 2.04 with Block1 NUM n, M 0", answer, w.CHANGED, LARGE_BODY, 4
    )
    puts = [r.body for r in state.calls("/large-update") if r.method == "PUT"]
    c.check("origin got the whole body once", puts == [LARGE_BODY], [len(body) for body in puts])
    upload = tmp_path / "upload"
    upload.write_bytes(LARGE_BODY[::-1])
    run = await coap_client("-b", "256", "-m", "put", "-t", "0", "-f", str(upload),
                            url(proxy, "/large-update"))  # fmt: skip
    c.check(
        "coap-client -b 256 PUT succeeds, origin got its body",
        run.codes[-1:] == ["2.04"] and state.large_update == LARGE_BODY[::-1],
        f"codes {run.codes}, origin has {len(state.large_update)} bytes",
    )
    upload.write_bytes(LARGE_BODY.upper() + b"!")
    run = await aiocoap_client(
        "-m", "PUT", "--content-format", "text/plain;charset=utf-8",
        "--payload", f"@{upload}", url(proxy, "/large-update"),
    )  # fmt: skip
    c.check(
        "aiocoap-client PUT (automatic Block1) succeeds, origin got its body",
        "2.04" in run.codes and state.large_update == LARGE_BODY.upper() + b"!",
        f"codes {run.codes}, origin has {len(state.large_update)} bytes; {run.stderr[-300:]}",
    )
    c.done()


async def test_td_coap_block_04(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_BLOCK_04")
    answer = await _block1_upload(
        c,
        wire,
        w.POST,
        "/large-create",
        LARGE_BODY,
        4,
        first_label="block 0: 2.31 with Block1 NUM 0, M 1, SZX <= desired",
        middle_label="middle blocks: 2.31 with Block1 NUM i, M 1, SZX kept",
        continue_codes=(w.CONTINUE,),
    )
    _check_last_block1(
        c, "last block: 2.01 with Block1 NUM n, M 0", answer, w.CREATED, LARGE_BODY, 4
    )
    if answer is not None:
        location = w.texts(answer, w.LOCATION_PATH)
        c.check(
            "Location-Path = large-create, one segment; no '/'",
            len(location) == 2
            and location[0] == "large-create"
            and all("/" not in seg and seg for seg in location),
            location,
        )
    posts = [r.body for r in state.calls("/large-create")]
    c.check("origin got the whole body once", posts == [LARGE_BODY], [len(body) for body in posts])
    # Optional step of the TD: GET the new location (block-wise, it is 2.5 KB).
    _mid, _tok, first = await wire.exchange(
        w.GET, "/large-create/new", options=[(w.BLOCK2, Block(0, False, 6).encode())]
    )
    first = await wire.response(first)
    body = first.payload
    got = w.block(first, w.BLOCK2)
    num = 1
    while got is not None and got.more and num < MAX_BLOCKS:
        _mid, _tok, nxt = await wire.exchange(
            w.GET, "/large-create/new", options=[(w.BLOCK2, Block(num, False, got.szx).encode())]
        )
        nxt = await wire.response(nxt)
        body += nxt.payload
        got = w.block(nxt, w.BLOCK2)
        num += 1
    c.check(
        "GET on the new location returns the body",
        first.code == w.CONTENT and body == LARGE_BODY,
        f"{first.code >> 5}.{first.code & 31:02d}, {len(body)} bytes",
    )
    c.done()


async def test_td_coap_block_05(
    wire: Wire, proxy: RunningProxy, state: OriginState, tmp_path: Path
) -> None:
    c = Checks("TD_COAP_BLOCK_05")
    answer = await _block1_upload(
        c,
        wire,
        w.POST,
        "/large-post",
        LARGE_BODY,
        4,
        first_label="request blocks: 2.31 with Block1 NUM i, M 1",
        middle_label="request blocks: 2.31 with Block1 NUM i, M 1",
        continue_codes=(w.CONTINUE,),
    )
    _check_last_block1(
        c,
        "last request block: 2.04 with Block1 NUM n, M 0",
        answer,
        w.CHANGED,
        LARGE_BODY,
        4,
    )
    body = b""
    if answer is not None:
        got = w.block(answer, w.BLOCK2)
        c.check(
            "last request block: Block2 NUM 0, M 1, full payload",
            got is not None
            and (got.num, got.more) == (0, True)
            and len(answer.payload) == got.size <= BLOCK_SIZE,
            f"block2={got}, {len(answer.payload)} bytes",
        )
        if got is not None and got.more:
            # Retrieve the rest in 256-byte blocks: k = 2**(rDES_SZX - rACT_SZX).
            act = min(4, got.szx)
            k = 1 << (got.szx - act)
            rest, _answers = await _block2_loop(
                c,
                wire,
                w.POST,
                "/large-post",
                k,
                act,
                code=w.CHANGED,
                middle="response blocks: 2.04 with Block2 NUM i, SZX kept",
                last="last response block: M 0, payload <= block size",
            )
            body = answer.payload[: k << (act + 4)] + rest
        else:
            body = answer.payload
    c.check(
        "response blocks reassemble the answer",
        body == LARGE_ANSWER,
        f"{len(body)} bytes, first difference at {_first_difference(body, LARGE_ANSWER)}",
    )
    posts = [r.body for r in state.calls("/large-post")]
    c.check(
        "origin got the whole request body once",
        posts == [LARGE_BODY],
        [len(body) for body in posts],
    )
    upload = tmp_path / "upload"
    upload.write_bytes(LARGE_BODY)
    run = await aiocoap_client(
        "-m", "POST", "--content-format", "text/plain;charset=utf-8",
        "--payload", f"@{upload}", url(proxy, "/large-post"),
    )  # fmt: skip
    c.check(
        "aiocoap-client POST gets the whole answer",
        LARGE_ANSWER.decode() in run.stdout,
        f"codes {run.codes}; {len(run.stdout)} chars out; {run.stderr[-300:]}",
    )
    c.done()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
async def test_td_coap_block_06(
    wire: Wire, proxy: RunningProxy, state: OriginState, tmp_path: Path, ranges: bool
) -> None:
    c = Checks("TD_COAP_BLOCK_06", _variant(ranges))
    state.ranges = ranges
    body, _answers = await _early_get(c, wire, 0)
    c.check(
        "blocks reassemble the resource (no gap, right order)",
        body == LARGE_BODY,
        f"{len(body)} bytes, first difference at {_first_difference(body, LARGE_BODY)}",
    )
    out = tmp_path / "large"
    run = await coap_client("-b", "16", "-o", str(out), url(proxy, "/large"), timeout=20)
    c.check(
        "coap-client -b 16 displays the whole resource",
        out.exists() and out.read_bytes() == LARGE_BODY,
        run.stdout[-400:],
    )
    c.done()


def _first_difference(a: bytes, b: bytes) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))
