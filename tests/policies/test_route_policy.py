"""The route policy (SPEC §3): the default file, lookups, and every malformed-policy case."""

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
from policies.status import DELETE, FETCH, GET, IPATCH, PATCH, POST, PUT

NOT_FOUND, METHOD_NOT_ALLOWED = 132, 133  # 4.04, 4.05


@pytest.fixture(scope="module")
def default_policy() -> Policy:
    return load_policy()


# SPEC §3, the default route policy (1NCE profile):
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
    method: int,
    target: str,
    http_method: str,
    batch_target: str | None,
) -> None:
    found = default_policy.match(path, method)
    assert found.error == 0
    assert found.route is not None
    assert found.route.target == target
    assert found.route.http_method_for(method) == http_method
    assert found.route.batch_target == batch_target


def test_default_policy_has_exactly_these_routes(default_policy: Policy) -> None:
    assert set(default_policy.routes) == {"/", "/data", "/bootstrap", "/location"}


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
    # SPEC §3: the optional `t` query belongs to `/` and `/data` only.
    route = default_policy.routes.get(path)
    assert route is not None
    assert route.topic_query is topic_query


# "any of the above, other method → 4.05; anything else → 4.04" (SPEC §3).
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
def test_default_policy_errors(default_policy: Policy, path: str, method: int, error: int) -> None:
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
def test_http_method_for(http_method: str | None, coap_method: int, expected: str) -> None:
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
