"""The HTTP side of the proxy, behind one seam.

All HTTP I/O goes through :class:`Upstream` so another transport (or an in-process ASGI app in
a test of pure logic) plugs in at one place. httpx's exceptions never leave this module: they
become :class:`~proxy.errors.UpstreamUnreachable` or :class:`~proxy.errors.UpstreamTimeout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httpx

from proxy.errors import UpstreamTimeout, UpstreamUnreachable


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    content_type: str | None
    retry_after: str | None
    body: bytes


class Upstream(Protocol):
    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class HttpxUpstream:
    """One pooled :class:`httpx.AsyncClient` for every forwarded request."""

    def __init__(self, *, timeout: float, max_connections: int = 100) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            # The device's request is what we forward; never follow a redirect on its behalf.
            follow_redirects=False,
            trust_env=False,
        )

    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse:
        try:
            response = await self._client.request(method, url, headers=headers, content=content)
        except httpx.TimeoutException as exc:
            # A pool timeout means every connection is busy for longer than the request's whole
            # budget: from the device's point of view the backend did not answer in time.
            raise UpstreamTimeout(f"{method} {url}: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnreachable(f"{method} {url}: {exc!r}") from exc
        return UpstreamResponse(
            status=response.status_code,
            content_type=response.headers.get("content-type"),
            retry_after=response.headers.get("retry-after"),
            body=response.content,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
