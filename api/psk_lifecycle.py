"""The PSK lifecycle on the device store: hand-out (bootstrap and onboarding), user-set keys,
revocation, and N-Hub-style credentials (docs/CONTRACT.md §6, §7, §13; issue #5).

The rules themselves are pure and live in :mod:`policies.psk`; this module applies them to
the store in one atomic read-modify-write each (``DeviceStore.modify``), so two replicas
answering the same device at the same moment can never hand out two different keys. Every
write that changes a ``psk`` is announced to the proxies by the store itself (PUBLISH on
``stores.keys.psk_channel`` with Redis, in-process listeners with the memory store).

Keys are never logged: log lines name the device and what happened, not the key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from api.errors import (
    BootstrapRateLimited,
    DeviceNotFound,
    DeviceUnauthorized,
    InvalidPsk,
    TermsNotAccepted,
)
from api.settings import ApiSettings
from api.store.base import Device, DeviceStore
from policies.psk import BootstrapDecision, PskError, bootstrap_psk, generate_key, normalise_psk

log = logging.getLogger(__name__)

# Characters that would break the one-line CSV answers of /bootstrap and onboarding
# (`iccid,psk,url`): a plain PSK with one of them could not be parsed back by the device.
_CSV_UNSAFE = frozenset(',"\r\n')


def _rate_limit(current: Device, now: datetime, settings: ApiSettings) -> dict[str, Any]:
    """Count one call in the device's fixed window; 429 when the window is full. A refused call
    changes nothing, so it neither counts as a bootstrap call nor rotates a key."""
    window = timedelta(seconds=settings.bootstrap_rate_window)
    start = current.bootstrap_window_start
    calls = current.bootstrap_window_calls or 0
    # A window start in the future means a replica's clock is ahead: start over rather than
    # lock the device out until that time.
    if start is None or now - start >= window or now < start:
        return {"bootstrap_window_start": now, "bootstrap_window_calls": 1}
    if calls >= settings.bootstrap_rate_limit:
        wait = math.ceil((start + window - now).total_seconds())
        raise BootstrapRateLimited(
            wait,
            f"more than {settings.bootstrap_rate_limit} bootstrap calls in "
            f"{settings.bootstrap_rate_window:g} s; retry in {max(1, wait)} s",
        )
    return {"bootstrap_window_calls": calls + 1}


async def hand_out_psk(
    store: DeviceStore,
    settings: ApiSettings,
    device: Device,
    now: datetime,
    *,
    require_terms: bool = False,
) -> str:
    """The PSK a bootstrap (CoAP) or onboarding (HTTPS) call at ``now`` returns, applying
    :func:`policies.psk.bootstrap_psk` and recording ``now`` as ``last_bootstrap_at``.

    Both endpoints go through here, so a key fetched by one is what the other returns within
    the five-minute window. Raises :class:`DeviceUnauthorized` (gone or non-active meanwhile),
    :class:`TermsNotAccepted` (when ``require_terms``) or :class:`BootstrapRateLimited`.
    """
    decisions: list[BootstrapDecision] = []

    def change(current: Device) -> Mapping[str, Any]:
        if not current.is_active:
            raise DeviceUnauthorized()
        if require_terms and current.terms_accepted is not True:
            raise TermsNotAccepted()
        changes = _rate_limit(current, now, settings)
        decision = bootstrap_psk(
            current.psk, current.psk_user_set is True, current.last_bootstrap_at, now
        )
        decisions.append(decision)
        changes["last_bootstrap_at"] = now
        if decision.regenerated:
            changes["psk"] = decision.psk
            changes["psk_user_set"] = False
        return changes

    try:
        updated = await store.modify(device.id, change)
    except DeviceNotFound as exc:
        raise DeviceUnauthorized() from exc
    # The last decision is the one of the attempt that committed.
    if decisions[-1].regenerated:
        log.info("bootstrap: new psk generated for device %s", device.id)
    assert updated.psk is not None
    return updated.psk


def parse_user_psk(value: str, fmt: str) -> str:
    """A key given through the management API → the stored string; :class:`InvalidPsk` (422)
    with a message that never repeats the key."""
    try:
        psk = normalise_psk(value, fmt)
    except PskError as exc:
        raise InvalidPsk(str(exc)) from exc
    if fmt == "plain" and (_CSV_UNSAFE & set(psk) or any(not ch.isprintable() for ch in psk)):
        raise InvalidPsk(
            "a plain PSK must be printable and contain no comma, quote or line break "
            "(it travels in a CSV line); use format 'hex' for arbitrary bytes"
        )
    return psk


async def set_user_psk(store: DeviceStore, iccid: str, psk: str) -> Device:
    """A user-set key: returned by every bootstrap as is, never regenerated
    (docs/CONTRACT.md §7)."""
    device = await store.update(iccid, psk=psk, psk_user_set=True)
    log.info("psk set by user for device %s", iccid)
    return device


async def revoke_psk(store: DeviceStore, iccid: str) -> Device:
    """No key any more: DTLS handshakes fail; the next bootstrap generates a new one."""
    device = await store.update(iccid, psk=None, psk_user_set=None)
    log.info("psk revoked for device %s", iccid)
    return device


async def issue_credentials(store: DeviceStore, iccid: str, key_format: str = "alnum16") -> str:
    """N-Hub style (docs/CONTRACT.md §13): a fresh generated key in ``key_format``
    (:data:`policies.psk.KEY_FORMATS`), replacing any other. The operator asked for it through
    the management API, so it counts as user-set and bootstrap never rotates it (a rotation
    would silently break the credentials just handed over)."""
    psk = generate_key(key_format)
    await store.update(iccid, psk=psk, psk_user_set=True)
    log.info("psk credentials issued for device %s", iccid)
    return psk
