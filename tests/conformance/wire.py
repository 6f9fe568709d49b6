"""Raw CoAP on the wire for the conformance suite: build exact requests, read exact answers.

Option numbers are RFC 7252 §12.2 and RFC 7959 §6 (Block2 23, Block1 27, Size2 28, Size1 60),
written out here so the suite does not lean on the proxy's own tables.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.coap.codec import ACK, CON, Message, encode_parts
from tests.support.coap import RawClient

IF_MATCH = 1
ETAG = 4
IF_NONE_MATCH = 5
LOCATION_PATH = 8
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
LOCATION_QUERY = 20
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
SIZE1 = 60

GET, POST, PUT, DELETE = 1, 2, 3, 4


def code(cls: int, detail: int) -> int:
    return cls << 5 | detail


CONTENT = code(2, 5)
CREATED = code(2, 1)
DELETED = code(2, 2)
VALID = code(2, 3)
CHANGED = code(2, 4)
CONTINUE = code(2, 31)
PRECONDITION_FAILED = code(4, 12)


def code_text(value: int) -> str:
    return f"{value >> 5}.{value & 31:02d}"


def uint(value: int) -> bytes:
    """RFC 7252 §3.2 uint: the shortest big-endian form, zero as no bytes."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def parse_uint(value: bytes) -> int:
    return int.from_bytes(value, "big")


@dataclass(frozen=True)
class Block:
    """RFC 7959 §2.2: NUM, M, SZX; the block size is 2**(SZX+4)."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    def encode(self) -> bytes:
        return uint(self.num << 4 | int(self.more) << 3 | self.szx)

    @classmethod
    def decode(cls, value: bytes) -> Block:
        raw = parse_uint(value)
        return cls(raw >> 4, bool(raw & 0x08), raw & 0x07)


def values(message: Message, number: int) -> list[bytes]:
    return [value for n, value in message.options if n == number]


def one(message: Message, number: int) -> bytes | None:
    found = values(message, number)
    return found[0] if found else None


def block(message: Message, number: int) -> Block | None:
    value = one(message, number)
    return None if value is None else Block.decode(value)


def content_format(message: Message) -> int | None:
    value = one(message, CONTENT_FORMAT)
    return None if value is None else parse_uint(value)


def texts(message: Message, number: int) -> list[str]:
    return [value.decode() for value in values(message, number)]


_mids = itertools.count(0x1000)
_tokens = itertools.count(0x10)


def next_mid() -> int:
    return next(_mids) & 0xFFFF


def next_token(length: int = 4) -> bytes:
    return (next(_tokens) % (1 << (8 * length))).to_bytes(length, "big")


def request_bytes(
    method: int,
    path: str,
    *,
    mid: int,
    token: bytes,
    mtype: int = CON,
    queries: Iterable[str] = (),
    options: Iterable[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> bytes:
    opts = [(URI_PATH, seg.encode()) for seg in path.strip("/").split("/") if seg]
    opts += [(URI_QUERY, q.encode()) for q in queries]
    opts += list(options)
    opts.sort(key=lambda o: o[0])
    return encode_parts(mtype, method, mid, token, opts, payload)


class Wire:
    """A raw client to the proxy, one socket (one source port) per test."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    async def exchange(
        self,
        method: int,
        path: str,
        *,
        mtype: int = CON,
        token: bytes | None = None,
        queries: Sequence[str] = (),
        options: Iterable[tuple[int, bytes]] = (),
        payload: bytes = b"",
        timeout: float = 5.0,
    ) -> tuple[int, bytes, Message]:
        """Send one request; return (MID, token, first datagram back)."""
        mid = next_mid()
        tok = next_token() if token is None else token
        data = request_bytes(
            method,
            path,
            mid=mid,
            token=tok,
            mtype=mtype,
            queries=queries,
            options=options,
            payload=payload,
        )
        answer = await self.client.request(data, timeout=timeout)
        return mid, tok, answer

    async def response(self, answer: Message, timeout: float = 5.0) -> Message:
        """The response that ``answer`` (the first datagram back) is or announces: after an
        empty ACK the separate response (RFC 7252 §5.2.2), acknowledged if CON, as a client
        does. A server may answer separately whenever its answer takes longer than its ACK
        window (on a busy machine, any fetch from the origin)."""
        response = answer
        if answer.mtype == ACK and answer.code == 0:
            response = await self.client.recv_message(timeout=timeout)
        if response.mtype == CON:
            self.client.send(encode_parts(ACK, 0, response.mid, b"", [], b""))
        return response
