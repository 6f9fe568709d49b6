"""The managed-PSK platform's credentials API, at its own path (docs/PROFILES.md).

``POST /api/v4/manage/devices/{device_id}/credentials/`` issues a PSK credential: 32 random
bytes written as 64 hex characters, used by the device as that text (``coap-client -k <key>``,
docs/API.md "Credentials"), shown once. The PSK identity is the device id, which is the key of
the device's record, so every proxy's PSK mirror finds it by that identity and hears of the
change through the store's announcement (api/store/base.py) — on every replica within a
second, where the platform itself takes minutes. One credential per device: a new one replaces
the old at once. ``GET`` lists it without the key; ``DELETE .../{credential_id}/`` revokes it
(the key is removed: handshakes fail from then on).

Management key as every management route. A credential's status is "active" while it is not
revoked and the device still has a key: a key removed by ``DELETE /devices/{id}/psk`` leaves
no working credential either.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import NowDep, SettingsDep, StoreDep, require_api_key
from api.errors import (
    BODY_TOO_LARGE,
    MALFORMED_BODY,
    CredentialNotFound,
    DeviceNotFound,
    NotAuthenticated,
    NotConfigured,
    StoreUnavailable,
    clip,
    error_responses,
)
from api.routes.bootstrap import NO_STORE
from api.routes.devices import DeviceIdPath
from api.safe_json import SafeJsonRoute
from api.store.base import Device
from policies.psk import generate_key

log = logging.getLogger(__name__)

PREFIX = "/api/v4/manage/devices"

router = APIRouter(
    prefix=PREFIX,
    tags=["credentials"],
    dependencies=[Depends(require_api_key)],
    route_class=SafeJsonRoute,
)

_ERRORS = error_responses(DeviceNotFound, NotAuthenticated, NotConfigured, StoreUnavailable)
CredentialIdPath = Annotated[str, Path(description="the credential's id, from its POST")]


class CredentialRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"auth_type": "psk"}]}
    )

    auth_type: Literal["psk"] = Field(description="the only kind issued here: a DTLS PSK")


class Credential(BaseModel):
    """A credential as listed: never its key."""

    id: str = Field(description="the credential's id (a UUID)")
    auth_type: Literal["psk"]
    psk_identity: str = Field(description="the DTLS PSK identity: the device id")
    server: str = Field(description="the coaps:// endpoint to connect to")
    status: Literal["active", "revoked"]
    created_at: datetime


class IssuedCredential(BaseModel):
    """Shown once: the key cannot be read back later, only replaced."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b",
                    "auth_type": "psk",
                    "psk_identity": "koru-869181072798893",
                    "psk_key": "9f" * 32,
                    "server": "coaps://coap.example.com:5684",
                    "status": "active",
                }
            ]
        }
    )

    id: str
    auth_type: Literal["psk"]
    psk_identity: str
    psk_key: str = Field(description="64 lowercase hex characters, used as the key's text")
    server: str
    status: Literal["active"]


def listed(device: Device, server: str) -> Credential | None:
    if device.credential_id is None or device.credential_created_at is None:
        return None
    revoked = device.credential_revoked_at is not None or device.psk is None
    return Credential(
        id=device.credential_id,
        auth_type="psk",
        psk_identity=device.id,
        server=server,
        status="revoked" if revoked else "active",
        created_at=device.credential_created_at,
    )


@router.post(
    "/{device_id}/credentials/",
    status_code=201,
    summary="Issue a PSK credential (managed-PSK platform path); the key is shown once",
    description=(
        "Generates 32 random bytes as 64 hex characters, replacing any previous key of the "
        "device at once on every proxy; the PSK identity is the device id. The key is in this "
        "answer only."
    ),
    responses=_ERRORS | MALFORMED_BODY | BODY_TOO_LARGE,
)
async def issue(
    device_id: DeviceIdPath,
    body: CredentialRequest,
    store: StoreDep,
    settings: SettingsDep,
    now: NowDep,
    response: Response,
) -> IssuedCredential:
    psk = generate_key("hex64")
    credential_id = str(uuid.uuid4())
    # User-set: bootstrap never rotates it (it would break the credential just handed over).
    await store.update(
        device_id,
        psk=psk,
        psk_user_set=True,
        credential_id=credential_id,
        credential_created_at=now,
        credential_revoked_at=None,
    )
    log.info("managed psk credential %s issued for device %s", credential_id, device_id)
    response.headers.update(NO_STORE)
    return IssuedCredential(
        id=credential_id,
        auth_type=body.auth_type,
        psk_identity=device_id,
        psk_key=psk,
        server=settings.coaps_endpoint,
        status="active",
    )


@router.get(
    "/{device_id}/credentials/",
    summary="List a device's credential (never its key)",
    responses=_ERRORS,
)
async def list_credentials(
    device_id: DeviceIdPath, store: StoreDep, settings: SettingsDep
) -> list[Credential]:
    device = await store.get(device_id)
    if device is None:
        raise DeviceNotFound(f"device {clip(device_id)} not found")
    credential = listed(device, settings.coaps_endpoint)
    return [credential] if credential is not None else []


@router.delete(
    "/{device_id}/credentials/{credential_id}/",
    status_code=204,
    summary="Revoke a credential: its key stops working on every proxy",
    description="Idempotent: revoking a revoked credential answers 204 again.",
    responses=_ERRORS | error_responses(CredentialNotFound),
)
async def revoke(
    device_id: DeviceIdPath, credential_id: CredentialIdPath, store: StoreDep, now: NowDep
) -> Response:
    def change(current: Device) -> Mapping[str, Any]:
        if current.credential_id is None or current.credential_id != credential_id:
            raise CredentialNotFound(
                f"device {clip(device_id)} has no credential {clip(credential_id)}"
            )
        if current.credential_revoked_at is not None:
            return {}
        return {"psk": None, "psk_user_set": None, "credential_revoked_at": now}

    await store.modify(device_id, change)
    log.info("managed psk credential %s of device %s revoked", credential_id, device_id)
    return Response(status_code=204)
