"""Content-Type ↔ Content-Format by the IANA "CoAP Content-Formats" registry (RFC 7252 §12.3)."""

from __future__ import annotations

CONTENT_FORMATS: dict[int, str] = {
    0: "text/plain; charset=utf-8",
    16: 'application/cose; cose-type="cose-encrypt0"',
    40: "application/link-format",
    41: "application/xml",
    42: "application/octet-stream",
    47: "application/exi",
    50: "application/json",
    51: "application/json-patch+json",
    52: "application/merge-patch+json",
    60: "application/cbor",
    61: "application/cwt",
    110: "application/senml+json",
    112: "application/senml+cbor",
}

_BY_MEDIA_TYPE: dict[str, int] = {
    "text/plain": 0,
    "application/cose": 16,
    "text/csv": 0,  # CSV bodies are served as text/plain (docs/CONTRACT.md §4)
    "application/link-format": 40,
    "application/xml": 41,
    "text/xml": 41,
    "application/octet-stream": 42,
    "application/exi": 47,
    "application/json": 50,
    "application/json-patch+json": 51,
    "application/merge-patch+json": 52,
    "application/cbor": 60,
    "application/cwt": 61,
    "application/senml+json": 110,
    "application/senml+cbor": 112,
}


def content_type_for(content_format: int) -> str | None:
    """HTTP Content-Type for a CoAP Content-Format number, ``None`` when unregistered here."""
    return CONTENT_FORMATS.get(content_format)


def content_format_for(content_type: str) -> int | None:
    """CoAP Content-Format for an HTTP Content-Type.

    Parameters are ignored except a text charset: Content-Format 0 means UTF-8, so text in
    another charset has no Content-Format (US-ASCII is a subset of UTF-8 and is accepted).
    """
    media_type, _, params = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type.startswith("text/"):
        for param in params.split(";"):
            name, _, value = param.partition("=")
            charset = value.strip().strip('"').lower()
            if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8", "us-ascii"):
                return None
    return _BY_MEDIA_TYPE.get(media_type)
