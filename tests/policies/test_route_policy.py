"""The route policy (docs/CONTRACT.md §3): the default file, lookups, and every
malformed-policy case."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.routes import (
    Policy,
    PolicyError,
    Route,
    RouteMatch,
    default_policy_text,
    load_policy,
    parse_policy,
)
from policies.status import METHODS
from proxy.coap import codes
from proxy.forward import table_for

# The policy names CoAP methods and codes in RFC notation (policies/status.py).
GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = METHODS
NOT_FOUND, METHOD_NOT_ALLOWED = "4.04", "4.05"


@pytest.fixture(scope="module")
def default_policy() -> Policy:
    return load_policy()


# docs/CONTRACT.md §3, the default route policy:
# (path, method, HTTP target, HTTP method, batch target).
# Telemetry travels in batches when many devices send at once (group commit); the device
# reads of /bootstrap and /location (issues #5 and #6) one call each.
DEFAULT_ROUTES = [
    pytest.param("/", POST, "/ingest", "POST", "/ingest/batch", id="root-POST"),
    pytest.param("/data", POST, "/ingest", "POST", "/ingest/batch", id="data-POST"),
    pytest.param("/bootstrap", GET, "/bootstrap", "GET", None, id="bootstrap-GET"),
    pytest.param("/location", GET, "/location", "GET", None, id="location-GET"),
]


@pytest.mark.parametrize(
    ("path", "method", "target", "http_method", "batch_target"), DEFAULT_ROUTES
)
def test_default_policy_routes(
    default_policy: Policy,
    path: str,
    method: str,
    target: str,
    http_method: str,
    batch_target: str | None,
) -> None:
    found = default_policy.match(path, method)
    assert found.error == ""
    assert found.route is not None
    assert found.route.target == target
    assert found.route.http_method_for(method) == http_method
    assert found.route.batch_target == batch_target


def test_default_policy_has_exactly_these_routes(default_policy: Policy) -> None:
    assert set(default_policy.routes) == {
        "/",
        "/data",
        "/bootstrap",
        "/location",
        "/commands/{device}",
    }
    commands = default_policy.routes["/commands/{device}"]
    assert commands.observe
    assert commands.observe_ack
    assert commands.idempotent


def test_default_policy_serves_only_bootstrap_over_plain_coap(default_policy: Policy) -> None:
    # docs/CONTRACT.md §6: in production mode a device without its PSK may fetch it, nothing
    # else.
    assert [path for path, route in default_policy.routes.items() if route.plain] == ["/bootstrap"]


@pytest.mark.parametrize(
    ("path", "topic_query"),
    [
        pytest.param("/", True, id="root"),
        pytest.param("/data", True, id="data"),
        pytest.param("/bootstrap", False, id="bootstrap"),
        pytest.param("/location", False, id="location"),
    ],
)
def test_default_policy_topic_rules(default_policy: Policy, path: str, topic_query: bool) -> None:
    # docs/CONTRACT.md §3: the optional `t` query belongs to `/` and `/data` only.
    route = default_policy.routes.get(path)
    assert route is not None
    assert route.topic_query is topic_query


# "any of the above, other method → 4.05; anything else → 4.04" (docs/CONTRACT.md §3).
DEFAULT_ERRORS = [
    pytest.param("/", GET, METHOD_NOT_ALLOWED, id="root-GET"),
    pytest.param("/", PUT, METHOD_NOT_ALLOWED, id="root-PUT"),
    pytest.param("/data", GET, METHOD_NOT_ALLOWED, id="data-GET"),
    pytest.param("/data", DELETE, METHOD_NOT_ALLOWED, id="data-DELETE"),
    pytest.param("/data", FETCH, METHOD_NOT_ALLOWED, id="data-FETCH"),
    pytest.param("/bootstrap", POST, METHOD_NOT_ALLOWED, id="bootstrap-POST"),
    pytest.param("/bootstrap", PUT, METHOD_NOT_ALLOWED, id="bootstrap-PUT"),
    pytest.param("/bootstrap", DELETE, METHOD_NOT_ALLOWED, id="bootstrap-DELETE"),
    pytest.param("/location", POST, METHOD_NOT_ALLOWED, id="location-POST"),
    pytest.param("/location", PUT, METHOD_NOT_ALLOWED, id="location-PUT"),
    pytest.param("/location", DELETE, METHOD_NOT_ALLOWED, id="location-DELETE"),
    pytest.param("/location", FETCH, METHOD_NOT_ALLOWED, id="location-FETCH"),
    pytest.param("/location/x", GET, NOT_FOUND, id="below-location"),
    pytest.param("/Bootstrap", GET, NOT_FOUND, id="bootstrap-case-sensitive"),
    pytest.param("/nope", GET, NOT_FOUND, id="unknown-GET"),
    pytest.param("/nope", POST, NOT_FOUND, id="unknown-POST"),
    pytest.param("/data/x", POST, NOT_FOUND, id="below-data"),
    pytest.param("/ingest", POST, NOT_FOUND, id="upstream-path-is-not-a-resource"),
    pytest.param("/DATA", POST, NOT_FOUND, id="paths-are-case-sensitive"),
]


@pytest.mark.parametrize(("path", "method", "error"), DEFAULT_ERRORS)
def test_default_policy_errors(default_policy: Policy, path: str, method: str, error: str) -> None:
    assert default_policy.match(path, method) == RouteMatch(None, error)


def test_load_policy_default_is_the_packaged_file() -> None:
    assert load_policy() == parse_policy(default_policy_text())


def test_load_policy_from_file(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[[route]]\npath = "/x"\nmethods = ["GET"]\ntarget = "/y"\n')
    assert load_policy(policy_file).match("/x", GET).route == Route(
        path="/x", methods=frozenset({GET}), target="/y"
    )
    assert load_policy(str(policy_file)) == load_policy(policy_file)


def test_load_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "absent.toml")


def route_toml(**fields: str) -> str:
    values = {"path": '"/x"', "methods": '["GET"]', "target": '"/y"'}
    values.update(fields)
    body = "".join(f"{key} = {value}\n" for key, value in values.items() if value)
    return "[[route]]\n" + body


PARSED = [
    pytest.param(
        route_toml(),
        Route(path="/x", methods=frozenset({GET}), target="/y"),
        id="minimal",
    ),
    pytest.param(
        route_toml(methods='["post", "Put"]'),
        Route(path="/x", methods=frozenset({POST, PUT}), target="/y"),
        id="method-names-any-case",
    ),
    pytest.param(
        route_toml(methods='["FETCH", "PATCH", "iPATCH"]', http_method='"POST"'),
        Route(
            path="/x", methods=frozenset({FETCH, PATCH, IPATCH}), target="/y", http_method="POST"
        ),
        id="rfc8132-methods",
    ),
    pytest.param(
        route_toml(batch_target='"http://other:8000/many"'),
        Route(
            path="/x", methods=frozenset({GET}), target="/y", batch_target="http://other:8000/many"
        ),
        id="absolute-batch-target",
    ),
    pytest.param(
        route_toml(methods='["GET", "GET"]'),
        Route(path="/x", methods=frozenset({GET}), target="/y"),
        id="repeated-method",
    ),
    pytest.param(
        route_toml(path='"/data/"'),
        Route(path="/data", methods=frozenset({GET}), target="/y"),
        id="trailing-slash-normalised",
    ),
    pytest.param(
        route_toml(path='"//a//b"'),
        Route(path="/a/b", methods=frozenset({GET}), target="/y"),
        id="empty-segments-normalised",
    ),
    pytest.param(
        route_toml(target='"https://backend.example:8443/in"'),
        Route(path="/x", methods=frozenset({GET}), target="https://backend.example:8443/in"),
        id="absolute-https-target",
    ),
    pytest.param(
        route_toml(target='"http://backend/in"'),
        Route(path="/x", methods=frozenset({GET}), target="http://backend/in"),
        id="absolute-http-target",
    ),
    pytest.param(
        route_toml(http_method='"put"'),
        Route(path="/x", methods=frozenset({GET}), target="/y", http_method="PUT"),
        id="http-method-uppercased",
    ),
    pytest.param(
        route_toml(topic_query="true"),
        Route(path="/x", methods=frozenset({GET}), target="/y", topic_query=True),
        id="topic-query",
    ),
    pytest.param(
        route_toml(idempotent="true"),
        Route(path="/x", methods=frozenset({GET}), target="/y", idempotent=True),
        id="idempotent",
    ),
    pytest.param(
        route_toml(plain="true"),
        Route(path="/x", methods=frozenset({GET}), target="/y", plain=True),
        id="plain",
    ),
    pytest.param(
        route_toml(plain="false"),
        Route(path="/x", methods=frozenset({GET}), target="/y"),
        id="plain-false",
    ),
]


@pytest.mark.parametrize(("text", "route"), PARSED)
def test_parse_policy_route(text: str, route: Route) -> None:
    assert parse_policy(text).routes == {route.path: route}


@pytest.mark.parametrize(
    ("http_method", "coap_method", "expected"),
    [
        pytest.param(None, GET, "GET", id="default-GET"),
        pytest.param(None, POST, "POST", id="default-POST"),
        pytest.param(None, DELETE, "DELETE", id="default-DELETE"),
        pytest.param("PUT", POST, "PUT", id="configured-wins"),
    ],
)
def test_http_method_for(http_method: str | None, coap_method: str, expected: str) -> None:
    route = Route(path="/x", methods=frozenset({coap_method}), target="/y", http_method=http_method)
    assert route.http_method_for(coap_method) == expected


def test_match_returns_the_route() -> None:
    policy = parse_policy(route_toml() + route_toml(path='"/z"', methods='["POST"]'))
    assert policy.match("/x", GET) == RouteMatch(policy.routes["/x"])
    assert policy.match("/z", POST) == RouteMatch(policy.routes["/z"])
    assert policy.match("/z", GET) == RouteMatch(None, METHOD_NOT_ALLOWED)


# Each malformed policy, with a pattern the message must contain (it names the field).
MALFORMED = [
    pytest.param("[[route]\n", "not valid TOML", id="bad-toml"),
    pytest.param("", "no \\[\\[route\\]\\]", id="empty-file"),
    pytest.param("name = 'x'\n", "no \\[\\[route\\]\\]", id="no-routes"),
    pytest.param("route = []\n", "no \\[\\[route\\]\\]", id="empty-route-array"),
    pytest.param('[route]\npath = "/x"\n', "no \\[\\[route\\]\\]", id="route-is-a-table"),
    pytest.param("route = [1]\n", "not a table", id="route-is-not-a-table"),
    pytest.param(route_toml(path=""), "'path'", id="missing-path"),
    pytest.param(route_toml(path='"data"'), "'path'", id="path-without-slash"),
    pytest.param(route_toml(path="5"), "'path'", id="path-not-a-string"),
    pytest.param(route_toml(methods="[]"), "'methods'", id="empty-methods"),
    pytest.param(route_toml(methods=""), "'methods'", id="missing-methods"),
    pytest.param(route_toml(methods='"GET"'), "'methods'", id="methods-not-a-list"),
    pytest.param(route_toml(methods='["FOO"]'), "unknown CoAP method 'FOO'", id="unknown-method"),
    pytest.param(route_toml(methods='["GET", 1]'), "unknown CoAP method 1", id="method-number"),
    pytest.param(route_toml(methods='["EMPTY"]'), "unknown CoAP method", id="method-empty"),
    pytest.param(route_toml(target=""), "'target'", id="missing-target"),
    pytest.param(route_toml(target='"ingest"'), "'target'", id="relative-target"),
    pytest.param(route_toml(target='"ftp://h/x"'), "'target'", id="ftp-target"),
    pytest.param(route_toml(target="1"), "'target'", id="target-not-a-string"),
    pytest.param(route_toml(http_method='"TRACE"'), "'http_method'", id="bad-http-method"),
    pytest.param(route_toml(http_method='""'), "'http_method'", id="empty-http-method"),
    pytest.param(
        route_toml(methods='["FETCH"]'), "FETCH must set 'http_method'", id="fetch-no-twin"
    ),
    pytest.param(route_toml(topic_query='"yes"'), "'topic_query'", id="topic-query-not-bool"),
    pytest.param(route_toml(idempotent='"yes"'), "'idempotent'", id="idempotent-not-bool"),
    pytest.param(route_toml(plain='"yes"'), "'plain' must be true or false", id="plain-not-bool"),
    pytest.param(route_toml(plain="1"), "'plain' must be true or false", id="plain-number"),
    pytest.param(route_toml(plains="true"), "unknown keys \\['plains'\\]", id="plain-typo"),
    pytest.param(route_toml(foo='"bar"'), "unknown keys \\['foo'\\]", id="unknown-key"),
    pytest.param(route_toml() + route_toml(), "defined twice", id="duplicate-path"),
    pytest.param(
        route_toml(path='"/data"') + route_toml(path='"/data/"'),
        "defined twice",
        id="duplicate-after-normalising",
    ),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_malformed_policy(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_policy_error_names_the_route() -> None:
    text = route_toml() + route_toml(path='"/bad"', methods='["NOPE"]')
    with pytest.raises(PolicyError, match="route '/bad'"):
        parse_policy(text)


_ONE_ROUTE = '[[route]]\npath = "/"\nmethods = ["POST"]\ntarget = "/ingest"\n'


@pytest.mark.parametrize(
    ("listed", "origin"),
    [
        pytest.param("https://billing.example", "https://billing.example:443", id="https"),
        pytest.param("http://Billing.Example/", "http://billing.example:80", id="case-slash"),
        pytest.param("https://10.0.0.5:8443", "https://10.0.0.5:8443", id="port"),
        pytest.param("http://[::1]:8080", "http://[::1]:8080", id="ipv6"),
    ],
)
def test_trusted_origins_are_normalised(listed: str, origin: str) -> None:
    policy = parse_policy(f'trusted_origins = ["{listed}"]\n' + _ONE_ROUTE)
    assert policy.trusted_origins == frozenset({origin})


def test_no_trusted_origins_by_default() -> None:
    assert parse_policy(_ONE_ROUTE).trusted_origins == frozenset()


@pytest.mark.parametrize(
    "listed",
    [
        pytest.param('"https://billing.example/api"', id="path"),
        pytest.param('"https://billing.example?x=1"', id="query"),
        pytest.param('"ftp://billing.example"', id="scheme"),
        pytest.param('"billing.example"', id="no-scheme"),
        pytest.param('"https://user@billing.example"', id="userinfo"),
        pytest.param('"https://billing.example:99999"', id="bad-port"),
        pytest.param("42", id="not-a-string"),
    ],
)
def test_malformed_trusted_origin(listed: str) -> None:
    with pytest.raises(PolicyError, match="trusted_origins"):
        parse_policy(f"trusted_origins = [{listed}]\n" + _ONE_ROUTE)


def test_trusted_origins_must_be_a_list() -> None:
    with pytest.raises(PolicyError, match="must be a list"):
        parse_policy('trusted_origins = "https://billing.example"\n' + _ONE_ROUTE)


def test_unknown_top_level_key() -> None:
    # A misspelt trusted_origins must not silently trust nothing (or everything).
    with pytest.raises(PolicyError, match="unknown top-level keys"):
        parse_policy('trusted_origin = ["https://billing.example"]\n' + _ONE_ROUTE)


# -- issue 13 §3: status overrides, link attributes, templates ---------------------------------

CREATED, CHANGED, BAD_REQ, UNAVAILABLE = "2.01", "2.04", "4.00", "5.03"


@pytest.mark.parametrize(
    ("toml", "rows"),
    [
        pytest.param('{ "404" = "4.00" }', {(404, "*"): BAD_REQ}, id="status"),
        pytest.param('{ "2xx" = "2.04" }', {("2xx", "*"): CHANGED}, id="class"),
        pytest.param('{ "2xx.POST" = "2.01" }', {("2xx", "POST"): CREATED}, id="class-method"),
        pytest.param('{ "201.post" = "2.01" }', {(201, "POST"): CREATED}, id="method-any-case"),
        pytest.param('{ "200.ipatch" = "2.04" }', {(200, "iPATCH"): CHANGED}, id="ipatch"),
        pytest.param('{ "5xx.*" = "5.03" }', {("5xx", "*"): UNAVAILABLE}, id="explicit-any"),
    ],
)
def test_status_overrides_parse_into_rows(toml: str, rows: dict) -> None:
    route = parse_policy(route_toml(status=toml)).routes["/x"]
    assert dict(route.status) == rows
    assert table_for(route).overrides == rows


def test_status_overrides_compile_into_the_routes_table() -> None:
    policy = parse_policy(
        route_toml(methods='["GET", "POST"]', status='{ "2xx.POST" = "2.01", "404" = "4.00" }')
        + route_toml(path='"/plain"', methods='["GET", "POST"]')
    )
    # The proxy compiles the rows into code numbers at start-up (proxy/forward.py).
    custom, plain = table_for(policy.routes["/x"]), table_for(policy.routes["/plain"])
    post, get = codes.POST, codes.GET
    assert (custom.code_for(200, post), plain.code_for(200, post)) == (65, 68)  # 2.01, 2.04
    assert (custom.code_for(404, get), plain.code_for(404, get)) == (128, 132)  # 4.00, 4.04
    assert custom.code_for(200, get) == plain.code_for(200, get) == 69  # 2.05, untouched


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        pytest.param('{ rt = "temp" }', (("rt", "temp"),), id="rt"),
        pytest.param('{ rt = " a   b " }', (("rt", "a b"),), id="rt-list-normalised"),
        pytest.param('{ if = "sensor" }', (("if", "sensor"),), id="if"),
        pytest.param("{ ct = 50 }", (("ct", (50,)),), id="ct"),
        pytest.param("{ ct = [0, 50] }", (("ct", (0, 50)),), id="ct-list"),
        pytest.param("{ sz = 1024 }", (("sz", 1024),), id="sz"),
        pytest.param("{ obs = true }", (("obs", True),), id="obs"),
        pytest.param("{ obs = false }", (), id="obs-false"),
        pytest.param(
            '{ obs = true, sz = 1, ct = 0, if = "i", rt = "r" }',
            (("rt", "r"), ("if", "i"), ("ct", (0,)), ("sz", 1), ("obs", True)),
            id="fixed-order",
        ),
    ],
)
def test_link_attributes_parse(toml: str, expected: tuple) -> None:
    assert parse_policy(route_toml(link=toml)).routes["/x"].link == expected


TEMPLATES = """
[[route]]
path = "/commands/{device}"
methods = ["GET", "POST"]
target = "/api/commands/{device}"

[[route]]
path = "/commands/all"
methods = ["GET"]
target = "/api/all"

[[route]]
path = "/auth/{pk}/{dk}"
methods = ["GET"]
target = "https://auth.example/check?pk={pk}&dk={dk}"

[[route]]
path = "/firmware/{version}/image"
methods = ["GET"]
target = "/fw/{version}"
"""


@pytest.mark.parametrize(
    ("path", "segments", "route_path", "params", "target"),
    [
        pytest.param(
            "/commands/d1",
            None,
            "/commands/{device}",
            {"device": "d1"},
            "/api/commands/d1",
            id="one-variable",
        ),
        pytest.param("/commands/all", None, "/commands/all", None, "/api/all", id="exact-wins"),
        pytest.param(
            "/auth/a/b",
            None,
            "/auth/{pk}/{dk}",
            {"pk": "a", "dk": "b"},
            "https://auth.example/check?pk=a&dk=b",
            id="two-variables-into-the-query",
        ),
        pytest.param(
            "/firmware/1.2/image",
            None,
            "/firmware/{version}/image",
            {"version": "1.2"},
            "/fw/1.2",
            id="literal-after-variable",
        ),
        pytest.param(
            "/commands/a/b",
            ["commands", "a/b"],
            "/commands/{device}",
            {"device": "a/b"},
            "/api/commands/a%2Fb",
            id="segment-holding-a-slash",
        ),
        pytest.param(
            "/commands/ä ?&",
            None,
            "/commands/{device}",
            {"device": "ä ?&"},
            "/api/commands/%C3%A4%20%3F%26",
            id="percent-encoded",
        ),
    ],
)
def test_template_match_and_substitution(
    path: str, segments, route_path: str, params, target: str
) -> None:
    found = parse_policy(TEMPLATES).match(path, GET, segments)
    assert found.route is not None
    assert (found.route.path, found.params) == (route_path, params)
    assert found.route.target_for(found.params) == target


@pytest.mark.parametrize(
    ("path", "method", "error"),
    [
        pytest.param("/commands", GET, NOT_FOUND, id="too-few"),
        pytest.param("/commands/a/b", GET, NOT_FOUND, id="too-many"),
        pytest.param("/commands/", GET, NOT_FOUND, id="empty-segment"),
        pytest.param("/firmware/1.2/other", GET, NOT_FOUND, id="literal-differs"),
        pytest.param("/commands/x", PUT, METHOD_NOT_ALLOWED, id="method"),
        pytest.param("/commands/{device}", GET, None, id="braces-are-just-a-value"),
    ],
)
def test_template_misses(path: str, method: str, error: str | None) -> None:
    found = parse_policy(TEMPLATES).match(path, method)
    if error is None:
        # A device sending the literal "{device}" gets the template with that value.
        assert found.params == {"device": "{device}"}
    else:
        assert found == RouteMatch(None, error)


MALFORMED_ISSUE_13 = [
    pytest.param(route_toml(status='"404"'), "'status' must be a table", id="status-not-table"),
    pytest.param(route_toml(status='{ "4x4" = "4.04" }'), "status key '4x4'", id="status-key"),
    pytest.param(route_toml(status='{ "600" = "5.00" }'), "status key '600'", id="status-600"),
    pytest.param(
        route_toml(status='{ "2xx.TRACE" = "2.05" }'), "status key '2xx.TRACE'", id="method"
    ),
    pytest.param(route_toml(status='{ "404" = "3.00" }'), "not a CoAP code", id="code-class"),
    pytest.param(route_toml(status='{ "404" = 132 }'), "not a CoAP code", id="code-number"),
    pytest.param(route_toml(link='"rt"'), "'link' must be a table", id="link-not-table"),
    pytest.param(route_toml(link='{ title = "x" }'), "unknown link attributes", id="link-key"),
    pytest.param(route_toml(link='{ rt = "" }'), "link rt", id="rt-empty"),
    pytest.param(route_toml(link='{ rt = "a\\"b" }'), "link rt", id="rt-quote"),
    pytest.param(route_toml(link="{ if = 5 }"), "link if", id="if-number"),
    pytest.param(route_toml(link='{ ct = "json" }'), "link ct", id="ct-text"),
    pytest.param(route_toml(link="{ ct = 70000 }"), "link ct", id="ct-too-big"),
    pytest.param(route_toml(link="{ ct = [] }"), "link ct", id="ct-empty-list"),
    pytest.param(route_toml(link="{ ct = true }"), "link ct", id="ct-bool"),
    pytest.param(route_toml(link="{ sz = -1 }"), "link sz", id="sz-negative"),
    pytest.param(route_toml(link='{ obs = "yes" }'), "link obs", id="obs-text"),
    pytest.param(
        route_toml(path='"/a/{x}/{x}"', target='"/b/{x}"'), "appears twice", id="variable-twice"
    ),
    pytest.param(route_toml(path='"/a/b{x}"'), "whole segment", id="variable-inside-a-segment"),
    pytest.param(route_toml(path='"/a/{1x}"'), "whole segment", id="variable-bad-name"),
    pytest.param(route_toml(target='"/b/{x}"'), "not in the path", id="target-unknown-var"),
    pytest.param(
        route_toml(path='"/a/{x}"', batch_target='"/b/{x}"'),
        "cannot have a 'batch_target'",
        id="template-with-batch-target",
    ),
    pytest.param(
        route_toml(path='"/a/{x}"', batch_target='"/b"'),
        "cannot have a 'batch_target'",
        id="template-with-plain-batch-target",
    ),
    pytest.param(
        route_toml(batch_target='"/b/{x}"'), "batch_target", id="batch-target-with-braces"
    ),
    pytest.param(route_toml(path='"/a/{x}"', target='"/b/{x"'), "brace", id="target-stray-brace"),
    pytest.param(
        route_toml(path='"/a/{host}"', target='"http://{host}.example/in"'),
        "path only",
        id="variable-in-host",
    ),
    pytest.param(
        route_toml(path='"/a/{x}"') + route_toml(path='"/a/{y}"'),
        "ambiguous",
        id="same-template-other-name",
    ),
    pytest.param(
        route_toml(path='"/a/{x}"') + route_toml(path='"/{y}/b"'),
        "ambiguous",
        id="overlapping-templates",
    ),
    pytest.param(
        route_toml(path='"/a/{x}"') + route_toml(path='"/a/{x}/"'),
        "defined twice",
        id="duplicate-template",
    ),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED_ISSUE_13)
def test_malformed_issue_13_keys(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_templates_that_no_path_matches_both_are_accepted() -> None:
    policy = parse_policy(
        route_toml(path='"/a/{x}"')
        + route_toml(path='"/b/{x}"')
        + route_toml(path='"/a/{x}/c"')
        + route_toml(path='"/a/b"')
    )
    assert policy.match("/a/b", GET).params is None  # the exact path
    assert policy.match("/a/z", GET).params == {"x": "z"}
    assert policy.match("/a/z/c", GET).route == policy.routes["/a/{x}/c"]
