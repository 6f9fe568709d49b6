"""TD_COAP_CORE_01–23 and 31 (ETSI CoAP#4, base.yml) through the proxy, on the wire.

Each test is one TD: the request the TD describes, sent as exact datagrams (types, MIDs and
tokens matter here), and every server-side check line of the TD held against the answer; where
a TD ends in "client displays", a real client (libcoap's coap-client, aiocoap-client) runs the
same request through the proxy too. The origin behind the proxy is tests/conformance/origin.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from proxy.coap.codec import ACK, CON, NON, RST, decode, encode_parts
from proxy.server import RunningProxy
from tests.conformance import wire as w
from tests.conformance.checks import Checks
from tests.conformance.origin import OriginState
from tests.conformance.rig import running_proxy
from tests.conformance.wire import Wire
from tests.support.clients import aiocoap_client, coap_client

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="session")]

POLICY = """
[[route]]
path = "/test"
methods = ["GET", "POST", "PUT", "DELETE"]
target = "/test"

[[route]]
path = "/separate"
methods = ["GET"]
target = "/separate"

[[route]]
path = "/seg1/seg2/seg3"
methods = ["GET"]
target = "/seg1/seg2/seg3"

[[route]]
path = "/query"
methods = ["GET"]
target = "/query"

[[route]]
path = "/location-query"
methods = ["POST"]
target = "/location-query"

[[route]]
path = "/location1/location2/location3"
methods = ["GET"]
target = "/location1/location2/location3"

[[route]]
path = "/multi-format"
methods = ["GET"]
target = "/multi-format"

[[route]]
path = "/validate"
methods = ["GET", "PUT"]
target = "/validate"

[[route]]
path = "/create1"
methods = ["PUT"]
target = "/create1"
"""

TEXT_PLAIN = 0
APPLICATION_XML = 41


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proxy(
    tmp_path_factory: pytest.TempPathFactory, origin: tuple[OriginState, str]
) -> AsyncIterator[RunningProxy]:
    async with running_proxy(tmp_path_factory.mktemp("core"), POLICY, origin[1]) as running:
        yield running


@pytest.fixture
def state(origin: tuple[OriginState, str]) -> OriginState:
    return origin[0]


def url(proxy: RunningProxy, path: str) -> str:
    host, port = proxy.address
    return f"coap://{host}:{port}{path}"


def _cf_if_payload(message: object) -> bool:
    assert isinstance(message, w.Message)
    return not message.payload or w.content_format(message) is not None


def _no_slash(message: w.Message) -> bool:
    return all("/" not in seg for seg in w.texts(message, w.LOCATION_PATH))


def _check_205(c: Checks, mid: int, token: bytes, answer: w.Message) -> None:
    c.check("2.05 Content", answer.code == w.CONTENT, w.code_text(answer.code))
    c.check("MID = CMID", answer.mid == mid, answer.mid)
    c.check("token = CTOK", answer.token == token, answer.token.hex())
    c.check("Content-Format", w.content_format(answer) is not None, answer.options)
    c.check("payload non-empty", bool(answer.payload), answer.payload)


async def test_td_coap_core_01(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_01")
    mid, token, answer = await wire.exchange(w.GET, "/test")
    c.check("piggybacked in ACK", answer.mtype == ACK, answer)
    _check_205(c, mid, token, answer)
    run = await coap_client("-m", "get", url(proxy, "/test"))
    c.check("coap-client displays the payload", "TD test resource" in run.stdout, run.stdout)
    c.done()


async def test_td_coap_core_02(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_02")
    mid, token, answer = await wire.exchange(w.DELETE, "/test")
    c.check("2.02 Deleted", answer.code == w.DELETED, w.code_text(answer.code))
    c.check("piggybacked in ACK", answer.mtype == ACK, answer)
    c.check("MID = CMID", answer.mid == mid)
    c.check("token = CTOK", answer.token == token)
    c.check("Content-Format if payload", _cf_if_payload(answer), answer)
    run = await coap_client("-m", "delete", url(proxy, "/test"))
    c.check("coap-client gets 2.02", run.codes == ["2.02"], run.stdout)
    c.done()


async def test_td_coap_core_03(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_CORE_03")
    body = b"PUT by TD_COAP_CORE_03"
    mid, token, answer = await wire.exchange(
        w.PUT, "/test", options=[(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))], payload=body
    )
    c.check("2.04 or 2.01", answer.code in (w.CHANGED, w.CREATED), w.code_text(answer.code))
    c.check("MID = CMID", answer.mid == mid)
    c.check("token = CTOK", answer.token == token)
    c.check("Content-Format if payload", _cf_if_payload(answer), answer)
    calls = state.calls("/test")
    c.check(
        "origin got the body and its media type",
        bool(calls)
        and calls[-1].body == body
        and calls[-1].headers.get("content-type", "").startswith("text/plain"),
        calls[-1:] or "no call",
    )
    run = await coap_client("-m", "put", "-t", "0", "-e", "by libcoap", url(proxy, "/test"))
    c.check("coap-client gets 2.04/2.01", run.codes in (["2.04"], ["2.01"]), run.stdout)
    c.done()


async def test_td_coap_core_04(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_04")
    mid, token, answer = await wire.exchange(
        w.POST, "/test", options=[(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))], payload=b"post"
    )
    c.check("2.01 or 2.04", answer.code in (w.CREATED, w.CHANGED), w.code_text(answer.code))
    c.check("MID = CMID", answer.mid == mid)
    c.check("token = CTOK", answer.token == token)
    c.check("Content-Format if payload", _cf_if_payload(answer), answer)
    c.check("Location-Path values carry no '/'", _no_slash(answer), answer.options)
    run = await coap_client("-m", "post", "-t", "0", "-e", "by libcoap", url(proxy, "/test"))
    c.check("coap-client gets 2.01/2.04", run.codes in (["2.01"], ["2.04"]), run.stdout)
    c.done()


async def test_td_coap_core_05(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_05")
    _mid, token, answer = await wire.exchange(w.GET, "/test", mtype=NON)
    c.check("NON response (no ACK)", answer.mtype == NON, answer)
    c.check("2.05 Content", answer.code == w.CONTENT, w.code_text(answer.code))
    c.check("token = CTOK", answer.token == token)
    c.check("Content-Format", w.content_format(answer) is not None, answer.options)
    run = await coap_client("-N", "-m", "get", url(proxy, "/test"))
    c.check("coap-client -N displays", "TD test resource" in run.stdout, run.stdout)
    c.done()


@pytest.mark.parametrize(
    ("td", "method", "codes", "label"),
    [
        ("TD_COAP_CORE_06", w.DELETE, (w.DELETED,), "2.02 Deleted"),
        ("TD_COAP_CORE_07", w.PUT, (w.CHANGED, w.CREATED), "2.04 or 2.01"),
        ("TD_COAP_CORE_08", w.POST, (w.CREATED, w.CHANGED), "2.01 or 2.04"),
    ],
)
async def test_td_coap_core_06_07_08_non(
    wire: Wire, td: str, method: int, codes: tuple[int, ...], label: str
) -> None:
    c = Checks(td)
    options = [] if method == w.DELETE else [(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))]
    payload = b"" if method == w.DELETE else b"NON payload"
    _mid, token, answer = await wire.exchange(
        method, "/test", mtype=NON, options=options, payload=payload
    )
    c.check("NON response (no ACK)", answer.mtype == NON, answer)
    c.check(label, answer.code in codes, w.code_text(answer.code))
    c.check("token = CTOK", answer.token == token)
    c.check("Content-Format if payload", _cf_if_payload(answer), answer)
    if td == "TD_COAP_CORE_08":
        c.check("Location-Path values carry no '/'", _no_slash(answer), answer.options)
    c.done()


async def _separate_checks(c: Checks, wire: Wire, token: bytes, *, cf: bool) -> w.Message:
    mid, _tok, first = await wire.exchange(w.GET, "/separate", token=token)
    c.check("empty ACK: type ACK, code 0.00", first.mtype == ACK and first.code == 0, first)
    c.check(
        "empty ACK: MID = CMID, no payload",
        first.mid == mid and not first.payload and not first.token,
        first,
    )
    response = await wire.response(first)
    c.check("separate response is CON", response.mtype == CON, response)
    c.check("separate 2.05 Content", response.code == w.CONTENT, w.code_text(response.code))
    c.check("separate token = CTOK", response.token == token, response.token.hex())
    if cf:
        c.check("separate Content-Format", w.content_format(response) is not None)
    c.check("separate payload non-empty", bool(response.payload))
    return response


async def test_td_coap_core_09(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_09")
    await _separate_checks(c, wire, w.next_token(), cf=True)
    run = await coap_client("-m", "get", url(proxy, "/separate"))
    c.check(
        "coap-client displays the separate response", "separate answer" in run.stdout, run.stdout
    )
    c.done()


async def test_td_coap_core_10(wire: Wire) -> None:
    c = Checks("TD_COAP_CORE_10")
    token = bytes.fromhex("0102030405060708")
    mid, _tok, answer = await wire.exchange(w.GET, "/test", token=token)
    c.check("piggybacked in ACK", answer.mtype == ACK, answer)
    _check_205(c, mid, token, answer)
    c.done()


async def test_td_coap_core_11(wire: Wire) -> None:
    c = Checks("TD_COAP_CORE_11")
    await _separate_checks(c, wire, bytes.fromhex("a1b2c3d4e5"), cf=False)
    c.done()


async def test_td_coap_core_12(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_12")
    mid, _tok, answer = await wire.exchange(w.GET, "/test", token=b"")
    c.check("2.05 Content", answer.code == w.CONTENT, w.code_text(answer.code))
    c.check("MID = CMID", answer.mid == mid)
    c.check("token empty", answer.token == b"", answer.token.hex())
    c.check("Content-Format", w.content_format(answer) is not None)
    c.check("payload non-empty", bool(answer.payload))
    # The TD's last step, "client displays the response", with aiocoap's client.
    run = await aiocoap_client(url(proxy, "/test"))
    c.check("aiocoap-client displays the payload", "TD test resource" in run.stdout, run.stdout)
    c.done()


async def test_td_coap_core_13(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_CORE_13")
    mid, token, answer = await wire.exchange(w.GET, "/seg1/seg2/seg3")
    _check_205(c, mid, token, answer)
    c.check("origin got /seg1/seg2/seg3", len(state.calls("/seg1/seg2/seg3")) == 1)
    run = await coap_client("-m", "get", url(proxy, "/seg1/seg2/seg3"))
    c.check("coap-client displays the payload", "/seg1/seg2/seg3" in run.stdout, run.stdout)
    c.done()


async def test_td_coap_core_14(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    c = Checks("TD_COAP_CORE_14")
    queries = ["first=1", "second=2", "third=3"]
    mid, token, answer = await wire.exchange(w.GET, "/query", queries=queries)
    _check_205(c, mid, token, answer)
    calls = state.calls("/query")
    c.check(
        "origin got the three queries",
        [call.query for call in calls] == ["first=1&second=2&third=3"],
        calls,
    )
    run = await coap_client("-m", "get", url(proxy, "/query?first=1&second=2&third=3"))
    c.check("coap-client displays the payload", "first=1&second=2" in run.stdout, run.stdout)
    c.done()


async def test_td_coap_core_15(wire: Wire, proxy: RunningProxy, state: OriginState) -> None:
    """The lossy gateway is played by the test: a lost request is one the proxy never saw (the
    client's retransmission is the first copy it gets); a lost response is one the client never
    read, so it retransmits the same datagram (same MID, RFC 7252 §4.2) and must get the same
    answer without a second origin call (§4.5)."""
    c = Checks("TD_COAP_CORE_15")
    mid, token = w.next_mid(), w.next_token()
    datagram = w.request_bytes(w.GET, "/test", mid=mid, token=token)
    lost = await wire.client.request(datagram)  # this answer is "lost" on the way back
    again = await wire.client.request(datagram)
    c.check(
        "retransmitted request answered 2.05 piggybacked",
        again.mtype == ACK and again.code == w.CONTENT and again.mid == mid,
        again,
    )
    c.check("answer to the retransmission = the lost answer (same bytes)", again == lost)
    c.check("origin called once for both copies", len(state.calls("/test")) == 1)
    # libcoap's own loss switch drops its first datagram (the request); it retransmits.
    run = await coap_client("-l", "1", "-m", "get", url(proxy, "/test"))
    c.check(
        "coap-client recovers from its lost request", "TD test resource" in run.stdout, run.stdout
    )
    c.done()


async def test_td_coap_core_16(wire: Wire, state: OriginState) -> None:
    """Lost ACKs, both ways: the client's retransmission while the proxy still waits for the
    origin gets another empty ACK (RFC 7252 §4.2, §5.2.2); the client's ACK of the separate
    response is lost, so the proxy retransmits it with the same MID after ACK_TIMEOUT."""
    c = Checks("TD_COAP_CORE_16")
    mid, token = w.next_mid(), w.next_token()
    datagram = w.request_bytes(w.GET, "/separate", mid=mid, token=token)
    first = await wire.client.request(datagram)
    c.check("empty ACK: MID = CMID", first.mtype == ACK and first.code == 0 and first.mid == mid)
    again = await wire.client.request(datagram)  # as if the first empty ACK was lost
    c.check(
        "retransmitted request while pending: empty ACK again",
        again.mtype == ACK and again.code == 0 and again.mid == mid,
        again,
    )
    response = await wire.client.recv_message(timeout=5.0)
    c.check(
        "separate response CON 2.05 with Content-Format and payload",
        response.mtype == CON
        and response.code == w.CONTENT
        and response.token == token
        and w.content_format(response) is not None
        and bool(response.payload),
        response,
    )
    # Our ACK is "lost": RFC 7252 §4.2 has the proxy retransmit within ACK_TIMEOUT *
    # ACK_RANDOM_FACTOR (3 s) of its first transmission.
    repeated = await wire.client.recv_message(timeout=5.0)
    c.check(
        "separate response retransmitted (same MID, token) while not acknowledged",
        repeated.mtype == CON and repeated.mid == response.mid and repeated.token == token,
        repeated,
    )
    wire.client.send(encode_parts(ACK, 0, response.mid, b"", [], b""))
    c.check("origin called once", len(state.calls("/separate")) == 1, state.calls("/separate"))
    c.done()


async def test_td_coap_core_17(wire: Wire) -> None:
    c = Checks("TD_COAP_CORE_17")
    _mid, token, answer = await wire.exchange(w.GET, "/separate", mtype=NON)
    c.check("no empty ACK", answer.mtype != ACK, answer)
    c.check("NON response", answer.mtype == NON, answer)
    c.check("2.05 Content", answer.code == w.CONTENT, w.code_text(answer.code))
    c.check("token = CTOK", answer.token == token)
    c.check("Content-Format", w.content_format(answer) is not None)
    c.check("payload non-empty", bool(answer.payload))
    c.done()


async def test_td_coap_core_18(wire: Wire) -> None:
    c = Checks("TD_COAP_CORE_18")
    mid, token, answer = await wire.exchange(
        w.POST, "/test", options=[(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))], payload=b"new"
    )
    c.check("2.01 Created", answer.code == w.CREATED, w.code_text(answer.code))
    c.check("MID = CMID", answer.mid == mid)
    c.check("token = CTOK", answer.token == token)
    c.check(
        "Location-Path = location1, location2, location3",
        w.texts(answer, w.LOCATION_PATH) == ["location1", "location2", "location3"],
        answer.options,
    )
    c.done()


async def test_td_coap_core_19(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_19")
    mid, token, answer = await wire.exchange(
        w.POST, "/location-query", options=[(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))], payload=b"q"
    )
    c.check("2.01 Created", answer.code == w.CREATED, w.code_text(answer.code))
    c.check("MID = CMID", answer.mid == mid)
    c.check("token = CTOK", answer.token == token)
    c.check(
        "Location-Query = first=1, second=2",
        w.texts(answer, w.LOCATION_QUERY) == ["first=1", "second=2"],
        answer.options,
    )
    run = await coap_client("-m", "post", "-t", "0", "-e", "x", url(proxy, "/location-query"))
    c.check("coap-client gets 2.01", run.codes == ["2.01"], run.stdout)
    c.done()


async def test_td_coap_core_20(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_CORE_20")
    for accept, name, marker in ((TEXT_PLAIN, "0", b"multi-format"), (APPLICATION_XML, "41", b"<")):
        mid, token, answer = await wire.exchange(
            w.GET, "/multi-format", options=[(w.ACCEPT, w.uint(accept))]
        )
        c.check(
            f"Accept {name}: 2.05, MID, token",
            answer.code == w.CONTENT and answer.mid == mid and answer.token == token,
            answer,
        )
        c.check(f"Accept {name}: Content-Format {name}", w.content_format(answer) == accept)
        label = "text payload" if accept == TEXT_PLAIN else "XML payload"
        c.check(
            f"Accept {name}: {label}",
            answer.payload.startswith(marker) if accept else answer.payload == marker,
            answer.payload,
        )
    run = await coap_client("-A", "41", "-m", "get", url(proxy, "/multi-format"))
    c.check("coap-client -A 41 displays the XML", "<value>" in run.stdout, run.stdout)
    c.done()


async def test_td_coap_core_21(wire: Wire) -> None:
    c = Checks("TD_COAP_CORE_21")
    mid, token, answer = await wire.exchange(w.GET, "/validate")
    c.check(
        "first GET: 2.05, MID, token",
        answer.code == w.CONTENT and answer.mid == mid and answer.token == token,
        answer,
    )
    etag1 = w.one(answer, w.ETAG)
    c.check("first GET: ETag (ETAG1)", etag1 is not None, answer.options)
    c.check("first GET: payload non-empty", bool(answer.payload))
    first_payload = answer.payload
    if etag1 is not None:
        mid, token, answer = await wire.exchange(w.GET, "/validate", options=[(w.ETAG, etag1)])
        c.check(
            "GET with ETAG1: 2.03 Valid, MID, token",
            answer.code == w.VALID and answer.mid == mid and answer.token == token,
            answer,
        )
        c.check("GET with ETAG1: ETag = ETAG1", w.one(answer, w.ETAG) == etag1, answer.options)
        c.check("GET with ETAG1: empty payload", answer.payload == b"", answer.payload)
    # Update from a CoAP client, then ask again with the old tag.
    await wire.exchange(
        w.PUT,
        "/validate",
        options=[(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))],
        payload=b"validate v2",
    )
    if etag1 is not None:
        _mid, _token, answer = await wire.exchange(w.GET, "/validate", options=[(w.ETAG, etag1)])
        c.check("after update, GET with ETAG1: 2.05", answer.code == w.CONTENT, answer)
        etag = w.one(answer, w.ETAG)
        c.check("after update: ETag != ETAG1", etag is not None and etag != etag1, answer.options)
        c.check(
            "after update: the new payload",
            answer.payload == b"validate v2" and answer.payload != first_payload,
            answer.payload,
        )
    c.done()


async def test_td_coap_core_22(wire: Wire, state: OriginState) -> None:
    c = Checks("TD_COAP_CORE_22")
    text = [(w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))]
    _mid, _token, answer = await wire.exchange(w.GET, "/validate")
    etag1 = w.one(answer, w.ETAG)
    c.check(
        "GET: 2.05 with ETag (ETAG1) and payload",
        answer.code == w.CONTENT and etag1 is not None and bool(answer.payload),
        answer,
    )
    if etag1 is None:
        c.done()
    assert etag1 is not None
    mid, token, answer = await wire.exchange(
        w.PUT, "/validate", options=[(w.IF_MATCH, etag1), *text], payload=b"atomic update"
    )
    c.check(
        "PUT If-Match ETAG1: 2.04, MID, token",
        answer.code == w.CHANGED and answer.mid == mid and answer.token == token,
        answer,
    )
    _mid, _token, answer = await wire.exchange(w.GET, "/validate")
    etag2 = w.one(answer, w.ETAG)
    c.check(
        "GET: 2.05, ETag ETAG2 != ETAG1",
        answer.code == w.CONTENT and etag2 is not None and etag2 != etag1,
        answer,
    )
    c.check("GET: payload = the PUT's", answer.payload == b"atomic update", answer.payload)
    _mid, _token, answer = await wire.exchange(
        w.PUT, "/validate", options=text, payload=b"another client's update"
    )
    c.check("PUT without If-Match: 2.04", answer.code == w.CHANGED, answer)
    if etag2 is not None:
        mid, token, answer = await wire.exchange(
            w.PUT, "/validate", options=[(w.IF_MATCH, etag2), *text], payload=b"stale update"
        )
        c.check(
            "PUT If-Match ETAG2 (stale): 4.12, MID, token",
            answer.code == w.PRECONDITION_FAILED and answer.mid == mid and answer.token == token,
            answer,
        )
    c.check(
        "resource not changed by the refused PUT",
        state.validate_body == b"another client's update",
        state.validate_body,
    )
    c.done()


async def test_td_coap_core_23(wire: Wire, state: OriginState) -> None:
    c = Checks("TD_COAP_CORE_23")
    options = [(w.IF_NONE_MATCH, b""), (w.CONTENT_FORMAT, w.uint(TEXT_PLAIN))]
    mid, token, answer = await wire.exchange(
        w.PUT, "/create1", options=options, payload=b"first creation"
    )
    c.check(
        "first PUT: 2.01 Created, MID, token",
        answer.code == w.CREATED and answer.mid == mid and answer.token == token,
        answer,
    )
    c.check("origin created the resource", state.create1 == b"first creation", state.create1)
    mid, token, answer = await wire.exchange(
        w.PUT, "/create1", options=options, payload=b"concurrent creation"
    )
    c.check(
        "second PUT: 4.12, MID, token",
        answer.code == w.PRECONDITION_FAILED and answer.mid == mid and answer.token == token,
        answer,
    )
    c.check("resource not overwritten", state.create1 == b"first creation", state.create1)
    c.done()


async def test_td_coap_core_31(wire: Wire) -> None:
    c = Checks("TD_COAP_CORE_31")
    mid = w.next_mid()
    ping = encode_parts(CON, 0, mid, b"", [], b"")
    assert len(ping) == 4
    wire.client.send(ping)
    raw = await wire.client.recv(timeout=5.0)
    c.check("four-byte answer", len(raw) == 4, raw.hex())
    answer = decode(raw)
    c.check("type RST, code 0.00", answer.mtype == RST and answer.code == 0, answer)
    c.check("MID = CMID", answer.mid == mid, answer.mid)
    c.check("zero-length token, no payload", answer.token == b"" and answer.payload == b"")
    c.done()
