"""``GET /devices/{device_id}/presence`` (docs/API.md, "Presence"): whether a device is online,
when it was last heard and when it goes offline unless it speaks again. For every device with
presence: a managed-PSK device (its id) and a signed-session device (``<productKey>:<deviceKey>``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from api.deps import StoreDep, require_api_key
from api.errors import DeviceNotFound, StoreUnavailable, error_responses
from api.presence import PresenceDep
from api.routes.registry import PresenceOut, RegistryDep, registry_errors
from stores.registry import valid_device_key, valid_product_key

router = APIRouter(tags=["devices"], dependencies=[Depends(require_api_key)])


@router.get(
    "/devices/{device_id}/presence",
    response_model=PresenceOut,
    summary="A device's presence: online or offline, last seen, offline at",
    description="`device_id`: a device's id (a SIM's is its ICCID), or a signed-session "
    "device's `<productKey>:<deviceKey>`. Times are ISO 8601 UTC, null when unknown.",
    responses=error_responses(DeviceNotFound, StoreUnavailable),
)
async def get_presence(
    device_id: Annotated[str, Path(max_length=128)],
    store: StoreDep,
    registry: RegistryDep,
    presence: PresenceDep,
) -> PresenceOut:
    if not await _known(device_id, store, registry):
        raise DeviceNotFound()
    return PresenceOut.of(await presence.get(device_id))


async def _known(device_id: str, store: StoreDep, registry: RegistryDep) -> bool:
    product_key, colon, device_key = device_id.partition(":")
    if colon and valid_product_key(product_key) and valid_device_key(device_key):
        with registry_errors():
            if await registry.get_device(product_key, device_key) is not None:
                return True
    return await store.get(device_id) is not None
