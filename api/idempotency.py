"""The backend's half of exactly-once (docs/CONTRACT.md §11): an Idempotency-Key is published once.

The proxy derives the key from the CoAP exchange, so every retransmission of one message carries
the same key, whichever proxy replica forwards it. This matters when a proxy dies after
forwarding but before remembering its answer: the retransmission reaches another replica,
which forwards it again, and the API answers what it answered the first time without publishing
again.

The records are the exactly-once ledger's (stores/ledger.py) under the API's own prefix: claimed
while the message is being published (a lease, so a crashed API replica cannot block a key for
long), then the HTTP status it was answered with, kept as long as a CoAP exchange lives. This
module holds what is the API's: the lease, the lifetime, and the translation of an unreachable
store into the API's 503.
"""

from __future__ import annotations

from collections.abc import Sequence

from api.errors import StoreUnavailable
from stores.keys import idempotency_prefix
from stores.ledger import Ledger, LedgerUnavailable, Outcome, ledger_for

LEASE = 10.0  # seconds: longer than a publish can take (mqtt_publish_timeout 5 s)
LIFETIME = 247.0  # seconds: EXCHANGE_LIFETIME (RFC 7252 §4.8.2)


def build_ledger(redis_url: str | None, prefix: str) -> Ledger:
    """The API's ledger for ``redis_url`` (None: this process's memory). redis-py retries on its
    default schedule; our own connection does not (a failed batch is answered 503, the device
    sends again and the next call opens a new connection)."""
    return ledger_for(redis_url, prefix=idempotency_prefix(prefix), timeout=2.0, retries=None)


async def claim_keys(ledger: Ledger, keys: Sequence[str]) -> list[Outcome]:
    """Claim each Idempotency-Key; an unreachable store is :class:`StoreUnavailable` (503)."""
    try:
        return await ledger.claim(keys, LEASE)
    except LedgerUnavailable as exc:
        raise StoreUnavailable(f"idempotency store unavailable: {exc}") from exc


def settle_keys(ledger: Ledger, answered: list[tuple[str, bytes]], released: list[str]) -> None:
    """Record the answers (HTTP status as text, e.g. b"204"); release the claims of messages
    that failed, so that their retry goes ahead. Written with the next claim."""
    for key, status in answered:
        ledger.record(key, status, LIFETIME)
    for key in released:
        ledger.release(key)
