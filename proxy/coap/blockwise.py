"""Block-wise transfer (RFC 7959) as a layer between the gate and the forwarder.

Each block is its own CoAP request, exchange and MID (RFC 7959 §2.3, §2.4), deduplicated like
any other; this layer sees one :class:`Request` per block and answers it with one
:class:`Response`. The handler it wraps never sees a Block option: it gets whole request bodies
and returns whole representations (or, when asked with ``byte_range``, a slice of one).

Block1 (request bodies, §2.5): each block is appended to a transfer in a :class:`BlockStore`
(proxy/state/blocks.py; in Redis with ``--redis-url``, so the next block may reach another
replica) and answered 2.31 Continue with its Block1 echoed (§2.3); the last block completes the
body, which goes upstream in one call, and its answer carries Block1 (and Block2 when it is
itself larger than one block, §3.3). 4.08 on a gap or mismatch (§2.9.2), 4.13 with Size1 as
soon as Size1 or the running total exceeds ``max_payload`` (§2.9.3, §4).

Block2 (responses, §2.4): nothing larger than ``block_size`` leaves as one payload. The client's
size is used when it asks for a smaller one (early negotiation, block 0; late negotiation, any
NUM); a larger one is answered in ours, from the block holding the requested offset. Every block
of a multi-block representation carries its ETag (the origin's, else 8 bytes of a hash of the
body) so a client assembling blocks from different replicas — or across a change of the
resource — sees a different ETag and starts over (§2.4); block 0 carries Size2 (§4), later
blocks when asked. A GET/FETCH that names a block (Block2 in the request, block 0 included) is
fetched from the origin as a byte range (``Request.byte_range``): an origin serving ranges
leaves no state on any replica. When the origin ignores ranges or names no ETag with them, or
a request without Block2 gets a large answer, the whole body is kept here for a short, bounded
time (``_Bodies``) and the following blocks are cut from it. Block N>0 of any other method is
served from that cache only: the request cannot be run again (4.08 once the body is gone).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import Message, parse_uint, uint_bytes
from proxy.coap.observe import ObserveRoute
from proxy.coap.requests import Request, RequestHandler, Response
from proxy.state.blocks import (
    AppendResult,
    BlockLimits,
    BlockStore,
    BlockStoreUnavailable,
    MemoryBlockStore,
    Outcome,
)

log = logging.getLogger(__name__)

CONTINUE = codes.CONTINUE  # RFC 7959 §2.9.1
REQUEST_ENTITY_INCOMPLETE = codes.REQUEST_ENTITY_INCOMPLETE  # RFC 7959 §2.9.2
_ERROR = codes.BAD_REQUEST  # 4.00 and above: errors carry no payload and are never sliced
_SAFE = frozenset({codes.GET, codes.FETCH})  # may be run again for a later block
# What the handler inside never sees (the contract in docs/ARCHITECTURE.md).
_BLOCKWISE = frozenset({opt.BLOCK1, opt.BLOCK2, opt.SIZE1, opt.SIZE2, opt.REQUEST_TAG})
_M = 0x08
# After the shared block store failed, blocks are reassembled locally this long before the
# store is tried again (as the dedup store, docs/ARCHITECTURE.md).
STORE_RETRY = 1.0
# How long a refused transfer should wait when every reassembly slot is taken (5.03 Max-Age).
BUSY_MAX_AGE = 30
# The Block2 body cache: bounded in entries and bytes, each entry dropped after this long
# without a block being served from it.
BODY_CACHE_ENTRIES = 1024
BODY_CACHE_BYTES = 32 * 1024 * 1024
BODY_CACHE_LIFETIME = 60.0


def szx_for(block_size: int) -> int:
    """SZX of a block size (16 → 0 … 1024 → 6, RFC 7959 §2.2)."""
    if block_size < 16 or block_size > 1024 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two from 16 to 1024, not {block_size}")
    return block_size.bit_length() - 5


@dataclass(slots=True)
class _Blocks:
    """The block-wise options of one request (RFC 7959 §2.1, §4; RFC 9175 §3)."""

    block1: int | None
    block2: int | None
    size1: int | None
    size2: bool
    tags: bytes  # every Request-Tag, length-prefixed: absent and empty tags differ (§3.3)


def _scan(options: list[tuple[int, bytes]]) -> _Blocks | None:
    """None for the common request without any block-wise option (the hot path). Lengths were
    checked by ``interpret`` for the critical Block options; elective ones out of range are
    ignored here as there (RFC 7252 §5.4.1)."""
    if not options or options[-1][0] < opt.BLOCK2:
        return None  # sorted by number: the largest is below every block-wise option
    found: _Blocks | None = None
    for number, value in options:
        if number < opt.BLOCK2 or number not in _BLOCKWISE:
            continue
        if found is None:
            found = _Blocks(None, None, None, False, b"")
        if number == opt.BLOCK2:
            found.block2 = parse_uint(value)
        elif number == opt.BLOCK1:
            found.block1 = parse_uint(value)
        elif number == opt.SIZE1:
            if len(value) <= 4:
                found.size1 = parse_uint(value)
        elif number == opt.SIZE2:
            found.size2 = True
        elif len(value) <= 8:
            found.tags += bytes((len(value),)) + value
    return found


def _merged(
    options: list[tuple[int, bytes]], extra: list[tuple[int, bytes]]
) -> list[tuple[int, bytes]]:
    """``options`` without any number of ``extra``, plus ``extra``, sorted by number (stable, so
    repeated options keep their order)."""
    numbers = {number for number, _ in extra}
    kept = [o for o in options if o[0] not in numbers]
    kept.extend(extra)
    kept.sort(key=lambda o: o[0])
    return kept


def _with_etag(options: list[tuple[int, bytes]], body: bytes) -> list[tuple[int, bytes]]:
    """The representation's options with an ETag: the origin's, or 8 bytes of a hash of the
    body — the same on every replica, so blocks from different replicas can be checked
    (RFC 7959 §2.4; RFC 7252 §5.10.6 leaves how an ETag is made to the server)."""
    if any(number == opt.ETAG for number, _ in options):
        return options
    return _merged(options, [(opt.ETAG, hashlib.blake2b(body, digest_size=8).digest())])


def _whole(response: Response) -> Response:
    """A whole representation as kept and sliced: with its ETag."""
    return Response(response.code, _with_etag(response.options, response.payload), response.payload)


def _has_etag(options: list[tuple[int, bytes]]) -> bool:
    return any(number == opt.ETAG for number, _ in options)


def _block(full: Response, num: int, szx: int, size2: bool) -> Response:
    """Block ``num`` of a whole representation. A NUM past its end is 4.00: RFC 7959 names no
    code for it; 4.00 is what libcoap's and aiocoap's servers answer (RFC 7252 §5.9.2.1)."""
    size = 16 << szx
    body = full.payload
    first = num * size
    if num and first >= len(body):
        return Response(codes.BAD_REQUEST)
    chunk = body[first : first + size]
    more = first + len(chunk) < len(body)
    extra = [(opt.BLOCK2, uint_bytes(num << 4 | (_M if more else 0) | szx))]
    if size2:
        extra.append((opt.SIZE2, uint_bytes(len(body))))
    return Response(full.code, _merged(full.options, extra), chunk)


class _Bodies:
    """Whole representations kept for the blocks that follow block 0, when the origin cannot
    serve ranges (or the method cannot be repeated). Bounded in entries and bytes; an entry
    lives ``lifetime`` seconds after its last use; the least recently used goes first."""

    def __init__(
        self,
        max_entries: int = BODY_CACHE_ENTRIES,
        max_bytes: int = BODY_CACHE_BYTES,
        lifetime: float = BODY_CACHE_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[tuple[str, ...], tuple[float, Response]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._lifetime = lifetime
        self._clock = clock
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, ...]) -> Response | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if entry[0] <= now:
            self._pop(key)
            return None
        self._entries[key] = (now + self._lifetime, entry[1])
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: tuple[str, ...], response: Response) -> None:
        size = len(response.payload)
        if size > self._max_bytes:
            return
        self._pop(key)
        now = self._clock()
        while self._entries and (
            len(self._entries) >= self._max_entries
            or self.bytes + size > self._max_bytes
            or next(iter(self._entries.values()))[0] <= now
        ):
            self._pop(next(iter(self._entries)))
        self._entries[key] = (now + self._lifetime, response)
        self.bytes += size

    def _pop(self, key: tuple[str, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry[1].payload)


class BlockwiseHandler:
    """RFC 7959 around any :class:`RequestHandler` (module docstring)."""

    def __init__(
        self,
        inner: RequestHandler,
        *,
        block_size: int = 1024,
        max_payload: int = 65536,
        store: BlockStore | None = None,
        bodies: _Bodies | None = None,
    ) -> None:
        self._inner = inner
        self._szx = szx_for(block_size)
        self._block_size = block_size
        self._max_payload = max_payload
        # Redis down: blocks are reassembled in this process meanwhile (a block reaching
        # another replica then gets 4.08 and the client starts over).
        self._local = MemoryBlockStore(BlockLimits(max_body=max_payload))
        self._store: BlockStore = store if store is not None else self._local
        self._bodies = bodies if bodies is not None else _Bodies()
        self._store_down_until = 0.0  # Redis down: local reassembly until then (retry 1 s)

    @property
    def inner(self) -> RequestHandler:
        return self._inner

    def observe_route(self, request: Request) -> ObserveRoute | None:
        """The wrapped handler's answer (RFC 7641): notifications run through :meth:`handle`
        like any GET, so one larger than a block carries its first block (RFC 7959 §2.6)."""
        ask = getattr(self._inner, "observe_route", None)
        return ask(request) if ask is not None else None

    async def acknowledge(self, request: Request, etag: bytes) -> int:
        ask = getattr(self._inner, "acknowledge", None)
        if ask is None:
            return 404
        status: int = await ask(request, etag)
        return status

    def needs_claim(self, request: Request) -> bool:
        """The wrapped handler decides for whatever is forwarded. Two kinds of block never are:
        a Block1 block with M set (answered 2.31; its append is idempotent by offset, so a
        duplicate reaching another replica is harmless and answered 2.31 again) and block N>0
        of a method that cannot be repeated (served from the cache, or 4.08)."""
        blocks = _scan(request.message.options)
        if blocks is not None:
            if blocks.block1 is not None:
                if blocks.block1 & _M:
                    return False
            elif blocks.block2 and blocks.block2 >> 4 and request.method not in _SAFE:
                return False
        return self._inner.needs_claim(request)

    def answer_now(self, request: Request) -> Response | None:
        """The wrapped handler's immediate answer to a request with no block options, when it
        fits one block; anything block-wise (or larger) goes through :meth:`handle`."""
        if _scan(request.message.options) is not None:
            return None
        response = self._inner.answer_now(request)
        if response is None or len(response.payload) > self._block_size:
            return None
        return response

    async def handle(self, request: Request) -> Response:
        blocks = _scan(request.message.options)
        if blocks is None:
            response = await self._inner.handle(request)
            if len(response.payload) <= self._block_size:
                return response
            return self._first_block(request, response, self._szx)
        if blocks.size1 is not None and blocks.size1 > self._max_payload:
            return self._too_large()
        if blocks.block1 is not None:
            return await self._block1(request, blocks)
        return await self._block2(request, blocks)

    # -- Block1 -------------------------------------------------------------------------------

    async def _block1(self, request: Request, blocks: _Blocks) -> Response:
        value = blocks.block1
        assert value is not None
        num, more, szx = value >> 4, bool(value & _M), value & 0x07
        size = 16 << szx
        payload = request.message.payload
        # §2.3: a block with M set is exactly the block size; the last one at most that.
        if (more and len(payload) != size) or len(payload) > size:
            return Response(codes.BAD_REQUEST)
        if num == 0 and not more:
            body = payload  # the whole body in one block: nothing to keep
        else:
            result = await self._append(request, blocks, num * size, payload, last=not more)
            outcome = result.outcome
            if outcome is Outcome.CONTINUE and more:
                return Response(CONTINUE, [(opt.BLOCK1, uint_bytes(value))])
            if outcome is Outcome.TOO_LARGE:
                return self._too_large()
            if outcome is Outcome.BUSY:
                return Response(
                    codes.SERVICE_UNAVAILABLE, [(opt.MAX_AGE, uint_bytes(BUSY_MAX_AGE))]
                )
            if outcome is not Outcome.COMPLETE:
                return Response(REQUEST_ENTITY_INCOMPLETE)
            body = result.body
        response = await self._inner.handle(self._inward(request, body))
        if response.code >= _ERROR:
            return response
        echo = [(opt.BLOCK1, uint_bytes(num << 4 | szx))]
        if blocks.block2 is not None or len(response.payload) > self._block_size:
            # §3.3: the answer to the last block is itself block-wise when large; the client
            # may ask its size with Block2 in that request (early negotiation, §2.4).
            szx2 = self._szx if blocks.block2 is None else min(blocks.block2 & 0x07, self._szx)
            response = self._first_block(request, response, szx2)
        # A new Response: the inner handler may hand out a shared one (discovery's).
        return Response(response.code, _merged(response.options, echo), response.payload)

    async def _append(
        self, request: Request, blocks: _Blocks, offset: int, data: bytes, *, last: bool
    ) -> AppendResult:
        who = self._who(request)
        transfer = hashlib.blake2b(
            b"\0".join((who.encode(), bytes((request.method,)), self._uri(request).encode()))
            + b"\0"
            + blocks.tags,
            digest_size=16,
        ).hexdigest()
        cf = request.content_format
        fingerprint = b"" if cf is None else b"c" + uint_bytes(cf)
        if self._store_down_until and time.monotonic() < self._store_down_until:
            return await self._local.append(transfer, who, offset, data, fingerprint, last)
        try:
            result = await self._store.append(transfer, who, offset, data, fingerprint, last)
        except BlockStoreUnavailable as exc:
            if not self._store_down_until:
                log.warning("block store unavailable, reassembling in this process: %s", exc)
            self._store_down_until = time.monotonic() + STORE_RETRY
            return await self._local.append(transfer, who, offset, data, fingerprint, last)
        if self._store_down_until:
            log.info("block store reachable again")
            self._store_down_until = 0.0
        return result

    def _too_large(self) -> Response:
        return Response(
            codes.REQUEST_ENTITY_TOO_LARGE, [(opt.SIZE1, uint_bytes(self._max_payload))]
        )

    # -- Block2 -------------------------------------------------------------------------------

    async def _block2(self, request: Request, blocks: _Blocks) -> Response:
        value = blocks.block2
        if value is None:
            num, szx = 0, self._szx
        else:
            num, szx = value >> 4, value & 0x07
            if szx > self._szx:
                # §2.4: a smaller size than asked; NUM then names our block holding the first
                # byte the client asked for.
                num <<= szx - self._szx
                szx = self._szx
        if num == 0 and (value is None or request.method not in _SAFE):
            # A request without Block2 (the common case: no Range header on the hot path), or
            # one that cannot be asked for in pieces: the whole answer.
            response = await self._inner.handle(self._inward(request))
            if response.code >= _ERROR or (
                value is None and len(response.payload) <= self._block_size
            ):
                return response
            return self._first_block(request, response, szx)
        key = self._cache_key(request)
        if num:
            kept = self._bodies.get(key)
            if kept is not None:
                return _block(kept, num, szx, blocks.size2)
            if request.method not in _SAFE:
                return Response(REQUEST_ENTITY_INCOMPLETE)
        return await self._ranged(request, key, num, szx, blocks.size2)

    async def _ranged(
        self, request: Request, key: tuple[str, ...], num: int, szx: int, size2: bool
    ) -> Response:
        """Block ``num`` of a GET/FETCH asked of the origin as a byte range: an origin that
        serves ranges (206 with an ETag) leaves no state here, on any replica."""
        size = 16 << szx
        first = num * size
        ranged = self._inward(request, byte_range=(first, first + size - 1))
        response = await self._inner.handle(ranged)
        whole = False
        if response.code == codes.BAD_OPTION:
            # The origin's 416 (the forwarder's contract): the range lies past the end. For
            # block 0 the representation is empty: ask for it whole.
            if num:
                return Response(codes.BAD_REQUEST)
            whole = True
        elif response.code >= _ERROR:
            return response
        elif response.size is not None:
            if _has_etag(response.options):
                if first >= response.size:
                    return Response(codes.BAD_REQUEST)
                chunk = response.payload[:size]
                more = first + len(chunk) < response.size
                extra = [(opt.BLOCK2, uint_bytes(num << 4 | (_M if more else 0) | szx))]
                if size2 or num == 0:
                    extra.append((opt.SIZE2, uint_bytes(response.size)))
                return Response(response.code, _merged(response.options, extra), chunk)
            # A slice without an ETag cannot be checked against the other blocks (whose ETag
            # is made from the whole body): fetch the whole body instead.
            whole = True
        if whole:
            response = await self._inner.handle(self._inward(request))
            if response.code >= _ERROR:
                return response
        if num == 0:
            return self._first_block(request, response, szx)
        full = _whole(response)
        if len(full.payload) > first + size:
            self._bodies.put(key, full)
        return _block(full, num, szx, size2)

    def _first_block(self, request: Request, response: Response, szx: int) -> Response:
        """Block 0 of a whole representation; kept for the blocks after it when there are any
        (a later block may reach this replica again, or the origin may not serve ranges)."""
        if len(response.payload) <= 16 << szx:
            block = uint_bytes(szx)  # NUM 0, M 0: the client asked with Block2
            return Response(
                response.code, _merged(response.options, [(opt.BLOCK2, block)]), response.payload
            )
        full = _whole(response)
        self._bodies.put(self._cache_key(request), full)
        return _block(full, 0, szx, size2=True)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _who(request: Request) -> str:
        if request.identity is not None:
            return "id:" + request.identity
        return f"{request.peer[0]}:{request.peer[1]}"

    @staticmethod
    def _uri(request: Request) -> str:
        return request.path + "?" + "&".join(request.queries)

    def _cache_key(self, request: Request) -> tuple[str, ...]:
        key: tuple[str, ...] = (self._who(request), str(request.method), self._uri(request))
        if request.method == codes.FETCH:
            # RFC 8132 §2: a FETCH's payload is part of what it asks for.
            key += (hashlib.blake2b(request.message.payload, digest_size=16).hexdigest(),)
        return key

    @staticmethod
    def _inward(
        request: Request, payload: bytes | None = None, byte_range: tuple[int, int] | None = None
    ) -> Request:
        """The request as the wrapped handler sees it: no block-wise option, the whole body."""
        message = request.message
        inner = Message(
            message.mtype,
            message.code,
            message.mid,
            message.token,
            [o for o in message.options if o[0] not in _BLOCKWISE],
            message.payload if payload is None else payload,
        )
        return Request(
            request.method,
            request.path,
            request.queries,
            inner,
            request.peer,
            request.content_format,
            request.accept,
            request.identity,
            byte_range,
        )

    async def drain(self) -> None:
        """At shutdown: the wrapped handler's drain, then the block store is closed."""
        drain = getattr(self._inner, "drain", None)
        if drain is not None:
            await drain()
        await self._store.close()
        if self._store is not self._local:
            await self._local.close()
