"""TD_COAP_OBS_01, 02, 04–08, 10–13 (ETSI CoAP#4, block.yml; RFC 7641) through the proxy.

The origin (origin.py) serves /obs, /obs-non and /obs-large as plain HTTP resources with ETags
and announces each change on its change feed (``GET /observe/events``, text/event-stream,
obs contract §3); "the resource changes" in a TD is ``OriginState.change``. The proxy must turn
that into RFC 7641 notifications. Raw datagrams check every line; libcoap's ``coap-client -s``
(OBS_01) and aiocoap's observation API (OBS_02, OBS_13) are the real clients. TD_COAP_OBS_09
is the same sequence as 01 here (the update is the change); OBS_14 needs a resource whose size
varies, which 13 covers for the large case and 01 for the small one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiocoap
import pytest
import pytest_asyncio

from proxy.coap.codec import ACK, CON, NON, RST, Message, encode_empty
from proxy.server import RunningProxy
from tests.conformance import wire as w
from tests.conformance.checks import Checks
from tests.conformance.origin import OBS_LARGE, XML, OriginState
from tests.conformance.rig import running_proxy
from tests.conformance.wire import Block, Wire
from tests.support.clients import coap_client

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="session")]

OBSERVE = 6  # RFC 7641 §2

POLICY = """
[[route]]
path = "/obs"
methods = ["GET"]
target = "/obs"
observe = true
observe_con = true

[[route]]
path = "/obs-non"
methods = ["GET"]
target = "/obs-non"
observe = true

[[route]]
path = "/obs-large"
methods = ["GET"]
target = "/obs-large"
observe = true
observe_con = true
"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proxy(
    tmp_path_factory: pytest.TempPathFactory, origin: tuple[OriginState, str]
) -> AsyncIterator[RunningProxy]:
    # Every client of the suite is 127.0.0.1: one "device" for the per-device limit. A short
    # ACK_TIMEOUT so that OBS_05's retransmissions end within seconds (RFC 7252 §4.8 lets
    # the parameter be changed).
    async with running_proxy(
        tmp_path_factory.mktemp("obs"),
        POLICY,
        origin[1],
        max_observers_per_device=1000,
        ack_timeout=0.1,
    ) as running:
        yield running


@pytest.fixture
def state(origin: tuple[OriginState, str]) -> OriginState:
    return origin[0]


def observe_of(message: Message) -> int | None:
    value = w.one(message, OBSERVE)
    return None if value is None else w.parse_uint(value)


async def register(
    wire: Wire, path: str, *, mtype: int = CON, token: bytes | None = None, value: int = 0
) -> tuple[int, bytes, Message]:
    return await wire.exchange(
        w.GET, path, mtype=mtype, token=token, options=[(OBSERVE, w.uint(value))]
    )


async def receive(wire: Wire, timeout: float = 5.0) -> Message | None:
    try:
        return await wire.client.recv_message(timeout)
    except TimeoutError:
        return None


def ack(wire: Wire, message: Message) -> None:
    wire.client.send(encode_empty(ACK, message.mid))


async def silent(wire: Wire, seconds: float = 0.6) -> bool:
    try:
        await wire.client.expect_silence(seconds)
    except AssertionError:
        return False
    return True


def newer(observe: int | None, last: int) -> bool:
    """``observe`` is fresher than ``last`` in 24-bit serial arithmetic (RFC 7641 §3.4)."""
    return observe is not None and 0 < (observe - last) % (1 << 24) < (1 << 23)


async def expect_con_note(
    c: Checks, wire: Wire, label: str, token: bytes, last: int | None = None
) -> Message | None:
    """The next datagram, checked as a CON 2.05 notification on ``token`` (and newer than
    ``last`` when given)."""
    note = await receive(wire)
    c.check(
        label,
        note is not None and note.mtype == CON and note.code == w.CONTENT
        and note.token == token and (last is None or newer(observe_of(note), last)),
        note,
    )  # fmt: skip
    return note


def check_first(c: Checks, answer: Message, token: bytes) -> tuple[int | None, int]:
    cf = w.content_format(answer)
    c.check(
        "first answer: ACK 2.05 (piggybacked)",
        answer.mtype == ACK and answer.code == w.CONTENT,
        answer,
    )
    c.check("first answer: Content-Format f", cf is not None, answer)
    c.check("first answer: token t", answer.token == token, answer.token.hex())
    observe = observe_of(answer)
    c.check("first answer: Observe", observe is not None, answer)
    return cf, observe or 0


def check_note(c: Checks, note: Message | None, token: bytes, cf: int | None, last: int) -> int:
    if note is None:
        c.check("notification: CON", False, "no notification")
        return last
    c.check("notification: CON", note.mtype == CON, note)
    c.check("notification: 2.05 Content", note.code == w.CONTENT, note)
    c.check("notification: Content-Format f", w.content_format(note) == cf, note)
    c.check("notification: token t", note.token == token, note.token.hex())
    observe = observe_of(note)
    c.check(
        "notification: Observe increasing",
        newer(observe, last),
        f"{last} → {observe}",
    )
    return observe or last


async def next_note(wire: Wire, skip_mid: int | None = None) -> Message | None:
    """The next datagram that is not a retransmission of ``skip_mid``."""
    while True:
        note = await receive(wire)
        if note is None or note.mid != skip_mid:
            return note


async def until(predicate: object, seconds: float = 15.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


def url(proxy: RunningProxy, path: str) -> str:
    host, port = proxy.address
    return f"coap://{host}:{port}{path}"


async def test_td_coap_obs_01(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_01")
    _mid, tok, first = await register(wire, "/obs")
    cf, last = check_first(c, first, tok)
    for n in (1, 2):
        state.change("/obs", b"obs %d" % n)
        note = await receive(wire)
        last = check_note(c, note, tok, cf, last)
        if note is not None:
            ack(wire, note)
    assert proxy.observers is not None
    before = len(proxy.observers)
    run = asyncio.create_task(coap_client("-s", "4", url(proxy, "/obs"), timeout=8))
    registered = await until(lambda: len(proxy.observers or ()) > before)
    for n in (3, 4):
        state.change("/obs", b"obs libcoap %d" % n)
        await asyncio.sleep(0.3)  # one notification at a time is the client's pace
    result = await run
    c.check(
        "coap-client -s displays the notifications",
        registered and "obs libcoap 3" in result.stdout and "obs libcoap 4" in result.stdout,
        result.stdout[-600:] + result.stderr[-300:],
    )
    c.done()


async def test_td_coap_obs_02(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_02")
    _mid, tok, first = await register(wire, "/obs-non", mtype=NON)
    cf = w.content_format(first)
    last = observe_of(first) or 0
    c.check(
        "first answer: NON 2.05, token, Observe",
        first.mtype == NON and first.code == w.CONTENT and first.token == tok and cf is not None
        and observe_of(first) is not None,
        first,
    )  # fmt: skip
    for n in (1, 2):
        state.change("/obs-non", b"obs-non %d" % n)
        note = await receive(wire)
        if note is None:
            c.check("notification: NON", False, "no notification")
            break
        c.check("notification: NON", note.mtype == NON, note)
        c.check("notification: 2.05 Content", note.code == w.CONTENT, note)
        c.check("notification: Content-Format unchanged", w.content_format(note) == cf, note)
        c.check("notification: token = t", note.token == tok, note.token.hex())
        observe = observe_of(note)
        c.check(
            "notification: Observe increasing",
            newer(observe, last),
            f"{last} → {observe}",
        )
        last = observe or last
    # aiocoap's client observing the same resource.
    context = await aiocoap.Context.create_client_context()
    try:
        request = context.request(
            aiocoap.Message(
                transport_tuning=aiocoap.Unreliable,
                code=aiocoap.GET,
                uri=url(proxy, "/obs-non"),
                observe=0,
            )
        )
        answer = await asyncio.wait_for(request.response, 5)
        seen = [answer.payload]
        state.change("/obs-non", b"obs-non aiocoap")
        async with asyncio.timeout(5):
            async for notification in request.observation:
                seen.append(notification.payload)
                break
        request.observation.cancel()
        c.check(
            "aiocoap observation displays the changes",
            seen[-1] == b"obs-non aiocoap",
            seen,
        )
    finally:
        await context.shutdown()
    c.done()


async def test_td_coap_obs_04(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_04")
    _mid, tok, first = await register(wire, "/obs")
    cf, last = check_first(c, first, tok)
    state.change("/obs", b"obs 04 a")
    note = await receive(wire)
    check_note(c, note, tok, cf, last)
    if note is not None:
        ack(wire, note)
    # The server loses its observation state.
    assert proxy.observers is not None
    for relation in proxy.observers:
        if relation.key[1] == tok:
            proxy.observers.remove(relation)
            proxy.driver.forget(relation)
    state.change("/obs", b"obs 04 b")
    c.check("no notification once the relation is lost", await silent(wire))
    _mid, _tok, again = await register(wire, "/obs", token=tok)
    c.check(
        "re-registration: ACK 2.05, Content-Format, token t, Observe",
        again.mtype == ACK and again.code == w.CONTENT and w.content_format(again) == cf
        and again.token == tok and observe_of(again) is not None,
        again,
    )  # fmt: skip
    last = observe_of(again) or 0
    state.change("/obs", b"obs 04 c")
    note = await expect_con_note(
        c,
        wire,
        "after re-registration: CON 2.05 notification, token t, Observe increasing",
        tok,
        last,
    )
    if note is not None:
        ack(wire, note)
    c.done()


async def test_td_coap_obs_05(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_05")
    _mid, tok, first = await register(wire, "/obs")
    check_first(c, first, tok)
    state.change("/obs", b"obs 05 a")
    note = await expect_con_note(c, wire, "notification: CON 2.05, token t", tok)
    # Switched off: nothing is acknowledged from here on.
    again = await receive(wire)
    c.check(
        "unacknowledged notification retransmitted",
        note is not None and again is not None and again.mid == note.mid
        and again.payload == note.payload,
        again,
    )  # fmt: skip
    state.change("/obs", b"obs 05 b")
    newer = None
    for _ in range(6):
        got = await receive(wire)
        if got is None:
            break
        if got.payload == b"obs 05 b":
            newer = got
            break
    old = observe_of(note) if note is not None else None
    new = observe_of(newer) if newer is not None else None
    c.check(
        "retransmission carries the newer state with an updated Observe value",
        newer is not None and newer.mtype == CON and old is not None and new is not None
        and 0 < (new - old) % (1 << 24) < (1 << 23),
        newer,
    )  # fmt: skip
    assert proxy.observers is not None
    key = (f"127.0.0.1:{wire.client.port}", tok)
    gone = await until(lambda: proxy.observers.get(key) is None)  # type: ignore[union-attr]
    while await receive(wire, 0.3) is not None:
        pass  # the last retransmissions
    state.change("/obs", b"obs 05 c")
    c.check("no notification after the final timeout", gone and await silent(wire))
    c.done()


async def test_td_coap_obs_06(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_06")
    _mid, tok, first = await register(wire, "/obs")
    check_first(c, first, tok)
    state.change("/obs", b"obs 06 a")
    note = await expect_con_note(c, wire, "notification: CON 2.05, token t", tok)
    if note is not None:
        wire.client.send(encode_empty(RST, note.mid))
    await asyncio.sleep(0.2)
    state.change("/obs", b"obs 06 b")
    c.check("no notification after the RST", await silent(wire))
    c.done()


async def _final(
    td: str, code: int, label: str, wire: Wire, state: OriginState, change: object
) -> None:
    c = Checks(td)
    _mid, tok, first = await register(wire, "/obs")
    check_first(c, first, tok)
    change()  # type: ignore[operator]
    note = await receive(wire)
    c.check(
        f"notification: CON {label}, token t",
        note is not None and note.mtype == CON and note.code == code and note.token == tok,
        note,
    )
    c.check(f"{label} notification: no Observe", note is not None and observe_of(note) is None)
    if note is not None:
        ack(wire, note)
    state.change("/obs", b"obs back")
    c.check(f"no notification after the {label}", await silent(wire))
    c.done()


async def test_td_coap_obs_07(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    await _final(
        "TD_COAP_OBS_07", w.code(4, 4), "4.04", wire, state, lambda: state.change("/obs", None)
    )


async def test_td_coap_obs_08(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    await _final(
        "TD_COAP_OBS_08",
        w.code(4, 6),
        "4.06",
        wire,
        state,
        lambda: state.change("/obs", b"<obs/>", XML),
    )


async def test_td_coap_obs_10(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_10")
    _mid, tok, first = await register(wire, "/obs")
    cf, last = check_first(c, first, tok)
    _mid2, tok2, plain = await wire.exchange(w.GET, "/obs")
    c.check(
        "plain GET: ACK 2.05, Content-Format f, token t2",
        plain.mtype == ACK and plain.code == w.CONTENT and w.content_format(plain) == cf
        and plain.token == tok2 != tok,
        plain,
    )  # fmt: skip
    c.check("plain GET: no Observe", observe_of(plain) is None, plain)
    state.change("/obs", b"obs 10")
    note = await expect_con_note(
        c, wire, "notifications still arrive: CON 2.05, token t, Observe increasing", tok, last
    )
    if note is not None:
        ack(wire, note)
    c.done()


async def test_td_coap_obs_11(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_11")
    _mid, tok, first = await register(wire, "/obs")
    check_first(c, first, tok)
    state.change("/obs", b"obs 11 a")
    note = await expect_con_note(c, wire, "notification: CON 2.05, token t", tok)
    # The ACK is lost; the resource changes twice meanwhile.
    state.change("/obs", b"obs 11 b")
    state.change("/obs", b"obs 11 c")
    seen = [note] if note is not None else []
    while seen and seen[-1].payload != b"obs 11 c":
        got = await receive(wire)
        if got is None:
            break
        seen.append(got)
    mids = [m.mid for m in seen]
    # One CON in flight: once a newer notification appears, the older is never sent again.
    order = list(dict.fromkeys(mids))
    single = all(order.index(a) <= order.index(b) for a, b in itertools.pairwise(mids))
    c.check(
        "never more than one CON notification in flight",
        bool(seen) and single and all(m.mtype == CON for m in seen),
        [(m.mid, m.payload) for m in seen],
    )
    latest = seen[-1] if seen else None
    if latest is not None:
        ack(wire, latest)
    while (extra := await receive(wire, 0.3)) is not None and latest is not None:
        if extra.mid != latest.mid:
            break
    c.check(
        "after the ACK: the latest state, nothing more in flight",
        latest is not None and latest.payload == b"obs 11 c" and await silent(wire),
        latest,
    )
    c.done()


async def test_td_coap_obs_12(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_12")
    _mid, tok, first = await register(wire, "/obs")
    cf, _last = check_first(c, first, tok)
    _mid, _tok, cancel = await register(wire, "/obs", token=tok, value=1)
    c.check(
        "cancel: ACK 2.05, Content-Format f, token t",
        cancel.mtype == ACK and cancel.code == w.CONTENT and w.content_format(cancel) == cf
        and cancel.token == tok,
        cancel,
    )  # fmt: skip
    c.check("cancel: no Observe", observe_of(cancel) is None, cancel)
    state.change("/obs", b"obs 12")
    c.check("no notification after the cancel", await silent(wire))
    c.done()


async def _rest(wire: Wire, first: Message) -> bytes:
    """Blocks 1… of a representation with Block2, fetched without Observe (RFC 7959 §2.6)."""
    block = w.block(first, w.BLOCK2)
    body = first.payload
    num = 1
    while block is not None and block.more and num < 50:
        _mid, _tok, answer = await wire.exchange(
            w.GET, "/obs-large", options=[(w.BLOCK2, Block(num, False, block.szx).encode())]
        )
        block = w.block(answer, w.BLOCK2)
        body += answer.payload
        num += 1
    return body


async def test_td_coap_obs_13(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_OBS_13")
    _mid, tok, first = await register(wire, "/obs-large")
    block = w.block(first, w.BLOCK2)
    last = observe_of(first) or 0
    c.check(
        "first answer: ACK 2.05, token t, Observe",
        first.mtype == ACK and first.code == w.CONTENT and first.token == tok
        and observe_of(first) is not None,
        first,
    )  # fmt: skip
    c.check(
        "first answer: Block2 NUM 0, M 1, full block",
        block is not None and block.num == 0 and block.more and len(first.payload) == block.size,
        block,
    )
    c.check("client gets the rest with Block2", await _rest(wire, first) == OBS_LARGE)
    changed = OBS_LARGE.replace(b"[0001]", b"[XXXX]")
    state.change("/obs-large", changed)
    note = await expect_con_note(
        c, wire, "notification: CON 2.05, token t, Observe increasing", tok, last
    )
    nblock = w.block(note, w.BLOCK2) if note is not None else None
    c.check(
        "notification: Block2 NUM 0, M 1, full block",
        note is not None and nblock is not None and nblock.num == 0 and nblock.more
        and len(note.payload) == nblock.size,
        nblock,
    )  # fmt: skip
    if note is not None:
        ack(wire, note)
        c.check(
            "notification: the rest assembles the new representation",
            await _rest(wire, note) == changed,
        )
    context = await aiocoap.Context.create_client_context()
    try:
        request = context.request(
            aiocoap.Message(code=aiocoap.GET, uri=url(proxy, "/obs-large"), observe=0)
        )
        answer = await asyncio.wait_for(request.response, 5)
        seen = [answer.payload]
        again = changed.replace(b"[0002]", b"[YYYY]")
        state.change("/obs-large", again)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                async for notification in request.observation:
                    seen.append(notification.payload)
                    break
        request.observation.cancel()
        c.check(
            "aiocoap observation displays the large representation",
            seen == [changed, again],
            [len(s) for s in seen],
        )
    finally:
        await context.shutdown()
    c.done()
