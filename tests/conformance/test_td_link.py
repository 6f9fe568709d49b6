"""TD_COAP_LINK_01–09 (ETSI CoAP#4, link.yml; RFC 6690) through the proxy, on the wire.

The proxy serves /.well-known/core itself from its route policy: each route's target
attributes (rt, if, ct, sz) are declared in the policy below, grouped the way the TDs ask
(LINK_04's four rt groups, LINK_05's four if groups, ...). /path and its sub-resources are
ordinary routes to the origin, which answers /path in link-format (LINK_09).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from proxy.server import RunningProxy
from tests.conformance import wire as w
from tests.conformance.checks import Checks
from tests.conformance.origin import OriginState
from tests.conformance.rig import running_proxy
from tests.conformance.wire import Wire
from tests.support.clients import coap_client

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="session")]

LINK_FORMAT = 40

# TD_COAP_LINK_04's fourth group is rt="" (an empty type). A policy cannot declare an empty rt
# (RFC 6690 §3.1: a relation type is a non-empty token), so that group is a route without rt;
# the TD's expected answer (groups 1 and 2 only) is the same either way.
POLICY = """
[[route]]
path = "/test"
methods = ["GET"]
target = "/test"

[[route]]
path = "/rt/a"
methods = ["GET"]
target = "/rt/a"
link = { rt = "Type1 Type2" }

[[route]]
path = "/rt/b"
methods = ["GET"]
target = "/rt/b"
link = { rt = "Type2 Type3" }

[[route]]
path = "/rt/c"
methods = ["GET"]
target = "/rt/c"
link = { rt = "Type1 Type3" }

[[route]]
path = "/rt/d"
methods = ["GET"]
target = "/rt/d"

[[route]]
path = "/if/one"
methods = ["GET"]
target = "/if/one"
link = { if = "If1" }

[[route]]
path = "/if/two"
methods = ["GET"]
target = "/if/two"
link = { if = "If2" }

[[route]]
path = "/if/foo"
methods = ["GET"]
target = "/if/foo"
link = { if = "foo" }

[[route]]
path = "/sz/big"
methods = ["GET"]
target = "/sz/big"
link = { sz = 2500, ct = 0 }

[[route]]
path = "/link1"
methods = ["GET"]
target = "/link1"

[[route]]
path = "/link2"
methods = ["GET"]
target = "/link2"

[[route]]
path = "/link3"
methods = ["GET"]
target = "/link3"

[[route]]
path = "/path"
methods = ["GET"]
target = "/path"
link = { ct = 40 }

[[route]]
path = "/path/sub1"
methods = ["GET"]
target = "/path/sub1"

[[route]]
path = "/path/sub2"
methods = ["GET"]
target = "/path/sub2"
"""

ROUTES = {
    "/test",
    "/rt/a",
    "/rt/b",
    "/rt/c",
    "/rt/d",
    "/if/one",
    "/if/two",
    "/if/foo",
    "/sz/big",
    "/link1",
    "/link2",
    "/link3",
    "/path",
    "/path/sub1",
    "/path/sub2",
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proxy(
    tmp_path_factory: pytest.TempPathFactory, origin: tuple[OriginState, str]
) -> AsyncIterator[RunningProxy]:
    async with running_proxy(tmp_path_factory.mktemp("link"), POLICY, origin[1]) as running:
        yield running


def parse_links(payload: bytes) -> dict[str, dict[str, str]]:
    """CoRE Link Format (RFC 6690 §2) → {href: {attribute: value}}; quoted values unquoted,
    a flag attribute has the value ""."""
    links: dict[str, dict[str, str]] = {}
    text = payload.decode()
    position = 0
    while position < len(text):
        if text[position] != "<":
            raise ValueError(f"not a link at {position}: {text[position:]!r}")
        end = text.index(">", position)
        href = text[position + 1 : end]
        position = end + 1
        attributes: dict[str, str] = {}
        while position < len(text) and text[position] == ";":
            position += 1
            name_end = position
            while name_end < len(text) and text[name_end] not in "=;,":
                name_end += 1
            name = text[position:name_end]
            position = name_end
            value = ""
            if position < len(text) and text[position] == "=":
                position += 1
                if text[position] == '"':
                    close = text.index('"', position + 1)
                    value = text[position + 1 : close]
                    position = close + 1
                else:
                    value_end = position
                    while value_end < len(text) and text[value_end] not in ";,":
                        value_end += 1
                    value = text[position:value_end]
                    position = value_end
            attributes[name] = value
        links[href] = attributes
        if position < len(text):
            if text[position] != ",":
                raise ValueError(f"expected ',' at {position}: {text[position:]!r}")
            position += 1
    return links


async def discover(
    c: Checks, wire: Wire, queries: list[str], label: str = "2.05, Content-Format 40"
) -> dict[str, dict[str, str]]:
    _mid, _tok, answer = await wire.exchange(w.GET, "/.well-known/core", queries=queries)
    c.check(
        label,
        answer.code == w.CONTENT and w.content_format(answer) == LINK_FORMAT,
        f"{w.code_text(answer.code)} cf={w.content_format(answer)}",
    )
    try:
        return parse_links(answer.payload) if answer.payload else {}
    except ValueError as exc:
        return {"<unparseable>": {"error": str(exc), "payload": answer.payload.decode()}}


def url(proxy: RunningProxy, path: str) -> str:
    host, port = proxy.address
    return f"coap://{host}:{port}{path}"


async def test_td_coap_link_01(wire: Wire, proxy: RunningProxy) -> None:
    c = Checks("TD_COAP_LINK_01")
    _mid, _tok, answer = await wire.exchange(w.GET, "/.well-known/core")
    c.check("2.05 Content", answer.code == w.CONTENT, w.code_text(answer.code))
    c.check("Content-Format 40", w.content_format(answer) == LINK_FORMAT, answer.options)
    links = parse_links(answer.payload)
    c.check("every route listed", set(links) >= ROUTES, sorted(set(links)))
    run = await coap_client("-m", "get", url(proxy, "/.well-known/core"))
    c.check("coap-client displays the links", "</link1>" in run.stdout, run.stdout[-400:])
    c.done()


@pytest.mark.parametrize(
    ("td", "query", "label", "expected"),
    [
        ("TD_COAP_LINK_02", "rt=Type1", "only the links of type Type1", {"/rt/a", "/rt/c"}),
        (
            "TD_COAP_LINK_04",
            "rt=Type2",
            "only groups 'Type1 Type2' and 'Type2 Type3'",
            {"/rt/a", "/rt/b"},
        ),
        ("TD_COAP_LINK_05", "if=If*", "only if=If1 and if=If2", {"/if/one", "/if/two"}),
        ("TD_COAP_LINK_07", "href=/link1", "only /link1", {"/link1"}),
        (
            "TD_COAP_LINK_08",
            "href=/link*",
            "only /link1, /link2, /link3",
            {"/link1", "/link2", "/link3"},
        ),
    ],
)
async def test_td_coap_link_filters(
    wire: Wire, td: str, query: str, label: str, expected: set[str]
) -> None:
    c = Checks(td)
    links = await discover(c, wire, [query])
    c.check(label, set(links) == expected, f"?{query} → {sorted(links)}")
    c.done()


async def test_td_coap_link_03(wire: Wire) -> None:
    c = Checks("TD_COAP_LINK_03")
    _mid, _tok, answer = await wire.exchange(w.GET, "/.well-known/core")
    everything = parse_links(answer.payload)
    typed = {href for href, attributes in everything.items() if "rt" in attributes}
    links = await discover(c, wire, ["rt=*"])
    c.check(
        "every link with rt, none without",
        bool(typed) and set(links) == typed and {"/rt/a", "/rt/b", "/rt/c"} <= typed,
        f"?rt=* → {sorted(links)}; links with rt: {sorted(typed)}",
    )
    c.done()


async def test_td_coap_link_06(wire: Wire) -> None:
    c = Checks("TD_COAP_LINK_06")
    links = await discover(c, wire, ["sz=*"])
    c.check(
        "only the links with sz",
        set(links) == {"/sz/big"} and links["/sz/big"].get("sz") == "2500",
        f"?sz=* → {links}",
    )
    c.done()


async def test_td_coap_link_09(wire: Wire) -> None:
    c = Checks("TD_COAP_LINK_09")
    _mid, _tok, answer = await wire.exchange(w.GET, "/.well-known/core")
    links = parse_links(answer.payload)
    c.check(
        "discovery lists /path with ct=40",
        links.get("/path", {}).get("ct") == "40",
        links.get("/path"),
    )
    _mid, _tok, answer = await wire.exchange(w.GET, "/path")
    c.check(
        "GET /path: 2.05, Content-Format 40",
        answer.code == w.CONTENT and w.content_format(answer) == LINK_FORMAT,
        answer,
    )
    children = parse_links(answer.payload) if answer.payload else {}
    c.check(
        "GET /path: lists /path/sub1 and /path/sub2",
        {"/path/sub1", "/path/sub2"} <= set(children),
        answer.payload,
    )
    _mid, _tok, answer = await wire.exchange(w.GET, "/path/sub1")
    c.check(
        "GET /path/sub1: 2.05 naming /path/sub1",
        answer.code == w.CONTENT and b"/path/sub1" in answer.payload,
        answer,
    )
    c.done()
