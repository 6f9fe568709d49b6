"""In-process :class:`DedupStore`, for embedded use and for several proxies in one process."""

from __future__ import annotations

import time

from proxy.state.base import Claim, ClaimResult


class MemoryDedupStore:
    def __init__(self) -> None:
        # key → (expires at, value); value is None while claimed, else the response bytes.
        self._entries: dict[str, tuple[float, bytes | None]] = {}

    def _live(self, key: str, now: float) -> tuple[float, bytes | None] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= now:
            del self._entries[key]
            return None
        return entry

    async def claim(self, key: str, lease: float) -> ClaimResult:
        now = time.monotonic()
        entry = self._live(key, now)
        if entry is None:
            self._entries[key] = (now + lease, None)
            if len(self._entries) % 1024 == 0:
                self._sweep(now)
            return Claim.OWNED
        return Claim.BUSY if entry[1] is None else entry[1]

    def complete(self, key: str, response: bytes, lifetime: float) -> None:
        self._entries[key] = (time.monotonic() + lifetime, response)

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()

    def _sweep(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]
