"""The metadata envelope (issue 17; docs/API.md, "Message metadata"): a device message and its
metadata as one JSON object, for brokers that cannot carry MQTT 5 user properties (an MQTT
3.1.1 broker, the embedded broker of ``coap-bridge up``).

With ``COAP_BRIDGE_MQTT_METADATA=envelope`` every device message is published as

    {"iccid": …, "device": …, "source": "ip:port", "content_format": 50,
     "received_at": 1700000000123, "template": …, "payload": <JSON>}

``iccid`` only for a SIM and ``template`` only for a translated message, as for the user
properties (docs/CONTRACT.md §9) they repeat; ``content_format`` is the number (a media type
without a number stays text; null when the device gave none); ``received_at`` is the same unix
milliseconds as the ``received-at`` property. The payload is embedded as JSON when it is JSON:
a translated message, or Content-Format 50 (application/json, RFC 7252 §12.3) whose bytes are
valid UTF-8 JSON (RFC 8259). Anything else — raw bytes, or a "JSON" payload that is not —
travels as ``"payload_base64"`` (RFC 4648 §4), so no byte of it is lost.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

JSON_CONTENT_FORMAT = "50"
TEMPLATE_PROPERTY = "template"
"""The user property naming the template a message was translated with (its payload is the
compact JSON the translation produced, so it is embedded without being parsed again)."""

_FIELDS = (
    ("iccid", "iccid"),
    ("device", "device"),
    ("source", "source"),
)


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are Python's extensions, not JSON (RFC 8259 §6).
    raise ValueError(f"{name} is not JSON")


def _json_text(payload: bytes) -> str | None:
    """``payload`` as JSON text when it is a JSON text in UTF-8 (RFC 8259 §8.1), else None."""
    try:
        text = payload.decode("utf-8")
        json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return None
    return text


def _content_format(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def wrap(payload: bytes, properties: Mapping[str, str]) -> bytes:
    """The envelope of one device message, from the payload and the user properties the
    message carries (api/routes/ingest.py ``message_properties``)."""
    head: dict[str, Any] = {name: properties[key] for name, key in _FIELDS if key in properties}
    content_format = properties.get("content-format")
    head["content_format"] = _content_format(content_format)
    received_at = properties.get("received-at")
    head["received_at"] = int(received_at) if received_at and received_at.isdigit() else None
    template = properties.get(TEMPLATE_PROPERTY)
    embedded: str | None = None
    if template is not None:
        head["template"] = template
        embedded = payload.decode("utf-8")  # the translation's own compact JSON
    elif content_format == JSON_CONTENT_FORMAT:
        embedded = _json_text(payload)
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False)
    if embedded is not None:
        return f'{text[:-1]},"payload":{embedded.strip()}}}'.encode()
    encoded = base64.b64encode(payload).decode("ascii")
    return f'{text[:-1]},"payload_base64":"{encoded}"}}'.encode()
