"""The HTTP side of the proxy, behind one seam.

All HTTP I/O goes through :class:`Upstream`, so the forwarder and the batcher never see a
transport, and a test of pure logic can plug in a stub at one place. The product's one
implementation is :class:`proxy.http1.Http1Upstream`; whatever it meets on the wire becomes
:class:`~proxy.errors.UpstreamUnreachable` (5.02) or :class:`~proxy.errors.UpstreamTimeout`
(5.04), never a library's exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

# Shared and read-only: most answers carry none of the kept headers.
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    content_type: str | None
    retry_after: str | None
    body: bytes
    # The origin's headers among policies.translation.KEPT_HEADERS (ETag, Location,
    # Cache-Control, Expires, Date, Content-Range, Accept-Ranges), names lower-case, repeated
    # fields joined with ", " (RFC 9110 §5.3). Never written to.
    headers: Mapping[str, str] = field(default_factory=lambda: NO_HEADERS)


class Upstream(Protocol):
    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...
