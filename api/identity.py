"""Who is calling: the device a proxied request comes from (docs/CONTRACT.md §2, §11).

Used by every endpoint the proxy forwards device requests to (ingest, bootstrap, location).
The proxy token has already been checked (``api.deps.require_proxy``) when these run, so the
``Forwarded`` header and the PSK identity header can be believed.
"""

from __future__ import annotations

from fastapi import Request

from api.errors import BadForwarded, DeviceUnauthorized
from api.store.base import Device, DeviceStore
from policies.forwarding import FORWARDED_HEADER, IDENTITY_HEADER, Origin, parse_forwarded


def origin_from(forwarded: str | None) -> Origin:
    """The device's address from a ``Forwarded`` value; 400 when missing or unusable."""
    origin = parse_forwarded(forwarded) if forwarded else None
    if origin is None:
        raise BadForwarded()
    return origin


async def lookup_device(store: DeviceStore, origin: Origin, identity: str | None) -> Device:
    """Over DTLS the PSK identity (the ICCID) names the device; over plain CoAP its source
    address does (docs/CONTRACT.md §2). Unknown or non-active → 401."""
    device = await store.get(identity) if identity else await store.get_by_ip(origin.ip)
    if device is None or not device.is_active:
        raise DeviceUnauthorized()
    return device


async def calling_device(request: Request, store: DeviceStore) -> tuple[Device, Origin]:
    """The device behind a single-form proxied request, from its headers."""
    origin = origin_from(request.headers.get(FORWARDED_HEADER))
    device = await lookup_device(store, origin, request.headers.get(IDENTITY_HEADER))
    return device, origin
