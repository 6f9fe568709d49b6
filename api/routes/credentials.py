"""DTLS credentials of a device through the management API (docs/CONTRACT.md §6, §13; issue #5).

``PUT /devices/{iccid}/psk`` sets a key (plain text or hex), ``DELETE`` revokes it, and the
N-Hub-style ``POST /devices/{iccid}/credentials`` generates one (16 alphanumerics, or with
``"key_format": "hex64"`` the managed-PSK platform's 64 hex characters, docs/API.md
"Credentials") and shows it exactly once. No
endpoint ever reads a key back: ``GET /devices`` has no ``psk`` field, and a lost key is
replaced, not retrieved. Every change reaches the proxies within a second (the store announces
it; see ``api.store.base.DeviceStore``).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SettingsDep, StoreDep, require_api_key
from api.errors import (
    BODY_TOO_LARGE,
    MALFORMED_BODY,
    DeviceNotFound,
    NotAuthenticated,
    NotConfigured,
    StoreUnavailable,
    error_responses,
)
from api.psk_lifecycle import issue_credentials, parse_user_psk, revoke_psk, set_user_psk
from api.routes.bootstrap import NO_STORE
from api.routes.devices import IccidPath
from api.safe_json import SafeJsonRoute
from policies.psk import MAX_PSK_BYTES

router = APIRouter(
    prefix="/devices",
    tags=["credentials"],
    dependencies=[Depends(require_api_key)],
    route_class=SafeJsonRoute,
)

_ERRORS = error_responses(DeviceNotFound, NotAuthenticated, NotConfigured, StoreUnavailable)
_BODY_ERRORS = _ERRORS | MALFORMED_BODY | BODY_TOO_LARGE


class PskIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"psk": "aB3dEf7hIjKlMnOp", "format": "plain"},
                {"psk": "0x000102030405060708090a0b0c0d0e0f", "format": "hex"},
            ]
        },
    )

    # Generous enough that a key a few bytes too long gets the specific "PSK is N bytes"
    # message rather than a generic string-length one.
    psk: str = Field(
        min_length=1,
        max_length=4 * MAX_PSK_BYTES,
        description=(
            "plain: the key's characters (UTF-8, printable, no comma, quote or line break); "
            "hex: pairs of hex digits, with or without a leading 0x. "
            f"At most {MAX_PSK_BYTES} bytes of key (our tinydtls build)."
        ),
    )
    format: Literal["plain", "hex"] = "plain"


class CredentialsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"auth_type": "psk"}, {"auth_type": "psk", "key_format": "hex64"}]
        },
    )

    auth_type: Literal["psk"]
    key_format: Literal["alnum16", "hex64"] = Field(
        default="alnum16",
        description=(
            "alnum16: 16 characters of [A-Za-z0-9]. hex64: 32 random bytes written as 64 "
            "lowercase hex characters, as the managed-PSK platform issues them; the key is "
            "that text (64 bytes, what `coap-client -k <key>` presents), not the 32 bytes."
        ),
    )


class Credentials(BaseModel):
    """Shown once: the key cannot be read back later, only replaced."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "psk_identity": "8988280666000000001",
                    "psk_key": "aB3dEf7hIjKlMnOp",
                    "server": "coaps://coap.example.com:5684",
                    "status": "active",
                }
            ]
        }
    )

    psk_identity: str = Field(description="the DTLS PSK identity: the device's ICCID")
    psk_key: str = Field(
        description=(
            "the key, used as its characters' bytes: 16 of [A-Za-z0-9] (alnum16) or 64 "
            "lowercase hex digits (hex64); shown only here"
        )
    )
    server: str = Field(description="the coaps:// endpoint to connect to")
    status: Literal["active"] = Field(description="the key works from now on")


@router.put(
    "/{iccid}/psk",
    status_code=204,
    summary="Set a device's PSK (plain text or hex)",
    description=(
        "A key set here is user-set: bootstrap and onboarding hand it out as is and never "
        "regenerate it (docs/CONTRACT.md §7). Replaces any previous key at once on every proxy."
    ),
    responses=_BODY_ERRORS,
)
async def put_psk(iccid: IccidPath, body: PskIn, store: StoreDep) -> Response:
    await set_user_psk(store, iccid, parse_user_psk(body.psk, body.format))
    return Response(status_code=204)


@router.delete(
    "/{iccid}/psk",
    status_code=204,
    summary="Revoke a device's PSK",
    description=(
        "DTLS handshakes with this identity fail from now on, on every proxy. The next "
        "bootstrap or onboarding call generates a new key. Idempotent."
    ),
    responses=_ERRORS,
)
async def delete_psk(iccid: IccidPath, store: StoreDep) -> Response:
    await revoke_psk(store, iccid)
    return Response(status_code=204)


@router.post(
    "/{iccid}/credentials",
    status_code=201,
    summary="Generate DTLS credentials (N-Hub style); the key is shown once",
    description=(
        "Generates a new random key, replacing any previous one at once on every proxy. It "
        "counts as user-set: bootstrap never rotates it. The key is in this answer only. "
        "`key_format` hex64 gives the managed-PSK platform's 64 hex characters, which the "
        'device uses as text (docs/API.md, "Credentials").'
    ),
    responses=_BODY_ERRORS,
)
async def create_credentials(
    iccid: IccidPath,
    body: CredentialsRequest,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> Credentials:
    psk = await issue_credentials(store, iccid, body.key_format)
    response.headers.update(NO_STORE)
    return Credentials(
        psk_identity=iccid, psk_key=psk, server=settings.coaps_endpoint, status="active"
    )
