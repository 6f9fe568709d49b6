"""``GET /bootstrap``: a device fetches its DTLS credentials over plain CoAP.

The rules are docs/CONTRACT.md §4 (the CSV line) and §7 (rotation).

Called by the proxy for CoAP ``GET /bootstrap``. The answer is one CSV line
``<iccid>,<psk>,<coaps url>`` (text/plain → Content-Format 0), with no line end: the vendor
sample splits the payload on ``,`` and uses the third field as the URL as is. Without a DTLS
listener (and no ``coaps_url``) the third field is empty: always three fields, so that split
still works, and no URL that nothing serves.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from api.deps import NowDep, SettingsDep, StoreDep, require_proxy
from api.errors import (
    BadForwarded,
    BootstrapRateLimited,
    DeviceUnauthorized,
    ProxyForbidden,
    StoreUnavailable,
    error_responses,
)
from api.identity import calling_device
from api.psk_lifecycle import hand_out_psk

router = APIRouter(tags=["bootstrap"])

# A PSK must not linger in any cache between the device and us.
NO_STORE = {"Cache-Control": "no-store"}


@router.get(
    "/bootstrap",
    summary="A device's PSK, as one CSV line (called by the proxy)",
    description=(
        "The CoAP `GET /bootstrap` of the 1NCE profile, forwarded by the proxy with the device's "
        "address in `Forwarded` (and, over DTLS, its PSK identity). Answers "
        "`<clientIdentity>,<preSharedKey>,<coapsEndpointUrl>` without a line end.\n\n"
        "Rotation (docs/CONTRACT.md §7): no key yet → a new one; a key set by the user is "
        "returned as is; a generated key is regenerated when this call comes 5 minutes or "
        "more after the previous bootstrap or onboarding call (the old key stops working at "
        "once); every call is recorded. Calls per device are rate limited (429 → CoAP 4.29).\n\n"
        "`coapsEndpointUrl` is the setting `coaps_url`, else the DTLS listener's address; it is "
        "empty (the line ends in `,`) when DTLS is switched off and no `coaps_url` is set: the "
        "key is still handed out, but no endpoint that nobody serves is advertised."
    ),
    response_class=PlainTextResponse,
    dependencies=[Depends(require_proxy)],
    responses={
        200: {
            "description": "`clientIdentity,preSharedKey,coapsEndpointUrl`",
            "content": {
                "text/plain": {
                    "example": "8988280666000000000,aB3dEf7hIjKlMnOp,coaps://coap.example.com:5684"
                }
            },
        },
        **error_responses(
            BadForwarded, DeviceUnauthorized, ProxyForbidden, BootstrapRateLimited, StoreUnavailable
        ),
    },
)
async def bootstrap(
    request: Request, settings: SettingsDep, store: StoreDep, now: NowDep
) -> PlainTextResponse:
    device, _ = await calling_device(request, store)
    psk = await hand_out_psk(store, settings, device, now)
    return PlainTextResponse(f"{device.id},{psk},{settings.coaps_endpoint}", headers=NO_STORE)
