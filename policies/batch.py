"""The batch form of an upstream call: many device requests in one HTTP request (group commit).

When a route names a ``batch_target``, the proxy sends the requests that arrive while a call to
that target is in flight together in the next call, instead of one HTTP request each. The body
is a sequence of items, each the same facts the single form carries in headers and query; the
answer is JSON ``{"statuses": [204, 401, ...]}``, one HTTP status per item in order. A
``Retry-After`` on the batch answer applies to every item answered 503.

Item layout (all integers big-endian)::

    u16 len + forwarded      Forwarded header value (docs/CONTRACT.md §11)
    u16 len + identity       PSK identity, empty on plain CoAP
    u16 len + idempotency    Idempotency-Key
    u16 len + query          the query string, percent-encoded, without '?'
    u16 len + content_type   Content-Type, empty when the request had no Content-Format
    u32 len + payload

Length prefixes instead of separators: no field needs escaping, and decoding is a few
``struct`` reads per item.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

BATCH_CONTENT_TYPE = "application/vnd.coap-bridge.batch"
MAX_FIELD = 0xFFFF

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class BatchFormatError(ValueError):
    """A batch body or answer that does not follow the format; the message says where."""


@dataclass(frozen=True, slots=True)
class BatchItem:
    forwarded: str
    identity: str
    idempotency_key: str
    query: str
    content_type: str
    payload: bytes


def encode_batch(items: list[BatchItem]) -> bytes:
    out = bytearray()
    for item in items:
        for text in (
            item.forwarded,
            item.identity,
            item.idempotency_key,
            item.query,
            item.content_type,
        ):
            data = text.encode()
            if len(data) > MAX_FIELD:
                raise BatchFormatError(f"field of {len(data)} bytes exceeds {MAX_FIELD}")
            out += _U16.pack(len(data))
            out += data
        out += _U32.pack(len(item.payload))
        out += item.payload
    return bytes(out)


def decode_batch(body: bytes) -> list[BatchItem]:
    items: list[BatchItem] = []
    pos, end = 0, len(body)
    try:
        while pos < end:
            fields: list[str] = []
            for _ in range(5):
                (length,) = _U16.unpack_from(body, pos)
                pos += 2
                if pos + length > end:
                    raise BatchFormatError(f"item {len(items)}: field runs past the body")
                fields.append(body[pos : pos + length].decode())
                pos += length
            (length,) = _U32.unpack_from(body, pos)
            pos += 4
            if pos + length > end:
                raise BatchFormatError(f"item {len(items)}: payload runs past the body")
            forwarded, identity, key, query, content_type = fields
            items.append(
                BatchItem(forwarded, identity, key, query, content_type, body[pos : pos + length])
            )
            pos += length
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
