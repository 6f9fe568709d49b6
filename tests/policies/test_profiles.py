"""Profiles (docs/PROFILES.md): their names, their packaged route tables, and how several are
merged into one policy (policies/profiles/, policies/routes.py ``load_profiles``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.settings import ApiSettings
from policies.profiles import (
    DEFAULT_PROFILES,
    FLAG_VALUES,
    PROFILES,
    UnknownProfile,
    profile_names,
)
from policies.routes import (
    Policy,
    PolicyError,
    load_policy,
    load_profiles,
    merge_profiles,
    parse_policy,
    profile_text,
)
from policies.status import METHODS
from proxy.coap import codes
from proxy.forward import table_for
from proxy.settings import ProxySettings

GET, POST = METHODS[0], METHODS[1]


def test_the_default_profile_is_todays_product() -> None:
    assert DEFAULT_PROFILES == ("sim_identity",)
    assert load_profiles(DEFAULT_PROFILES) == load_policy()
    assert ProxySettings().profiles == ["sim_identity"]
    assert ApiSettings().profiles == ["sim_identity"]


@pytest.mark.parametrize("profile", PROFILES)
def test_each_packaged_table_loads(profile: str) -> None:
    assert parse_policy(profile_text(profile), profile).routes


def test_managed_psk_routes() -> None:
    policy = load_profiles(["managed_psk"])
    assert set(policy.routes) == {"/telemetry", "/firmware/{version}", "/commands/{device}"}
    # DTLS only: production mode answers 4.01 to all of it on plain CoAP.
    assert not any(route.plain for route in policy.routes.values())
    telemetry = policy.match("/telemetry", POST).route
    assert telemetry is not None
    assert telemetry.target == "/telemetry"
    assert not telemetry.topic_query  # the `t` rule belongs to sim_identity's / and /data
    table = table_for(telemetry)
    assert table.code_for(201, codes.POST) == codes.CREATED
    assert table.code_for(403, codes.POST) == codes.FORBIDDEN
    assert table.code_for(503, codes.POST) == codes.SERVICE_UNAVAILABLE
    firmware = policy.match("/firmware/1.2.0", GET)
    assert firmware.route is not None
    assert firmware.route.idempotent
    assert firmware.route.target_for(firmware.params) == "/firmware/1.2.0"


def test_signed_session_routes_are_all_plain() -> None:
    policy = load_profiles(["signed_session"])
    assert set(policy.routes) == {
        "/auth/{pk}/{dk}",
        "/topic/sys/{pk}/{dk}/thing/measurepoint/post",
        "/topic/sys/{pk}/{dk}/thing/model/up_raw",
    }
    assert all(route.plain for route in policy.routes.values())
    auth = policy.match("/auth/p1/d1", POST)
    assert auth.route is not None
    assert auth.route.target_for(auth.params) == "/auth/p1/d1"
    # These devices expect 2.05 for a successful auth, 2.04 for telemetry (docs/PROFILES.md).
    assert table_for(auth.route).code_for(200, codes.POST) == codes.CONTENT
    assert table_for(auth.route).code_for(401, codes.POST) == codes.UNAUTHORIZED
    raw = policy.match("/topic/sys/p1/d1/thing/model/up_raw", POST)
    assert raw.route is not None
    assert table_for(raw.route).code_for(204, codes.POST) == codes.CHANGED
    assert policy.match("/topic/sys/p1/d1/thing/other/post", POST).error == "4.04"


def test_all_three_merge_and_the_shared_route_is_kept_once() -> None:
    merged = load_profiles(["sim_identity", "managed_psk", "signed_session"])
    separately = [load_profiles([name]) for name in PROFILES]
    assert set(merged.routes) == set().union(*(policy.routes for policy in separately))
    assert len(merged.routes) == sum(len(p.routes) for p in separately) - 1
    assert merged.routes["/commands/{device}"] == separately[0].routes["/commands/{device}"]
    assert [path for path, route in merged.routes.items() if route.plain] == [
        "/bootstrap",
        "/auth/{pk}/{dk}",
        "/topic/sys/{pk}/{dk}/thing/measurepoint/post",
        "/topic/sys/{pk}/{dk}/thing/model/up_raw",
    ]
    assert merged.match("/data", POST).route is not None
    assert merged.match("/telemetry", POST).route is not None


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(["1nce", "nhub", "enos"], id="flag-values"),
        pytest.param(["sim", "managed-psk", "signed-session"], id="descriptive-flag-values"),
        pytest.param(["sim_identity,managed_psk", "signed_session"], id="comma-list"),
        pytest.param(["ENOS, nhub , 1NCE"], id="case-and-blanks"),
    ],
)
def test_flag_values_name_the_same_profiles(names: list[str]) -> None:
    assert load_profiles(names) == load_profiles(["sim_identity", "managed_psk", "signed_session"])


def test_every_flag_value_names_a_profile() -> None:
    assert set(FLAG_VALUES.values()) == set(PROFILES)
    for value, name in FLAG_VALUES.items():
        assert profile_names(value) == [name]


def test_empty_items_of_a_comma_list_are_not_names() -> None:
    assert load_profiles(["sim_identity,", ""]) == load_policy()


@pytest.mark.parametrize("names", [["lwm2m"], ["1nce", "thingsboard"]])
def test_unknown_profile_is_refused_listing_the_known_ones(names: list[str]) -> None:
    with pytest.raises(PolicyError, match="unknown profile") as caught:
        load_profiles(names)
    for profile in PROFILES:
        assert profile in str(caught.value)
    assert "nhub" in str(caught.value)


@pytest.mark.parametrize("raw", [[], "", " , ", "[]"])
def test_no_profile_at_all_is_refused(raw: object) -> None:
    with pytest.raises(UnknownProfile, match="no profile named"):
        profile_names(raw)


def test_profile_names_keep_order_and_drop_repeats() -> None:
    assert profile_names(["nhub", "1nce,managed_psk", "sim"]) == ["managed_psk", "sim_identity"]
    assert profile_names('["enos", "sim"]') == ["signed_session", "sim_identity"]
    with pytest.raises(UnknownProfile, match="JSON list"):
        profile_names("[nhub")


def _table(*routes: str) -> Policy:
    return parse_policy("".join(routes))


def _route(path: str, target: str, extra: str = "") -> str:
    return f'[[route]]\npath = "{path}"\nmethods = ["POST"]\ntarget = "{target}"\n{extra}'


def test_identical_route_in_two_profiles_is_kept_once() -> None:
    merged = merge_profiles(
        [
            ("first", _table(_route("/a", "/in"), _route("/shared/{x}", "/s/{x}"))),
            ("second", _table(_route("/shared/{x}", "/s/{x}"), _route("/b", "/in"))),
        ]
    )
    assert list(merged.routes) == ["/a", "/shared/{x}", "/b"]


@pytest.mark.parametrize(
    "theirs",
    [
        pytest.param(_route("/shared", "/elsewhere"), id="other-target"),
        pytest.param(_route("/shared", "/in", "plain = true\n"), id="other-flag"),
        pytest.param(_route("/shared", "/in", 'status = { "200" = "2.05" }\n'), id="other-rows"),
    ],
)
def test_same_path_defined_differently_is_refused_naming_both(theirs: str) -> None:
    with pytest.raises(PolicyError, match="defined differently") as caught:
        merge_profiles([("first", _table(_route("/shared", "/in"))), ("second", _table(theirs))])
    assert "first" in str(caught.value)
    assert "second" in str(caught.value)
    assert "'/shared'" in str(caught.value)


def test_ambiguous_templates_of_two_profiles_are_refused_naming_both() -> None:
    with pytest.raises(PolicyError, match="ambiguous") as caught:
        merge_profiles(
            [
                ("first", _table(_route("/x/{a}", "/in/{a}"))),
                ("second", _table(_route("/{b}/y", "/in/{b}"))),
            ]
        )
    message = str(caught.value)
    assert "profile first" in message
    assert "profile second" in message


def test_different_change_feeds_are_refused() -> None:
    with pytest.raises(PolicyError, match="observe_events"):
        merge_profiles(
            [
                ("first", _table(_route("/a", "/in"))),
                ("second", parse_policy('observe_events = "/other"\n' + _route("/b", "/in"))),
            ]
        )


def test_trusted_origins_are_the_union() -> None:
    merged = merge_profiles(
        [
            ("first", parse_policy('trusted_origins = ["https://a:1"]\n' + _route("/a", "/in"))),
            ("second", parse_policy('trusted_origins = ["https://b:2"]\n' + _route("/b", "/in"))),
        ]
    )
    assert merged.trusted_origins == {"https://a:1", "https://b:2"}


@pytest.mark.parametrize("settings", [ProxySettings, ApiSettings])
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param("nhub,1nce", ["managed_psk", "sim_identity"], id="flag-values"),
        pytest.param("signed_session", ["signed_session"], id="code-name"),
        pytest.param('["sim", "enos"]', ["sim_identity", "signed_session"], id="json-list"),
    ],
)
def test_profiles_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, settings: type, env: str, expected: list[str]
) -> None:
    monkeypatch.setenv("COAP_BRIDGE_PROFILES", env)
    assert settings().profiles == expected


@pytest.mark.parametrize("settings", [ProxySettings, ApiSettings])
def test_unknown_profile_in_the_environment_is_a_setting_error(
    monkeypatch: pytest.MonkeyPatch, settings: type
) -> None:
    monkeypatch.setenv("COAP_BRIDGE_PROFILES", "1nce,nbiot")
    with pytest.raises(ValidationError, match="unknown profile 'nbiot'"):
        settings()
