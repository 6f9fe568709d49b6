"""HTTP ``Range: bytes=...`` for small, fully built bodies (RFC 9110 §14).

Pure: parses a header against a body length and says what to send. The decisions the RFC
leaves to the server, taken here:

- A header that does not parse — a unit other than ``bytes`` (§14.2: MUST ignore), a spec
  that is not ``first-last`` / ``first-`` / ``-suffix``, ``last < first`` (§14.2: MAY ignore
  an invalid ranges-specifier) — is ignored: the full body with 200.
- Several ranges in one header are ignored the same way, with 200 and the full body (§14.2
  lets a server ignore Range; our bodies are well under 100 bytes, so a multipart/byteranges
  answer would be larger than the whole body, and a device that asks for pieces asks for one
  at a time).
- One range that does not overlap the body (``first >= length``, or a zero suffix) is
  unsatisfiable: 416 with ``Content-Range: bytes */length`` (§15.5.17).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The inclusive slice ``first..last`` of a body of ``length`` bytes."""

    first: int
    last: int
    length: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.length}"

    def slice(self, body: bytes) -> bytes:
        return body[self.first : self.last + 1]


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    length: int

    @property
    def content_range(self) -> str:
        return f"bytes */{self.length}"


def parse_range(header: str | None, length: int) -> ByteRange | Unsatisfiable | None:
    """``None``: serve the whole body (no header, or one that is ignored, see above)."""
    if header is None:
        return None
    unit, equals, range_set = header.strip().partition("=")
    if not equals or unit.lower() != "bytes":
        return None
    specs = [spec.strip() for spec in range_set.split(",")]
    if len(specs) != 1:
        return None
    match = _SPEC.fullmatch(specs[0])
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None  # "-" alone is no range-spec
        suffix = int(last_text)
        if suffix == 0 or length == 0:
            return Unsatisfiable(length)
        return ByteRange(max(0, length - suffix), length - 1, length)
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        return None  # invalid range-spec (§14.1.1)
    if first >= length:
        return Unsatisfiable(length)
    return ByteRange(first, length - 1 if last is None else min(last, length - 1), length)
