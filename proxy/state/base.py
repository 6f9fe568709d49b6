"""The ``DedupStore`` seam: who processes an exchange, and what its answer was.

A replica that sees a request first **claims** its dedup key. The claim carries a short lease:
if the replica dies before answering, the claim disappears after the lease and a
retransmission is processed by whichever replica gets it. Once answered, the key holds the
exact response bytes for the rest of the exchange's lifetime, so every replica replays them.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Claim(enum.Enum):
    OWNED = "owned"  # this replica processes the request
    BUSY = "busy"  # another replica holds the claim and has not answered yet


# What ``claim`` returns: OWNED, BUSY, or the bytes to replay.
ClaimResult = Claim | bytes


class DedupUnavailable(Exception):
    """The shared store cannot be reached; the proxy falls back to local dedup."""


class DedupStore(Protocol):
    async def claim(self, key: str, lease: float) -> ClaimResult:
        """Claim ``key`` for ``lease`` seconds, or learn who has it / what was answered."""
        ...

    def complete(self, key: str, response: bytes, lifetime: float) -> None:
        """Record the answer for ``lifetime`` seconds; does not wait (errors are logged)."""
        ...

    async def flush(self) -> None:
        """Wait until every recorded answer has been written (shutdown, tests)."""
        ...

    async def close(self) -> None: ...
