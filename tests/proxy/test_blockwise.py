"""The block-wise layer (proxy/coap/blockwise.py, RFC 7959) as pure logic: a fake handler
inside stands for the forwarder and its origin (with or without byte ranges), and each test
drives the layer one block — one Request — at a time, the way the endpoint does."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.blockwise import (
    CONTINUE,
    REQUEST_ENTITY_INCOMPLETE,
    BlockwiseHandler,
    _Bodies,
    szx_for,
)
from proxy.coap.codec import CON, Message, parse_uint, uint_bytes
from proxy.coap.requests import Request, Response
from proxy.state.blocks import (
    AppendResult,
    BlockLimits,
    BlockStoreUnavailable,
    MemoryBlockStore,
)

BODY = bytes(range(256)) * 20  # 5120 bytes, every block different
PEER = ("192.0.2.1", 5683)


@dataclass
class Origin:
    """The handler inside: answers GETs with ``body`` (a byte range when ``ranges``), records
    every request it sees, and answers anything else with ``answer``."""

    body: bytes = BODY
    ranges: bool = True
    etag: bytes | None = None  # the origin's ETag, if it names one
    etag_with_ranges: bool = True
    answer: Response | None = None
    seen: list[Request] = field(default_factory=list)
    claims: list[Request] = field(default_factory=list)

    def answer_now(self, request: Request) -> Response | None:
        return None  # everything through handle()

    def needs_claim(self, request: Request) -> bool:
        self.claims.append(request)
        return request.method != status.GET

    async def handle(self, request: Request) -> Response:
        self.seen.append(request)
        if self.answer is not None:
            return self.answer
        options = [(opt.CONTENT_FORMAT, uint_bytes(42))]
        if self.etag is not None:
            options.insert(0, (opt.ETAG, self.etag))
        if request.byte_range is not None and self.ranges:
            first, last = request.byte_range
            if first >= len(self.body):
                return Response(status.BAD_OPTION, size=len(self.body))  # the origin's 416
            if not self.etag_with_ranges:
                options = [o for o in options if o[0] != opt.ETAG]
            return Response(
                status.CONTENT, options, self.body[first : last + 1], size=len(self.body)
            )
        return Response(status.CONTENT, options, self.body)


_mids = iter(range(1, 1_000_000))


def request(
    method: int = status.GET,
    *,
    block1: tuple[int, bool, int] | None = None,
    block2: tuple[int, int] | None = None,
    payload: bytes = b"",
    extra: list[tuple[int, bytes]] | None = None,
    content_format: int | None = None,
    peer: tuple[str, int] = PEER,
    path: str = "/firmware",
) -> Request:
    options = [(opt.URI_PATH, path.strip("/").encode())]
    if content_format is not None:
        options.append((opt.CONTENT_FORMAT, uint_bytes(content_format)))
    if block2 is not None:
        options.append((opt.BLOCK2, uint_bytes(block2[0] << 4 | block2[1])))
    if block1 is not None:
        num, more, szx = block1
        options.append((opt.BLOCK1, uint_bytes(num << 4 | (8 if more else 0) | szx)))
    options += extra or []
    options.sort(key=lambda o: o[0])
    message = Message(CON, method, next(_mids), b"\x01\x02", options, payload)
    return Request(method, path, [], message, peer, content_format)


def option(response: Response, number: int) -> bytes | None:
    values = [v for n, v in response.options if n == number]
    assert len(values) <= 1
    return values[0] if values else None


def block2_of(response: Response) -> tuple[int, bool, int]:
    value = option(response, opt.BLOCK2)
    assert value is not None, response
    block = parse_uint(value)
    return block >> 4, bool(block & 8), block & 7


def block1_of(response: Response) -> tuple[int, bool, int]:
    value = option(response, opt.BLOCK1)
    assert value is not None, response
    block = parse_uint(value)
    return block >> 4, bool(block & 8), block & 7


async def fetch_all(
    layer: BlockwiseHandler, szx: int | None, *, first_with_block2: bool = True
) -> tuple[bytes, set[bytes | None], int]:
    """Fetch every block like a client (RFC 7959 §2.4): returns the body, the ETags seen and
    the largest payload received."""
    first = await layer.handle(
        request(block2=(0, szx) if szx is not None and first_with_block2 else None)
    )
    num, more, used = block2_of(first)
    assert num == 0
    body, etags, largest = first.payload, {option(first, opt.ETAG)}, len(first.payload)
    while more:
        num += 1
        response = await layer.handle(request(block2=(num, used)))
        got, more, used_now = block2_of(response)
        assert (got, used_now) == (num, used)
        body += response.payload
        etags.add(option(response, opt.ETAG))
        largest = max(largest, len(response.payload))
    return body, etags, largest


# -- Block2 ------------------------------------------------------------------------------------


async def test_a_small_answer_to_a_plain_request_is_untouched() -> None:
    origin = Origin(body=b"x" * 1024)
    response = await BlockwiseHandler(origin).handle(request())
    assert response.payload == b"x" * 1024
    assert option(response, opt.BLOCK2) is None
    assert option(response, opt.ETAG) is None


async def test_a_large_answer_goes_out_as_block_0_with_etag_and_size2() -> None:
    response = await BlockwiseHandler(Origin()).handle(request())
    assert block2_of(response) == (0, True, 6)
    assert response.payload == BODY[:1024]
    assert option(response, opt.ETAG) == hashlib.blake2b(BODY, digest_size=8).digest()
    assert option(response, opt.SIZE2) == uint_bytes(len(BODY))
    assert option(response, opt.CONTENT_FORMAT) == uint_bytes(42)
    assert [n for n, _ in response.options] == sorted(n for n, _ in response.options)


async def test_the_origins_etag_is_kept() -> None:
    response = await BlockwiseHandler(Origin(etag=b"v1")).handle(request())
    assert option(response, opt.ETAG) == b"v1"


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256, 512, 1024])
@pytest.mark.parametrize("szx", [None, 0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
async def test_every_block_size_reassembles_and_no_payload_exceeds_ours(
    block_size: int, szx: int | None, ranges: bool
) -> None:
    layer = BlockwiseHandler(Origin(ranges=ranges), block_size=block_size)
    body, etags, largest = await fetch_all(layer, szx)
    assert body == BODY
    assert len(etags) == 1
    assert None not in etags
    wanted = block_size if szx is None else min(block_size, 16 << szx)
    assert largest == wanted


async def test_early_negotiation_uses_the_clients_smaller_size() -> None:
    response = await BlockwiseHandler(Origin()).handle(request(block2=(0, 2)))
    assert block2_of(response) == (0, True, 2)
    assert response.payload == BODY[:64]


async def test_a_larger_size_than_ours_is_answered_in_ours_from_the_same_offset() -> None:
    # §2.4: the client asks NUM 1 of 1024-byte blocks; ours are 256: our block 4.
    response = await BlockwiseHandler(Origin(), block_size=256).handle(request(block2=(1, 6)))
    assert block2_of(response) == (4, True, 4)
    assert response.payload == BODY[1024:1280]


async def test_late_negotiation_a_smaller_size_after_block_0() -> None:
    layer = BlockwiseHandler(Origin())
    await layer.handle(request())
    response = await layer.handle(request(block2=(5, 2)))
    assert block2_of(response) == (5, True, 2)
    assert response.payload == BODY[320:384]


async def test_block_n_is_fetched_as_a_byte_range_by_a_replica_that_never_saw_block_0() -> None:
    origin = Origin(etag=b"v1")
    response = await BlockwiseHandler(origin).handle(request(block2=(2, 6)))
    assert origin.seen[-1].byte_range == (2048, 3071)
    assert block2_of(response) == (2, True, 6)
    assert response.payload == BODY[2048:3072]
    assert option(response, opt.ETAG) == b"v1"
    # The forwarder never sees a Block option.
    assert all(n not in (opt.BLOCK1, opt.BLOCK2) for n, _ in origin.seen[-1].message.options)


async def test_the_last_block_by_range_has_m_clear() -> None:
    response = await BlockwiseHandler(Origin(etag=b"v1")).handle(request(block2=(4, 6)))
    assert block2_of(response) == (4, False, 6)
    assert response.payload == BODY[4096:]


async def test_a_transfer_asked_with_block2_is_all_ranges_and_keeps_nothing() -> None:
    origin = Origin(etag=b"v1")
    bodies = _Bodies()
    body, etags, _ = await fetch_all(BlockwiseHandler(origin, bodies=bodies), 2)
    assert (body, etags) == (BODY, {b"v1"})
    assert [r.byte_range for r in origin.seen] == [(n, n + 63) for n in range(0, len(BODY), 64)]
    assert len(bodies) == 0


async def test_an_empty_representation_asked_with_block2() -> None:
    response = await BlockwiseHandler(Origin(body=b"")).handle(request(block2=(0, 2)))
    assert (response.code, response.payload) == (status.CONTENT, b"")
    assert block2_of(response) == (0, False, 2)


async def test_without_ranges_the_body_is_kept_and_later_blocks_come_from_it() -> None:
    origin = Origin(ranges=False)
    layer = BlockwiseHandler(origin)
    await layer.handle(request())
    calls = len(origin.seen)
    response = await layer.handle(request(block2=(1, 6)))
    assert response.payload == BODY[1024:2048]
    assert len(origin.seen) == calls  # served from the kept body


async def test_a_range_without_etag_is_refetched_whole_so_the_etag_matches_block_0() -> None:
    origin = Origin(etag_with_ranges=False)
    first = await BlockwiseHandler(origin).handle(request())
    other_replica = BlockwiseHandler(origin)
    response = await other_replica.handle(request(block2=(1, 6)))
    assert option(response, opt.ETAG) == option(first, opt.ETAG)
    assert origin.seen[-1].byte_range is None
    assert response.payload == BODY[1024:2048]


async def test_a_changed_representation_shows_a_new_etag_on_the_next_block() -> None:
    # §2.4: block 0 from one replica, block 1 from another after the resource changed: the
    # client sees the ETag change and starts over.
    origin = Origin(ranges=False)
    first = await BlockwiseHandler(origin).handle(request())
    origin.body = BODY[::-1]
    response = await BlockwiseHandler(origin).handle(request(block2=(1, 6)))
    assert option(response, opt.ETAG) != option(first, opt.ETAG)
    assert response.payload == BODY[::-1][1024:2048]


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
@pytest.mark.parametrize("warm", [True, False], ids=["kept", "fresh"])
async def test_a_block_past_the_end_is_4_00(ranges: bool, warm: bool) -> None:
    layer = BlockwiseHandler(Origin(ranges=ranges, etag=b"v"))
    if warm:
        await layer.handle(request())
    response = await layer.handle(request(block2=(5, 6)))
    assert (response.code, response.payload) == (status.BAD_REQUEST, b"")


async def test_errors_pass_through_untouched() -> None:
    origin = Origin(answer=Response(status.NOT_FOUND))
    response = await BlockwiseHandler(origin).handle(request(block2=(3, 6)))
    assert (response.code, response.options) == (status.NOT_FOUND, [])


async def test_block_n_of_a_post_without_the_kept_body_is_4_08_and_not_forwarded() -> None:
    origin = Origin()
    layer = BlockwiseHandler(origin)
    post = request(status.POST, block2=(1, 6))
    response = await layer.handle(post)
    assert response.code == REQUEST_ENTITY_INCOMPLETE
    assert origin.seen == []
    assert layer.needs_claim(post) is False


# -- Block1 ------------------------------------------------------------------------------------


async def send_body(
    layer: BlockwiseHandler,
    body: bytes,
    szx: int,
    *,
    method: int = status.PUT,
    content_format: int | None = 0,
    extra: list[tuple[int, bytes]] | None = None,
    peer: tuple[str, int] = PEER,
) -> list[Response]:
    size = 16 << szx
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    answers = []
    for num, chunk in enumerate(chunks):
        more = num < len(chunks) - 1
        answers.append(
            await layer.handle(
                request(
                    method,
                    block1=(num, more, szx),
                    payload=chunk,
                    content_format=content_format,
                    extra=extra,
                    peer=peer,
                )
            )
        )
    return answers


async def test_blocks_are_continued_then_forwarded_once_whole() -> None:
    origin = Origin(answer=Response(status.CHANGED))
    answers = await send_body(BlockwiseHandler(origin), BODY, 6)
    for num, answer in enumerate(answers[:-1]):
        assert answer.code == CONTINUE
        assert block1_of(answer) == (num, True, 6)
    assert answers[-1].code == status.CHANGED
    assert block1_of(answers[-1]) == (4, False, 6)
    assert len(origin.seen) == 1
    whole = origin.seen[0]
    assert whole.message.payload == BODY
    assert whole.content_format == 0
    assert all(n not in (opt.BLOCK1, opt.SIZE1) for n, _ in whole.message.options)


async def test_a_single_block_is_forwarded_at_once_with_block1_echoed() -> None:
    origin = Origin(answer=Response(status.CHANGED))
    response = await BlockwiseHandler(origin).handle(
        request(status.PUT, block1=(0, False, 6), payload=b"abc")
    )
    assert block1_of(response) == (0, False, 6)
    assert origin.seen[0].message.payload == b"abc"


async def test_a_repeated_block_is_harmless() -> None:
    origin = Origin(answer=Response(status.CHANGED))
    layer = BlockwiseHandler(origin)
    body = BODY[:200]
    first = request(status.PUT, block1=(0, True, 2), payload=body[:64])
    assert (await layer.handle(first)).code == CONTINUE
    again = request(status.PUT, block1=(0, True, 2), payload=body[:64])
    assert (await layer.handle(again)).code == CONTINUE
    for num in (1, 1, 2):
        chunk = body[num * 64 : num * 64 + 64]
        answer = await layer.handle(request(status.PUT, block1=(num, True, 2), payload=chunk))
        assert answer.code == CONTINUE
    last = await layer.handle(request(status.PUT, block1=(3, False, 2), payload=body[192:]))
    assert last.code == status.CHANGED
    assert origin.seen[0].message.payload == body


@pytest.mark.parametrize(
    ("second", "why"),
    [
        pytest.param({"num": 2}, "gap", id="gap"),
        pytest.param({"content_format": 50}, "content-format changed", id="content-format"),
        pytest.param({"extra": [(opt.REQUEST_TAG, b"\x07")]}, "other request", id="request-tag"),
        pytest.param({"peer": ("192.0.2.2", 5683)}, "other peer", id="peer"),
        pytest.param({"path": "/other"}, "other resource", id="path"),
    ],
)
async def test_a_block_that_does_not_continue_the_body_is_4_08(
    second: dict[str, object], why: str
) -> None:
    origin = Origin(answer=Response(status.CHANGED))
    layer = BlockwiseHandler(origin)
    assert (
        await layer.handle(
            request(status.PUT, block1=(0, True, 2), payload=BODY[:64], content_format=0)
        )
    ).code == CONTINUE
    num = second.pop("num", 1)
    arguments: dict[str, object] = {"content_format": 0, **second}
    answer = await layer.handle(
        request(status.PUT, block1=(num, True, 2), payload=BODY[64:128], **arguments)  # type: ignore[arg-type]
    )
    assert (answer.code, answer.payload) == (REQUEST_ENTITY_INCOMPLETE, b""), why
    assert origin.seen == []


async def test_a_block_without_a_transfer_is_4_08() -> None:
    answer = await BlockwiseHandler(Origin()).handle(
        request(status.PUT, block1=(3, False, 2), payload=b"x")
    )
    assert answer.code == REQUEST_ENTITY_INCOMPLETE


async def test_blocks_with_the_same_request_tag_continue() -> None:
    origin = Origin(answer=Response(status.CHANGED))
    answers = await send_body(
        BlockwiseHandler(origin), BODY[:300], 2, extra=[(opt.REQUEST_TAG, b"\x07")]
    )
    assert answers[-1].code == status.CHANGED
    assert origin.seen[0].message.payload == BODY[:300]


async def test_size1_over_the_maximum_is_4_13_at_once() -> None:
    layer = BlockwiseHandler(Origin(), max_payload=1000)
    answer = await layer.handle(
        request(
            status.PUT,
            block1=(0, True, 2),
            payload=BODY[:64],
            extra=[(opt.SIZE1, uint_bytes(70_000))],
        )
    )
    assert answer.code == status.REQUEST_ENTITY_TOO_LARGE
    assert option(answer, opt.SIZE1) == uint_bytes(1000)


async def test_the_running_total_over_the_maximum_is_4_13_and_the_transfer_is_dropped() -> None:
    origin = Origin(answer=Response(status.CHANGED))
    store = MemoryBlockStore(BlockLimits(max_body=1500))
    layer = BlockwiseHandler(origin, max_payload=1500, store=store)
    answers = await send_body(layer, BODY[:3072], 6)
    assert [a.code for a in answers[:2]] == [CONTINUE, status.REQUEST_ENTITY_TOO_LARGE]
    assert option(answers[1], opt.SIZE1) == uint_bytes(1500)
    assert store.transfers == 0
    assert origin.seen == []


async def test_a_block_of_the_wrong_size_is_4_00() -> None:
    answer = await BlockwiseHandler(Origin()).handle(
        request(status.PUT, block1=(0, True, 2), payload=b"short")
    )
    assert answer.code == status.BAD_REQUEST


async def test_block1_and_block2_in_one_exchange() -> None:
    # §3.3: the answer to the last Block1 block is large: Block1 echoed and Block2 block 0;
    # the rest of the answer is asked for with Block2 alone (§2.7) and comes from the kept body.
    answer_body = bytes(reversed(BODY))
    origin = Origin(answer=Response(status.CHANGED, [], answer_body))
    layer = BlockwiseHandler(origin)
    answers = await send_body(layer, BODY[:300], 2, method=status.POST)
    last = answers[-1]
    assert block1_of(last) == (4, False, 2)
    assert block2_of(last) == (0, True, 6)
    assert option(last, opt.SIZE2) == uint_bytes(len(answer_body))
    body = last.payload
    num, more = 0, True
    while more:
        num += 1
        response = await layer.handle(request(status.POST, block2=(num, 6)))
        assert option(response, opt.ETAG) == option(last, opt.ETAG)
        _, more, _ = block2_of(response)
        body += response.payload
    assert body == answer_body
    assert len(origin.seen) == 1


async def test_early_negotiation_in_the_last_block1_block() -> None:
    origin = Origin(answer=Response(status.CHANGED, [], BODY))
    layer = BlockwiseHandler(origin)
    await layer.handle(request(status.POST, block1=(0, True, 2), payload=BODY[:64]))
    last = await layer.handle(
        request(status.POST, block1=(1, False, 2), block2=(0, 1), payload=b"end")
    )
    assert block2_of(last) == (0, True, 1)
    assert last.payload == BODY[:32]


# -- the claim -----------------------------------------------------------------------------------


def test_needs_claim_intermediate_blocks_never_the_rest_as_the_handler_inside() -> None:
    origin = Origin()
    layer = BlockwiseHandler(origin)
    assert layer.needs_claim(request(status.PUT, block1=(0, True, 6))) is False
    assert layer.needs_claim(request(status.PUT, block1=(3, True, 6))) is False
    assert origin.claims == []
    assert layer.needs_claim(request(status.PUT, block1=(3, False, 6))) is True
    assert layer.needs_claim(request(status.GET, block2=(3, 6))) is False
    assert layer.needs_claim(request(status.PUT)) is True
    assert len(origin.claims) == 3


# -- state bounds ----------------------------------------------------------------------------


def test_szx_for_each_block_size() -> None:
    assert [szx_for(16 << n) for n in range(7)] == list(range(7))
    for wrong in (8, 100, 2048):
        with pytest.raises(ValueError, match="power of two"):
            szx_for(wrong)


def test_the_body_cache_is_bounded_in_entries_bytes_and_time() -> None:
    now = [0.0]
    bodies = _Bodies(max_entries=2, max_bytes=100, lifetime=10, clock=lambda: now[0])
    for name in "abc":
        bodies.put((name,), Response(status.CONTENT, [], b"x" * 10))
    assert len(bodies) == 2
    assert bodies.get(("a",)) is None
    bodies.put(("big",), Response(status.CONTENT, [], b"x" * 90))
    assert bodies.bytes <= 100
    bodies.put(("huge",), Response(status.CONTENT, [], b"x" * 101))
    assert bodies.get(("huge",)) is None
    now[0] = 11
    assert bodies.get(("big",)) is None


async def test_junk_blocks_leave_no_state() -> None:
    store = MemoryBlockStore()
    layer = BlockwiseHandler(Origin(), store=store)
    for num in range(1, 200):
        answer = await layer.handle(request(status.PUT, block1=(num, True, 0), payload=b"x" * 16))
        assert answer.code == REQUEST_ENTITY_INCOMPLETE
    assert store.transfers == 0


class _DownStore:
    """A shared store that cannot be reached."""

    def __init__(self) -> None:
        self.calls = 0

    async def append(
        self, transfer: str, peer: str, offset: int, data: bytes, fingerprint: bytes, last: bool
    ) -> AppendResult:
        self.calls += 1
        raise BlockStoreUnavailable("connection refused")

    async def close(self) -> None:
        return None


async def test_with_the_shared_store_down_blocks_are_reassembled_here() -> None:
    origin = Origin(answer=Response(status.CHANGED))
    down = _DownStore()
    answers = await send_body(BlockwiseHandler(origin, store=down), BODY[:300], 2)
    assert answers[-1].code == status.CHANGED
    assert origin.seen[0].message.payload == BODY[:300]
    assert down.calls == 1  # not asked again within the retry interval
