"""Device location (issue #6): the device reads its last known position over CoAP
(``GET /location``, via the proxy), and the systems that know where a SIM is write it through
the management API (``PUT /devices/{iccid}/location``).

Degrees are kept as the decimal text they arrived in: the request body's JSON numbers are
parsed as :class:`decimal.Decimal` (:class:`api.safe_json.DecimalJsonRoute`), so ``13.404954``
is stored, listed and served as ``13.404954``, never as a binary float's nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import NowDep, StoreDep, require_api_key, require_proxy
from api.errors import (
    BODY_TOO_LARGE,
    MALFORMED_BODY,
    ApiError,
    BadForwarded,
    BadLocationRequest,
    DeviceNotFound,
    DeviceUnauthorized,
    LocationForbidden,
    LocationNotFound,
    NotAuthenticated,
    NotConfigured,
    ProxyForbidden,
    SampleTimeInFuture,
    StoreUnavailable,
    clip,
    error_responses,
)
from api.identity import calling_device
from api.routes.devices import IccidPath
from api.safe_json import DecimalJsonRoute, SafeJsonRoute
from api.store.base import Device, Location

CSV_HEADER = "Longitude,Latitude,Source,SampleTime\n"
# Latest accepted SampleTime (9999-12-31T23:59:59Z), and how far ahead of our clock a sample
# may be: a far-future sample would otherwise shadow every real update ("keep the newest").
MAX_SAMPLE_TIME = 253_402_300_799
FUTURE_TOLERANCE = timedelta(days=1)


def location_csv(location: Location) -> str:
    """Header line, one row, ``\\n`` line ends, the stored decimals verbatim
    (docs/CONTRACT.md §4)."""
    return (
        f"{CSV_HEADER}{location.longitude},{location.latitude},"
        f"{location.source},{location.sample_time}\n"
    )


def _decimal_text(value: Decimal) -> str:
    # Positional notation ("0.0000001", not "1E-7"): the CSV promises decimal degrees.
    return format(value, "f")


# --- CoAP side (called by the proxy) --------------------------------------------------------

router = APIRouter(tags=["location"], route_class=SafeJsonRoute)


async def _has_payload(request: Request) -> bool:
    async for chunk in request.stream():
        if chunk:
            return True
    return False


@router.get(
    "/location",
    summary="The calling device's last known position, as CSV (called by the proxy)",
    description=(
        "The CoAP `GET /location` of the 1NCE profile, forwarded by the proxy with the "
        "device's address in `Forwarded` (over DTLS, its PSK identity). Answers "
        "`Longitude,Latitude,Source,SampleTime` and one row, `\\n` line ends. "
        "A query or a payload on this GET is a bad request (400 → 4.00)."
    ),
    response_class=PlainTextResponse,
    dependencies=[Depends(require_proxy)],
    responses={
        200: {
            "description": "the last known position",
            "content": {
                "text/plain": {
                    "example": "Longitude,Latitude,Source,SampleTime\n"
                    "13.404954,52.520008,GPS,1700000000\n"
                }
            },
        },
        **error_responses(
            BadLocationRequest,
            BadForwarded,
            DeviceUnauthorized,
            LocationForbidden,
            ProxyForbidden,
            LocationNotFound,
            StoreUnavailable,
            NotConfigured,
        ),
    },
)
async def device_location(request: Request, store: StoreDep) -> PlainTextResponse:
    device, _ = await calling_device(request, store)
    if request.url.query or await _has_payload(request):
        raise BadLocationRequest()
    if device.location_barred:
        raise LocationForbidden()
    location = device.location
    if location is None:
        raise LocationNotFound()
    return PlainTextResponse(location_csv(location))


# --- management side ------------------------------------------------------------------------

management = APIRouter(
    prefix="/devices",
    tags=["location"],
    dependencies=[Depends(require_api_key)],
    route_class=DecimalJsonRoute,
)

_AUTH_ERRORS: tuple[type[ApiError], ...] = (NotAuthenticated, NotConfigured, StoreUnavailable)

Longitude = Annotated[
    Decimal,
    Field(ge=-180, le=180, max_digits=20, decimal_places=15, allow_inf_nan=False),
]
Latitude = Annotated[
    Decimal,
    Field(ge=-90, le=90, max_digits=20, decimal_places=15, allow_inf_nan=False),
]


class LocationIn(BaseModel):
    """A position fix. Degrees as JSON numbers or strings; kept exactly as written."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "longitude": 13.404954,
                    "latitude": 52.520008,
                    "source": "GPS",
                    "sample_time": 1700000000,
                }
            ]
        },
    )

    longitude: Longitude = Field(description="decimal degrees, -180..180")
    latitude: Latitude = Field(description="decimal degrees, -90..90")
    source: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="where the fix comes from, e.g. GPS or CellTower",
    )
    sample_time: int = Field(
        strict=True, ge=0, le=MAX_SAMPLE_TIME, description="time of the fix, epoch seconds"
    )


class LocationOut(BaseModel):
    longitude: str = Field(description="decimal degrees, exactly as stored")
    latitude: str = Field(description="decimal degrees, exactly as stored")
    source: str
    sample_time: int

    @classmethod
    def of(cls, location: Location) -> LocationOut:
        return cls.model_validate(location.model_dump())


class LocationUpdate(BaseModel):
    """The outcome of a ``PUT``: an update older than the stored position is ignored."""

    stored: bool = Field(description="false: older than the position already stored")
    detail: str
    location: LocationOut = Field(description="the position stored now")


@management.put(
    "/{iccid}/location",
    summary="Record a device's position (the newest sample wins)",
    description=(
        "Keeps the last known position. An update whose `sample_time` is older than the stored "
        "one is ignored and the answer says so (`stored: false`); an equal time replaces it. "
        "A `sample_time` more than one day ahead of the server's clock is refused."
    ),
    responses=error_responses(DeviceNotFound, *_AUTH_ERRORS) | MALFORMED_BODY | BODY_TOO_LARGE,
)
async def put_location(
    iccid: IccidPath, body: LocationIn, store: StoreDep, now: NowDep
) -> LocationUpdate:
    if datetime.fromtimestamp(body.sample_time, now.tzinfo) > now + FUTURE_TOLERANCE:
        raise SampleTimeInFuture()
    new = Location(
        longitude=_decimal_text(body.longitude),
        latitude=_decimal_text(body.latitude),
        source=body.source,
        sample_time=body.sample_time,
    )
    outcome: list[bool] = []

    def change(current: Device) -> Mapping[str, Any]:
        stored = current.location
        if stored is not None and new.sample_time < stored.sample_time:
            outcome.append(False)
            return {}
        outcome.append(True)
        return {
            "location_longitude": new.longitude,
            "location_latitude": new.latitude,
            "location_source": new.source,
            "location_sample_time": new.sample_time,
        }

    device = await store.modify(iccid, change)
    current = device.location
    assert current is not None
    if outcome[-1]:
        return LocationUpdate(stored=True, detail="stored", location=LocationOut.of(current))
    return LocationUpdate(
        stored=False,
        detail=(
            f"ignored: sample_time {new.sample_time} is older than the stored {current.sample_time}"
        ),
        location=LocationOut.of(current),
    )


@management.get(
    "/{iccid}/location",
    summary="A device's last known position",
    responses=error_responses(DeviceNotFound, LocationNotFound, *_AUTH_ERRORS),
)
async def get_location(iccid: IccidPath, store: StoreDep) -> LocationOut:
    device = await store.get(iccid)
    if device is None:
        raise DeviceNotFound(f"device {clip(iccid)} not found")
    location = device.location
    if location is None:
        raise LocationNotFound()
    return LocationOut.of(location)
