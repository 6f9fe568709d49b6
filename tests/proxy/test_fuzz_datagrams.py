"""50,000 malformed datagrams against a running ``coap-bridge proxy``, each answered per RFC.

A seeded generator builds every datagram with one known defect, so its class and the answer
RFC 7252 / RFC 7959 require are known by construction:

=====================================  ===================================================
class                                  answer
=====================================  ===================================================
format error in a CON (§3, §4.1)       RST, same MID (§4.2)
format error in a NON / ACK / RST      silence (§4.3; an ACK/RST is never answered, §4.2)
unreadable: < 4 bytes, version ≠ 1     silence (§3)
empty CON ("ping")                     RST, same MID (§4.3)
empty NON / ACK / RST                  silence (§4.1, §4.3)
response code in a CON                 RST (§4.2: nothing asked for it)
response code in a NON / ACK / RST     silence
request code in an ACK / RST           silence (§4.2)
unknown critical option, critical      4.02, empty payload, token echoed: piggybacked in
option of a wrong length, repeated     the ACK for a CON, a NON for a NON (§5.4.1, §5.4.3,
non-repeatable critical option,        §5.4.5; If-Match / If-None-Match are understood:
malformed If-Match / If-None-Match     too long, not empty, repeated)
Block1 / Block2 with SZX 7             4.00 (RFC 7959 §2.2)
Uri-Path / Uri-Query not UTF-8         4.00 (§5.10.1 strings are UTF-8)
Proxy-Uri / Proxy-Scheme               5.05 (a reverse proxy, §5.7.2)
=====================================  ===================================================

Every answer is checked byte for byte; an answer to a datagram of a silent class, a second
answer, or a missing one fails the test. No datagram of any class may reach the HTTP backend
(it counts its calls). Afterwards the process is alive and serves a valid request.

MIDs never repeat on a client socket, so deduplication (§4.5) never turns an answer into a
replay. The datagrams go out in windows closed by a ping whose RST says the proxy has read
the window (it answers all these classes synchronously, in order), which keeps its socket's
receive queue short enough that nothing is dropped.

``FUZZ_SEED=<n>`` replays a run; every failure message names the seed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes as status
from proxy.coap.codec import ACK, CON, NON, RST, decode, encode_empty, encode_parts
from tests.support.coap import RawClient
from tests.support.http import serve_app
from tests.support.processes import Proc, Processes

pytestmark = pytest.mark.integration

DATAGRAMS = 50_000
WINDOW = 64  # datagrams between two pings: well inside the proxy socket's receive buffer
SOCKETS = 8
SEED = int(os.environ.get("FUZZ_SEED") or secrets.randbits(32))

# Option numbers and formats as the RFCs give them (RFC 7252 §5.10, RFC 7959 §2.1), written
# out here rather than taken from the code under test.
URI_HOST, URI_PORT, URI_PATH, URI_QUERY, ACCEPT = 3, 7, 11, 15, 17
BLOCK2, BLOCK1, PROXY_URI, PROXY_SCHEME = 23, 27, 35, 39
IF_MATCH, IF_NONE_MATCH, CONTENT_FORMAT = 1, 5, 12
# Critical options the proxy understands, with their value lengths.
UNDERSTOOD_CRITICAL = {
    IF_MATCH: (0, 8),
    IF_NONE_MATCH: (0, 0),
    URI_HOST: (1, 255),
    URI_PORT: (0, 2),
    URI_PATH: (0, 255),
    URI_QUERY: (0, 255),
    ACCEPT: (0, 2),
    BLOCK2: (0, 3),
    BLOCK1: (0, 3),
    PROXY_URI: (1, 1034),
    PROXY_SCHEME: (1, 255),
}
NOT_REPEATABLE_CRITICAL = [IF_NONE_MATCH, URI_HOST, URI_PORT, ACCEPT, BLOCK2, BLOCK1]
WELL_KNOWN_CORE = [(URI_PATH, b".well-known"), (URI_PATH, b"core")]
# Elective options (even numbers) absent from every table the proxy knows.
UNKNOWN_ELECTIVE = [2, 10, 16, 22, 100, 1000, 2048, 65000]

RESPONSE_CLASSES = (2, 4, 5)
RESERVED_CLASSES = (1, 6, 7)
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789-_."
NOT_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"]

Options = list[tuple[int, bytes]]


# -- what the proxy must answer ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expect:
    """``kind``: "rst" / "ack" (keyed by socket and MID), "non" (keyed by token), "silence"."""

    kind: str
    code: int = 0


SILENCE = Expect("silence")
RESET = Expect("rst")


def answered(mtype: int, code: int) -> Expect:
    # A request refused by its options: piggybacked for a CON, a NON response for a NON.
    return Expect("ack" if mtype == CON else "non", code)


# -- the generator ----------------------------------------------------------------------------


@dataclass
class Gen:
    rng: random.Random

    def text(self, low: int, high: int) -> bytes:
        return bytes(self.rng.choices(ALPHABET, k=self.rng.randint(low, high)))

    def token(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 8))

    def request_code(self) -> int:
        return self.rng.randint(1, 31)  # 0.01-0.31: methods, known or not

    def base_request(self) -> tuple[int, Options, bytes]:
        """A request the proxy would forward (routes of the default policy) or answer itself;
        valid extra options that must not change the outcome of a defect added to it."""
        rng = self.rng
        code, options = rng.choice(
            [
                (status.GET, [(URI_PATH, b"location")]),
                (status.GET, [(URI_PATH, b"bootstrap")]),
                (status.POST, [(URI_PATH, b"data"), (URI_QUERY, b"t=a/b")]),
                (status.POST, [(URI_QUERY, b"t=" + self.text(1, 40))]),
                (status.GET, WELL_KNOWN_CORE),
            ]
        )
        options = list(options)
        # Distinct numbers: a second Uri-Host, Uri-Port or Accept would be a defect itself.
        extras = [URI_HOST, URI_PORT, CONTENT_FORMAT, ACCEPT, *UNKNOWN_ELECTIVE]
        for number in rng.sample(extras, rng.randint(0, 3)):
            if number == URI_HOST:
                options.append((URI_HOST, self.text(1, 30)))
            elif number in (URI_PORT, CONTENT_FORMAT, ACCEPT):
                options.append((number, rng.randbytes(rng.randint(0, 2))))
            else:
                options.append((number, rng.randbytes(rng.randint(0, 12))))
        payload = rng.randbytes(rng.randint(0, 40)) if code == status.POST else b""
        return code, options, payload

    def valid_options(self) -> Options:
        return [
            (self.rng.randint(1, 300), self.rng.randbytes(self.rng.randint(0, 20)))
            for _ in range(self.rng.randint(0, 4))
        ]

    def with_defect(self, mtype: int, mid: int, token: bytes, defect: Options) -> bytes:
        code, options, payload = self.base_request()
        if self.rng.random() < 0.3:
            code = self.request_code()
        # One defect per datagram: drop base options that would be a second one.
        numbers = {number for number, _ in defect}
        options = [o for o in options if o[0] not in numbers or o[0] in (URI_PATH, URI_QUERY)]
        # sorted() is stable: repeated occurrences keep the order given.
        options = sorted(options + defect, key=lambda o: o[0])
        return encode_parts(mtype, code, mid, token, options, payload)


def header(mtype: int, tkl: int, code: int, mid: int) -> bytes:
    return bytes([0x40 | (mtype << 4) | tkl, code, mid >> 8, mid & 0xFF])


def format_error(g: Gen, mtype: int, mid: int) -> bytes:
    """A datagram with a readable header and one message format error (§3, §4.1)."""
    rng = g.rng
    code = rng.choice([g.request_code(), (rng.choice(RESPONSE_CLASSES) << 5) | rng.randint(0, 31)])
    token = g.token()
    prefix = encode_parts(mtype, code, mid, token, sorted(g.valid_options()), b"")
    kind = rng.randrange(10)
    if kind == 0:  # token length 9-15 is reserved
        return header(mtype, rng.randint(9, 15), code, mid) + rng.randbytes(rng.randint(0, 20))
    if kind == 1:  # code classes 1, 6 and 7 are reserved
        reserved = (rng.choice(RESERVED_CLASSES) << 5) | rng.randint(0, 31)
        return header(mtype, len(token), reserved, mid) + token + rng.randbytes(rng.randint(0, 9))
    if kind == 2:  # an Empty message is the 4-byte header and nothing else
        if rng.random() < 0.5:
            return header(mtype, rng.randint(1, 8), 0, mid) + rng.randbytes(8)
        return header(mtype, 0, 0, mid) + rng.randbytes(rng.randint(1, 12))
    if kind == 3:  # the token runs past the datagram
        tkl = rng.randint(1, 8)
        return header(mtype, tkl, code, mid) + rng.randbytes(rng.randint(0, tkl - 1))
    if kind == 4:  # option delta nibble 15 (0xFF itself is the payload marker)
        return prefix + bytes([0xF0 | rng.randint(0, 14)]) + rng.randbytes(rng.randint(0, 8))
    if kind == 5:  # option length nibble 15
        return prefix + bytes([rng.randint(0, 12) << 4 | 0x0F]) + rng.randbytes(rng.randint(0, 8))
    if kind == 6:  # the option value runs past the datagram
        length = rng.randint(1, 12)
        return prefix + bytes([rng.randint(0, 12) << 4 | length]) + rng.randbytes(length - 1)
    if kind == 7:  # an extended option delta runs past the datagram
        if rng.random() < 0.5:
            return prefix + bytes([0xD0 | rng.randint(0, 12)])
        return prefix + bytes([0xE0 | rng.randint(0, 12), rng.randrange(256)])
    if kind == 8:  # an extended option length runs past the datagram
        if rng.random() < 0.5:
            return prefix + bytes([rng.randint(0, 12) << 4 | 0x0D])
        return prefix + bytes([rng.randint(0, 12) << 4 | 0x0E, rng.randrange(256)])
    return prefix + b"\xff"  # a payload marker followed by no payload


def case_format_con(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    return format_error(g, CON, mid), RESET


def case_format_other(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    return format_error(g, g.rng.choice([NON, ACK, RST]), mid), SILENCE


def case_unreadable(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    rng = g.rng
    if rng.random() < 0.3:
        return rng.randbytes(rng.randint(1, 3)), SILENCE
    version = rng.choice([0, 2, 3])
    first = version << 6 | rng.randrange(64)
    return bytes([first, rng.randrange(256), mid >> 8, mid & 0xFF]) + rng.randbytes(
        rng.randint(0, 30)
    ), SILENCE


def case_empty(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    mtype = g.rng.choice([CON, CON, NON, ACK, RST])
    return encode_empty(mtype, mid), RESET if mtype == CON else SILENCE


def case_response_code(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    rng = g.rng
    mtype = rng.choice([CON, CON, NON, ACK, RST])
    code = (rng.choice(RESPONSE_CLASSES) << 5) | rng.randint(0, 31)
    payload = rng.randbytes(rng.randint(0, 20))
    datagram = encode_parts(mtype, code, mid, g.token(), sorted(g.valid_options()), payload)
    return datagram, RESET if mtype == CON else SILENCE


def case_request_in_ack_or_rst(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    code, options, payload = g.base_request()
    mtype = g.rng.choice([ACK, RST])
    return encode_parts(mtype, code, mid, g.token(), sorted(options), payload), SILENCE


def case_bad_option(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    rng = g.rng
    mtype = rng.choice([CON, NON])
    kind = rng.randrange(4)
    if kind == 0:  # a critical option the proxy does not know (§5.4.1)
        number = rng.randrange(1, 65536, 2)
        while number in UNDERSTOOD_CRITICAL:
            number = rng.randrange(1, 65536, 2)
        defect = [(number, rng.randbytes(rng.randint(0, 20)))]
    elif kind == 1:  # an understood critical option of a wrong length (§5.4.3)
        number = rng.choice(list(UNDERSTOOD_CRITICAL))
        low, high = UNDERSTOOD_CRITICAL[number]
        lengths = [high + 1 + rng.randrange(8)] + ([0] if low else [])
        defect = [(number, bytes(rng.choices(ALPHABET, k=rng.choice(lengths))))]
    elif kind == 2:  # a non-repeatable critical option, repeated (§5.4.5)
        number = rng.choice(NOT_REPEATABLE_CRITICAL)
        if number == URI_HOST:
            values = [g.text(1, 20) for _ in range(rng.randint(2, 3))]
        elif number in (BLOCK1, BLOCK2):  # NUM 0, M 0, SZX 0-6: a valid first occurrence
            values = [bytes([rng.randint(0, 6)]) for _ in range(rng.randint(2, 3))]
        else:
            values = [rng.randbytes(rng.randint(0, 2)) for _ in range(rng.randint(2, 3))]
        defect = [(number, value) for value in values]
    else:  # a malformed precondition: If-Match over 8 bytes, If-None-Match not empty
        defect = rng.choice(
            [
                [(IF_MATCH, rng.randbytes(rng.randint(9, 20)))],
                [(IF_NONE_MATCH, rng.randbytes(rng.randint(1, 8)))],
            ]
        )
    return g.with_defect(mtype, mid, token, defect), answered(mtype, status.BAD_OPTION)


def case_block_szx7(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    rng = g.rng
    mtype = rng.choice([CON, NON])
    value = rng.randbytes(rng.randint(0, 2)) + bytes([rng.randrange(32) << 3 | 7])
    defect = [(rng.choice([BLOCK1, BLOCK2]), value)]
    return g.with_defect(mtype, mid, token, defect), answered(mtype, status.BAD_REQUEST)


def case_not_utf8(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    rng = g.rng
    mtype = rng.choice([CON, NON])
    value = g.text(0, 20) + rng.choice(NOT_UTF8) + g.text(0, 20)
    defect = [(rng.choice([URI_PATH, URI_QUERY]), value)]
    return g.with_defect(mtype, mid, token, defect), answered(mtype, status.BAD_REQUEST)


def case_proxying(g: Gen, mid: int, token: bytes) -> tuple[bytes, Expect]:
    rng = g.rng
    mtype = rng.choice([CON, NON])
    if rng.random() < 0.5:
        defect = [(PROXY_URI, b"coap://elsewhere/" + g.text(0, 60))]
    else:
        defect = [(PROXY_SCHEME, rng.choice([b"coap", b"http", b"coaps+ws"]))]
    return g.with_defect(mtype, mid, token, defect), answered(mtype, status.PROXYING_NOT_SUPPORTED)


Case = Callable[[Gen, int, bytes], tuple[bytes, Expect]]
CASES: dict[str, Case] = {
    "format error, CON": case_format_con,
    "format error, NON/ACK/RST": case_format_other,
    "unreadable": case_unreadable,
    "empty message": case_empty,
    "response code": case_response_code,
    "request in ACK/RST": case_request_in_ack_or_rst,
    "bad option": case_bad_option,
    "block SZX 7": case_block_szx7,
    "not UTF-8": case_not_utf8,
    "proxying": case_proxying,
}


# -- the client side --------------------------------------------------------------------------


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, index: int, flood: Flood) -> None:
        self.index = index
        self.flood = flood

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        # Answers wait in the kernel while a window is being generated.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.flood.received.append((self.index, data))
        waiter = self.flood.pings.pop((self.index, data), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass
class Flood:
    rng: random.Random
    transports: list[asyncio.DatagramTransport] = field(default_factory=list)
    next_mid: list[int] = field(default_factory=list)
    received: list[tuple[int, bytes]] = field(default_factory=list)
    pings: dict[tuple[int, bytes], asyncio.Future[None]] = field(default_factory=dict)
    by_mid: dict[tuple[int, int], tuple[str, bytes]] = field(default_factory=dict)
    by_token: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    silent: dict[tuple[int, int], str] = field(default_factory=dict)
    ping_keys: set[tuple[int, int]] = field(default_factory=set)
    per_class: collections.Counter[str] = field(default_factory=collections.Counter)
    sequence: int = 0

    @classmethod
    async def open(cls, rng: random.Random, port: int) -> Flood:
        flood = cls(rng)
        loop = asyncio.get_running_loop()
        for index in range(SOCKETS):
            transport, _ = await loop.create_datagram_endpoint(
                lambda index=index: _Receiver(index, flood), remote_addr=("127.0.0.1", port)
            )
            flood.transports.append(transport)
            flood.next_mid.append(rng.randrange(0x10000))
        return flood

    def close(self) -> None:
        for transport in self.transports:
            transport.close()

    def mid(self, index: int) -> int:
        # Never repeated on a socket in one run (< 65,536 per socket), so no dedup replays.
        mid = self.next_mid[index]
        self.next_mid[index] = (mid + 1) & 0xFFFF
        return mid

    def send_one(self, gen: Gen) -> None:
        index = self.sequence % SOCKETS
        self.sequence += 1
        mid = self.mid(index)
        # Unique per datagram: the key of a NON answer, whose MID is the proxy's own.
        token = self.sequence.to_bytes(4, "big") + self.rng.randbytes(self.rng.randint(0, 4))
        name = self.rng.choice(list(CASES))
        datagram, expect = CASES[name](gen, mid, token)
        self.per_class[name] += 1
        if expect.kind == "rst":
            self.by_mid[(index, mid)] = (name, encode_empty(RST, mid))
        elif expect.kind == "ack":
            message = decode(datagram)
            answer = encode_parts(ACK, expect.code, mid, message.token, [], b"")
            self.by_mid[(index, mid)] = (name, answer)
        elif expect.kind == "non":
            self.by_token[decode(datagram).token] = (name, expect.code)
        else:
            self.silent[(index, mid)] = name
        self.transports[index].sendto(datagram)

    async def ping(self, index: int) -> None:
        """An empty CON; its RST means the proxy has read everything sent before it."""
        for _ in range(3):
            mid = self.mid(index)
            self.ping_keys.add((index, mid))
            waiter = asyncio.get_running_loop().create_future()
            self.pings[(index, encode_empty(RST, mid))] = waiter
            self.transports[index].sendto(encode_empty(CON, mid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, 5.0)
                return
        raise AssertionError(f"seed {SEED}: the proxy stopped answering pings")


def check_answers(flood: Flood) -> list[str]:
    """Every answer against its expectation; what is wrong, at most a few lines of it."""
    problems: list[str] = []
    got_mid: set[tuple[int, int]] = set()
    got_token: set[bytes] = set()
    for index, data in flood.received:
        message = decode(data)
        if message.mtype == NON:
            expected = flood.by_token.get(message.token)
            if expected is None:
                problems.append(f"unexpected NON answer {data.hex()}")
            elif message.token in got_token:
                problems.append(f"{expected[0]}: second answer {data.hex()}")
            elif (message.code, message.options, message.payload) != (expected[1], [], b""):
                expected_code = status.code_text(expected[1])
                problems.append(f"{expected[0]}: expected NON {expected_code}, got {message}")
            got_token.add(message.token)
            continue
        key = (index, message.mid)
        if key in flood.ping_keys and data == encode_empty(RST, message.mid):
            continue
        if key in flood.silent:
            problems.append(f"{flood.silent[key]}: expected silence, got {message}")
        elif key not in flood.by_mid:
            problems.append(f"unexpected answer {message}")
        elif key in got_mid:
            problems.append(f"{flood.by_mid[key][0]}: second answer {message}")
        elif data != flood.by_mid[key][1]:
            name, answer = flood.by_mid[key]
            problems.append(f"{name}: expected {answer.hex()}, got {data.hex()} ({message})")
        got_mid.add(key)
    for key, (name, answer) in flood.by_mid.items():
        if key not in got_mid:
            problems.append(f"{name}: no answer, expected {answer.hex()}")
    for token, (name, code) in flood.by_token.items():
        if token not in got_token:
            problems.append(f"{name}: no NON {status.code_text(code)} for token {token.hex()}")
    return problems


# -- the test ---------------------------------------------------------------------------------


@dataclass
class Upstream:
    calls: list[str] = field(default_factory=list)

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        self.calls.append(f"{request.method} {request.url.path}")
        if request.url.path == "/location":
            return HttpResponse(b"52.52,13.40", media_type="text/plain")
        return HttpResponse(status_code=204)


@pytest.fixture
async def running(tmp_path) -> AsyncIterator[tuple[Proc, Upstream]]:
    upstream = Upstream()
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    app = Starlette(routes=[Route("/{path:path}", upstream.endpoint, methods=methods)])
    processes = Processes(tmp_path)
    async with serve_app(app) as base_url:
        try:
            proc = await processes.proxy("proxy", upstream=base_url, redis_url=None)
            yield proc, upstream
        finally:
            processes.stop_all()


async def test_malformed_datagrams_get_the_rfc_answer_and_the_proxy_survives(
    running: tuple[Proc, Upstream],
) -> None:
    proc, upstream = running
    rng = random.Random(SEED)
    gen = Gen(rng)
    flood = await Flood.open(rng, proc.port)
    try:
        sent = 0
        while sent < DATAGRAMS:
            for _ in range(min(WINDOW, DATAGRAMS - sent)):
                flood.send_one(gen)
            sent += WINDOW
            await flood.ping(sent // WINDOW % SOCKETS)
        for index in range(SOCKETS):
            await flood.ping(index)  # every socket's answers are in before the check
        await asyncio.sleep(0.2)
    finally:
        flood.close()

    assert proc.process.poll() is None, f"seed {SEED}: the proxy died\n{proc.log()[-3000:]}"
    problems = check_answers(flood)
    assert not problems, f"seed {SEED}: {len(problems)} wrong answers, first:\n" + "\n".join(
        problems[:20]
    )
    assert sum(flood.per_class.values()) >= DATAGRAMS, SEED
    for name in CASES:
        assert flood.per_class[name] >= DATAGRAMS // len(CASES) // 2, (SEED, flood.per_class)
    # Nothing malformed reached the backend.
    assert upstream.calls == [], f"seed {SEED}: {upstream.calls[:5]}"

    # Still serving: resource discovery by the proxy itself, then a forwarded request.
    client = await RawClient.connect("127.0.0.1", proc.port)
    try:
        discovery = await client.request(
            encode_parts(CON, status.GET, 1, b"\x01", WELL_KNOWN_CORE, b""), timeout=5.0
        )
        location = await client.request(
            encode_parts(CON, status.GET, 2, b"\x02", [(URI_PATH, b"location")], b""),
            timeout=5.0,
        )
    finally:
        await client.aclose()
    assert (discovery.mtype, discovery.code, discovery.mid) == (ACK, status.CONTENT, 1)
    assert b"</location>" in discovery.payload
    assert (location.code, location.token, location.payload) == (
        status.CONTENT,
        b"\x02",
        b"52.52,13.40",
    )
    assert upstream.calls == ["GET /location"]
    assert "Traceback" not in proc.log(), f"seed {SEED}\n{proc.log()[-3000:]}"
