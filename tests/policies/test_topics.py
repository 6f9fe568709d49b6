"""MQTT topic rules for the ``t`` Uri-Query (docs/CONTRACT.md §3)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.topics import (
    DEFAULT_TOPIC_TEMPLATE,
    MAX_TOPIC_LENGTH,
    TopicError,
    render_topic,
    topic_from_queries,
    validate_topic,
)

ALLOWED = frozenset(string.ascii_letters + string.digits + "_/")

VALID_TOPICS = [
    pytest.param("a", id="one-char"),
    pytest.param("a" * 253, id="253-chars"),
    pytest.param("a/b_c/9", id="mixed"),
    pytest.param("devices/8988280666000000000/messages", id="default-shape"),
    pytest.param("/a", id="leading-slash"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param("/", id="single-slash"),
    pytest.param("_", id="underscore"),
    pytest.param("ABCxyz0189", id="letters-and-digits"),
]

INVALID_TOPICS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 254, id="254-chars"),
    pytest.param("a//b", id="double-slash"),
    pytest.param("//", id="only-double-slash"),
    pytest.param("a" * 251 + "//", id="double-slash-at-253"),
    pytest.param("a-b", id="hyphen"),
    pytest.param("a b", id="space"),
    pytest.param("ä", id="non-ascii-letter"),
    pytest.param("\u0661", id="non-ascii-digit"),
    pytest.param("ａ", id="fullwidth-letter"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("a\x00", id="nul"),
    pytest.param("a+", id="mqtt-single-level-wildcard"),
    pytest.param("a/#", id="mqtt-multi-level-wildcard"),
    pytest.param("$SYS/x", id="mqtt-system-topic"),
    pytest.param("a=b", id="equals"),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize("topic", INVALID_TOPICS)
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(topic)


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)


def test_length_limit_matches_spec() -> None:
    # docs/CONTRACT.md §3: at most 253 characters, so "t=" plus the topic fits 255 bytes.
    assert MAX_TOPIC_LENGTH == 253


def obeys_rules(topic: str) -> bool:
    return 1 <= len(topic) <= 253 and set(topic) <= ALLOWED and "//" not in topic


@given(st.text(alphabet="ab9_/-ä ", max_size=20))
def test_validate_topic_matches_rules(topic: str) -> None:
    if obeys_rules(topic):
        assert validate_topic(topic) == topic
    else:
        with pytest.raises(TopicError):
            validate_topic(topic)


@given(st.integers(240, 270), st.sampled_from(["a", "/a", "a/", "_9"]))
def test_validate_topic_length_boundary(length: int, unit: str) -> None:
    topic = (unit * length)[:length]
    if obeys_rules(topic):
        assert validate_topic(topic) == topic
    else:
        with pytest.raises(TopicError):
            validate_topic(topic)


QUERIES = [
    pytest.param([], None, id="no-queries"),
    pytest.param(["x=1"], None, id="other-query"),
    pytest.param(["tt=abc"], None, id="longer-name"),
    pytest.param(["T=abc"], None, id="name-is-case-sensitive"),
    pytest.param(["t=a/b"], "a/b", id="topic"),
    pytest.param(["x=1", "t=abc", "y"], "abc", id="among-others"),
    pytest.param(["t=" + "a" * 253], "a" * 253, id="255-byte-query"),
]


@pytest.mark.parametrize(("queries", "topic"), QUERIES)
def test_topic_from_queries(queries: list[str], topic: str | None) -> None:
    assert topic_from_queries(queries) == topic


BAD_QUERIES = [
    pytest.param(["t"], id="no-equals"),
    pytest.param(["t="], id="empty-value"),
    pytest.param(["t=a", "t=b"], id="twice"),
    pytest.param(["t=a", "t=a"], id="twice-same"),
    pytest.param(["t=a//b"], id="double-slash"),
    pytest.param(["t=a=b"], id="equals-in-value"),
    pytest.param(["t=" + "a" * 254], id="256-byte-query"),
    pytest.param(["t=a b"], id="space"),
]


@pytest.mark.parametrize("queries", BAD_QUERIES)
def test_topic_from_queries_rejects(queries: list[str]) -> None:
    with pytest.raises(TopicError):
        topic_from_queries(queries)


@pytest.mark.parametrize(
    ("template", "iccid", "topic"),
    [
        pytest.param(
            DEFAULT_TOPIC_TEMPLATE,
            "8988280666000000000",
            "devices/8988280666000000000/messages",
            id="default",
        ),
        pytest.param("fleet/{iccid}", "123", "fleet/123", id="custom"),
        pytest.param("fixed/topic", "123", "fixed/topic", id="no-placeholder"),
    ],
)
def test_render_topic(template: str, iccid: str, topic: str) -> None:
    assert render_topic(template, iccid=iccid) == topic


def test_default_template_is_the_spec_default() -> None:
    assert DEFAULT_TOPIC_TEMPLATE == "devices/{iccid}/messages"
