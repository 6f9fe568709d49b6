"""A CoAP request as handlers see it, and how it is read from a message (RFC 7252 §5.4, §5.10).

:func:`interpret` picks a request's options apart once, against the option table of
:mod:`proxy.coap.options`, and raises :class:`BadRequest` for what the datagram alone decides
(4.02, 4.00, 5.05). :class:`Request`, :class:`Response` and :class:`RequestHandler` are the
contract between the messaging layer and every handler behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import Message, parse_uint

Peer = tuple[str, int]


@dataclass(slots=True)
class Request:
    """A request as the handler sees it: decoded once, options already interpreted."""

    method: int
    path: str
    queries: list[str]
    message: Message
    peer: Peer
    content_format: int | None = None
    accept: int | None = None
    # The authenticated PSK identity over DTLS; None on plain CoAP (docs/CONTRACT.md §2).
    identity: str | None = None
    # Set by the block-wise layer (proxy/coap/blockwise.py) when it wants only these bytes of
    # the representation (inclusive, RFC 9110 §14.1.2): the forwarder asks the origin with
    # `Range: bytes=first-last`. None: the whole representation.
    byte_range: tuple[int, int] | None = None


@dataclass(slots=True)
class Response:
    code: int
    options: list[tuple[int, bytes]] = field(default_factory=list)  # sorted by number
    payload: bytes = b""
    # When ``payload`` is a slice of the representation (the origin answered a byte range,
    # 206 with Content-Range): the representation's full length. None: payload is all of it.
    size: int | None = None


class RequestHandler(Protocol):
    async def handle(self, request: Request) -> Response: ...

    def answer_now(self, request: Request) -> Response | None:
        """The answer when it takes no I/O — decided by the request and the policy alone
        (discovery, 4.04, 4.05, a bad topic, ...) — else None, and :meth:`handle` runs. The
        driver asks this first, so such a request costs no task and no cross-replica claim:
        every replica, running the same policy, gives the same answer (docs/ARCHITECTURE.md).
        So it must never answer from state (a store, a cache, the clock)."""
        ...

    def needs_claim(self, request: Request) -> bool:
        """Whether this request needs the cross-replica claim before it is handled: False for
        what the handler answers itself or what is safe to run twice (docs/ARCHITECTURE.md)."""
        ...


class BadRequest(Exception):
    """A request the datagram alone decides to refuse; ``code`` is the CoAP answer."""

    def __init__(self, code: int) -> None:
        self.code = code


# RFC 7959 §2.2: SZX 7 (it would mean 2048-byte blocks) is reserved; in a request it is 4.00.
_SZX_RESERVED = 7


def interpret(message: Message, peer: Peer, identity: str | None) -> Request:
    """Pick the request options apart; raise :class:`BadRequest` for 4.02 / 4.00 / 5.05.

    Each option this server reads is first held against ``opt.REQUEST_RULES``: a value
    length outside the option's range (RFC 7252 §5.4.3) or a further occurrence of an option
    that is not repeatable (§5.4.5; the first occurrence stands) is treated like an
    unrecognized option: critical → 4.02, elective → skipped (§5.4.1). Options come out of
    decode in ascending order, so a repetition is the same number as the option before it.
    A NON request gets its 4.02 too, as a NON response: §5.4.1 words the NON case as
    "rejected" (§4.3), which the CoRE working group's corrections and clarifications draft
    (draft-ietf-core-corr-clar §2.2) resolves as a 4.02 response rather than a Reset; libcoap
    answers the same way. A request never reaches the handler either way.
    """
    path_segments: list[str] = []
    queries: list[str] = []
    content_format: int | None = None
    accept: int | None = None
    rules = opt.REQUEST_RULES
    previous = -1
    for number, value in message.options:
        repeated = number == previous
        previous = number
        rule = rules.get(number)
        if rule is None:
            if number & 1:
                raise BadRequest(codes.BAD_OPTION)  # critical and not understood
            continue  # elective and not read: ignored
        if len(value) not in rule[0] or (repeated and not rule[1]):
            if number & 1:
                raise BadRequest(codes.BAD_OPTION)
            continue
        if number == opt.URI_PATH:
            path_segments.append(_text(value))
        elif number == opt.URI_QUERY:
            queries.append(_text(value))
        elif number == opt.CONTENT_FORMAT:
            content_format = parse_uint(value)
        elif number == opt.ACCEPT:
            accept = parse_uint(value)
        elif number == opt.PROXY_URI or number == opt.PROXY_SCHEME:
            # We are a reverse proxy (an origin server to the device), not a forward proxy.
            raise BadRequest(codes.PROXYING_NOT_SUPPORTED)
        elif number == opt.BLOCK1 or number == opt.BLOCK2:
            block = parse_uint(value)
            if block & 0x07 == _SZX_RESERVED:
                raise BadRequest(codes.BAD_REQUEST)
            # Any other block is the block-wise layer's (proxy/coap/blockwise.py).
    # Positional: keyword arguments to a slots dataclass cost ~250 ns here, every request.
    return Request(
        message.code,
        "/" + "/".join(path_segments),
        queries,
        message,
        peer,
        content_format,
        accept,
        identity,
    )


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(codes.BAD_REQUEST) from None
