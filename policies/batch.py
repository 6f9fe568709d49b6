"""The batch form of an upstream call: many device requests in one HTTP request (group commit).

When a route names a ``batch_target``, the proxy sends the requests that arrive while a call to
that target is in flight together in the next call, instead of one HTTP request each. The body
is a sequence of items, each the facts of one device request as typed fields (not the HTTP
strings of the single form: nothing is formatted by the proxy to be parsed back by the
backend); the answer is JSON ``{"statuses": [204, 401, ...]}``, one HTTP status per item in
order. A ``Retry-After`` on the batch answer applies to every item answered 503.

What the proxy vouches for (the batch goes only to a backend it trusts, with the proxy token,
docs/CONTRACT.md §11), so the backend does not check it again: ``ip`` is the canonical text of
the source address (the form ``ipaddress`` gives), and ``topic`` follows the topic rules
(policies/topics.py) or is empty for the backend's default topic.

Item layout (all integers big-endian)::

    u16 port                 the device's source port
    u32 content_format       CoAP Content-Format (RFC 7252 §12.3), NO_CONTENT_FORMAT if none
    u8  len, u8 len          of ip, proto
    u16 len, u16 len, u16 len  of identity, idempotency_key, topic
    u32 len                  of payload
    ip, proto, identity, idempotency_key, topic (UTF-8), payload

The fixed head first, then the variable fields: decoding an item is one ``struct`` read and
a few slices; length prefixes rather than separators, so no field needs escaping.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

# The version names the item layout below: a proxy and a backend of different layouts (a
# rolling upgrade) are told apart by this header (415, docs/API.md), not by a garbled decode.
BATCH_CONTENT_TYPE = "application/vnd.coap-bridge.batch; v=2"
MAX_FIELD = 0xFFFF
MAX_SHORT_FIELD = 0xFF
# Content-Formats are 16-bit (RFC 7252 §12.3): a 32-bit field has room for "none".
NO_CONTENT_FORMAT = 0xFFFFFFFF

_HEAD = struct.Struct("!HIBBHHHI")


class BatchFormatError(ValueError):
    """A batch body or answer that does not follow the format; the message says where."""


# Not frozen: an item is built per device message on the proxy and again on the backend, and
# a frozen dataclass's __init__ costs about five times as much (docs/ARCHITECTURE.md, "The
# batch item is structured").
@dataclass(slots=True)
class BatchItem:
    """One device request: who sent it (``ip``, ``port``, ``proto``; ``identity`` the PSK
    identity over DTLS, else empty), the key of its exchange (``idempotency_key``), the MQTT
    ``topic`` it named (empty: none), its Content-Format (None: none) and payload."""

    ip: str
    port: int
    proto: str
    identity: str
    idempotency_key: str
    topic: str
    content_format: int | None
    payload: bytes


def encode_batch(items: list[BatchItem]) -> bytes:
    out = bytearray()
    for item in items:
        ip = item.ip.encode()
        proto = item.proto.encode()
        identity = item.identity.encode()
        key = item.idempotency_key.encode()
        topic = item.topic.encode()
        if len(ip) > MAX_SHORT_FIELD or len(proto) > MAX_SHORT_FIELD:
            raise BatchFormatError(f"ip or proto exceeds {MAX_SHORT_FIELD} bytes")
        longest = max(len(identity), len(key), len(topic))
        if longest > MAX_FIELD:
            raise BatchFormatError(f"field of {longest} bytes exceeds {MAX_FIELD}")
        content_format = item.content_format
        out += _HEAD.pack(
            item.port,
            NO_CONTENT_FORMAT if content_format is None else content_format,
            len(ip),
            len(proto),
            len(identity),
            len(key),
            len(topic),
            len(item.payload),
        )
        out += ip + proto + identity + key + topic
        out += item.payload
    return bytes(out)


def decode_batch(body: bytes) -> list[BatchItem]:
    items: list[BatchItem] = []
    pos, end = 0, len(body)
    head = _HEAD.size
    try:
        while pos < end:
            port, content_format, n_ip, n_proto, n_identity, n_key, n_topic, n_payload = (
                _HEAD.unpack_from(body, pos)
            )
            pos += head
            fields = pos + n_ip + n_proto + n_identity + n_key + n_topic
            if fields > end:
                raise BatchFormatError(f"item {len(items)}: field runs past the body")
            if fields + n_payload > end:
                raise BatchFormatError(f"item {len(items)}: payload runs past the body")
            ip = body[pos : pos + n_ip].decode()
            pos += n_ip
            proto = body[pos : pos + n_proto].decode()
            pos += n_proto
            identity = body[pos : pos + n_identity].decode()
            pos += n_identity
            key = body[pos : pos + n_key].decode()
            pos += n_key
            topic = body[pos:fields].decode()
            items.append(
                BatchItem(
                    ip,
                    port,
                    proto,
                    identity,
                    key,
                    topic,
                    None if content_format == NO_CONTENT_FORMAT else content_format,
                    body[fields : fields + n_payload],
                )
            )
            pos = fields + n_payload
    except struct.error as exc:
        raise BatchFormatError(f"item {len(items)}: truncated") from exc
    except UnicodeDecodeError as exc:
        raise BatchFormatError(f"item {len(items)}: a text field is not UTF-8") from exc
    return items


def encode_statuses(statuses: list[int]) -> bytes:
    return json.dumps({"statuses": statuses}, separators=(",", ":")).encode()


def decode_statuses(body: bytes, count: int) -> list[int]:
    try:
        statuses = json.loads(body)["statuses"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BatchFormatError('batch answer is not {"statuses": [...]}') from exc
    if (
        not isinstance(statuses, list)
        or len(statuses) != count
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in statuses)
    ):
        raise BatchFormatError(f"batch answer must list {count} integer statuses")
    return statuses
