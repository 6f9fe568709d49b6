"""MQTT topic rules for the ``t`` query parameter (docs/CONTRACT.md §3), given as a Uri-Query
or as a Location-Query option.

1–253 characters of ``[A-Za-z0-9_/]``, never two slashes in a row; the whole ``t=<topic>``
query option is at most 255 bytes. Every violation is a 4.00 on the device side and a 400 on
the HTTP side.
"""

from __future__ import annotations

import re

MAX_TOPIC_LENGTH = 253
DEFAULT_TOPIC_TEMPLATE = "devices/{iccid}/messages"

_TOPIC_RE = re.compile(r"[A-Za-z0-9_/]{1,253}")


class TopicError(ValueError):
    """The topic given by a device breaks the rules; the message says which one."""


def validate_topic(topic: str) -> str:
    """Return ``topic`` unchanged when it is valid, else raise :class:`TopicError`."""
    if not topic:
        raise TopicError("topic is empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic is {len(topic)} characters long, at most {MAX_TOPIC_LENGTH}")
    if _TOPIC_RE.fullmatch(topic) is None:
        raise TopicError("topic may contain only A-Z, a-z, 0-9, '_' and '/'")
    if "//" in topic:
        raise TopicError("topic contains two slashes in a row")
    return topic


def topic_from_queries(queries: list[str]) -> str | None:
    """Pick the ``t`` parameter out of Uri-Query values (each ``name=value``).

    Returns ``None`` when no ``t`` is present. A second ``t``, or ``t`` without ``=``, is
    ambiguous and therefore an error.
    """
    topic: str | None = None
    for query in queries:
        name, sep, value = query.partition("=")
        if name != "t":
            continue
        if not sep:
            raise TopicError("query 't' has no value")
        if topic is not None:
            raise TopicError("query 't' given more than once")
        topic = validate_topic(value)
    return topic


def topic_from_options(uri_queries: list[str], location_queries: list[str]) -> str | None:
    """The topic of a device message: ``t`` from its Uri-Query values or from its
    Location-Query values (docs/CONTRACT.md §3: devices of the SIM platform send either).

    Each list follows :func:`topic_from_queries`' rules. A ``t`` in both is ambiguous, and an
    error even when the two are equal: one rule is easier to state than a comparison, and no
    device needs to send both. Returns ``None`` when neither holds a ``t``.
    """
    topic = topic_from_queries(uri_queries)
    if not location_queries:
        return topic
    located = topic_from_queries(location_queries)
    if located is None:
        return topic
    if topic is not None:
        raise TopicError("topic 't' given both as Uri-Query and as Location-Query")
    return located


def render_topic(template: str, *, iccid: str | None = None, device: str | None = None) -> str:
    """The default topic for a device that sent no ``t``.

    ``{device}`` is the device id; ``{iccid}`` is the ICCID, or the device id when the device
    has none (a managed-PSK device), so the default template ``devices/{iccid}/messages`` names
    every device by one level. Give ``device`` (the id), ``iccid``, or both. A rendered id may
    hold '-', '.' and ':', which MQTT allows in a topic level (MQTT 5 §4.7); the stricter
    charset of :func:`validate_topic` is for what a device sends in ``t``.
    """
    name = device if device is not None else iccid
    if name is None:
        raise ValueError("render_topic needs the device id or its iccid")
    return template.format(iccid=iccid if iccid is not None else name, device=name)
