"""Firmware images (issue 16; docs/API.md, "Firmware"): operators upload, list and delete them
through the management API, and devices download them over CoAP through the proxy, block by
block (RFC 7959 §2.4): the proxy asks for each block as one HTTP byte range (RFC 9110 §14), so
every block costs one small read of the store (stores/firmware.py), on any replica.
"""

from __future__ import annotations

import base64
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.byte_ranges import ByteRange, Unsatisfiable, parse_range
from api.deps import NowDep, SettingsDep, StoreDep, require_api_key, require_proxy
from api.errors import (
    BODY_TOO_LARGE,
    ApiError,
    BadForwarded,
    DeviceUnauthorized,
    NotAuthenticated,
    NotConfigured,
    PayloadTooLarge,
    ProxyForbidden,
    StoreUnavailable,
    clip,
    error_responses,
)
from api.identity import calling_device
from stores.firmware import (
    VERSION_PATTERN,
    Firmware,
    FirmwareChanged,
    FirmwareStore,
    FirmwareUnavailable,
    valid_version,
)

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
_READ_ATTEMPTS = 3
"""Opens of a version a read may need when uploads replace it meanwhile (each replacement
makes the previous copy unreadable, stores/firmware.py)."""


# --- errors ---------------------------------------------------------------------------------


class FirmwareNotFound(ApiError):
    """No image of that version: 4.04 on the CoAP side."""

    status_code = 404
    default_message = "no firmware of this version"


class EmptyFirmware(ApiError):
    status_code = 400
    default_message = "the firmware image is empty"


class FirmwareMediaType(ApiError):
    status_code = 415
    default_message = "a firmware image is uploaded as application/octet-stream"


class FirmwareTooLarge(PayloadTooLarge):
    default_message = "firmware image too large"


class RangeNotSatisfiable(ApiError):
    """A range past the image's end (RFC 9110 §15.5.17): 4.02 on the CoAP side, which the
    proxy's block-wise layer turns into the end of the transfer."""

    status_code = 416
    default_message = "range not satisfiable"

    def __init__(self, length: int) -> None:
        super().__init__(f"range not satisfiable: the image is {length} bytes")
        self.length = length

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.length}"}


class FirmwareStoreUnavailable(StoreUnavailable):
    default_message = "firmware store unavailable"


# --- plumbing -------------------------------------------------------------------------------


async def get_firmware_store(request: Request) -> FirmwareStore:
    store: FirmwareStore = request.app.state.firmware
    return store


FirmwareDep = Annotated[FirmwareStore, Depends(get_firmware_store)]


def etag_of(firmware: Firmware) -> str:
    """A strong ETag from the image's sha256: 6 bytes as 8 base64url characters, so it fits a
    CoAP ETag option (RFC 7252 §5.10.6: 1-8 bytes) as is and a device's validation (2.03)
    reaches us unchanged (policies/translation.py). Same bytes, same tag, on every replica."""
    tag = base64.urlsafe_b64encode(bytes.fromhex(firmware.sha256)[:6]).decode()
    return f'"{tag}"'


class FirmwareOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "1.4.2",
                    "size": 1048576,
                    "sha256": "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",
                    "created_at": 1700000000.0,
                }
            ]
        }
    )

    version: str
    size: int = Field(description="bytes")
    sha256: str = Field(description="hex digest of the image")
    created_at: float = Field(description="when this image was uploaded, unix seconds")

    @classmethod
    def of(cls, firmware: Firmware) -> FirmwareOut:
        return cls(
            version=firmware.version,
            size=firmware.size,
            sha256=firmware.sha256,
            created_at=firmware.created_at,
        )


class FirmwareList(BaseModel):
    firmware: list[FirmwareOut]


async def _get(store: FirmwareStore, version: str) -> Firmware:
    if not valid_version(version):
        raise FirmwareNotFound(f"no firmware {clip(version)}")  # no such name can exist
    try:
        firmware = await store.get(version)
    except FirmwareUnavailable as exc:
        log.warning("%s", exc)
        raise FirmwareStoreUnavailable() from exc
    if firmware is None:
        raise FirmwareNotFound(f"no firmware {clip(version)}")
    return firmware


VersionPath = Annotated[str, Path(description="the version's name")]
NewVersionPath = Annotated[
    str,
    Path(
        pattern=VERSION_PATTERN,
        description="1-64 of A-Z a-z 0-9 . _ -, not starting with a dot",
    ),
]
_MANAGEMENT_ERRORS: tuple[type[ApiError], ...] = (
    NotAuthenticated,
    NotConfigured,
    PayloadTooLarge,
    FirmwareStoreUnavailable,
)


# --- management -----------------------------------------------------------------------------

management = APIRouter(
    prefix="/firmware", tags=["firmware"], dependencies=[Depends(require_api_key)]
)


@management.put(
    "/{version}",
    summary="Upload a firmware image (replaces one of the same version)",
    description=(
        "The raw image as the body (`Content-Type: application/octet-stream`), at most "
        "`max_firmware_size` bytes (`COAP_BRIDGE_MAX_FIRMWARE_SIZE`, default 16 MiB; over it "
        "413 before the body is read). 201 for a new version, 200 when one was replaced: the "
        "switch is atomic, devices then get the new image under a new ETag."
    ),
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                OCTET_STREAM: {"schema": {"type": "string", "format": "binary", "minLength": 1}}
            },
        }
    },
    responses={
        200: {"model": FirmwareOut, "description": "an image of this version was replaced"},
        201: {"description": "stored", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(EmptyFirmware, FirmwareMediaType, *_MANAGEMENT_ERRORS),
        **BODY_TOO_LARGE,
    },
)
async def put_firmware(
    version: NewVersionPath,
    request: Request,
    store: FirmwareDep,
    settings: SettingsDep,
    now: NowDep,
) -> JSONResponse:
    media = request.headers.get("content-type", OCTET_STREAM).partition(";")[0].strip().lower()
    if media != OCTET_STREAM:
        raise FirmwareMediaType(
            f"a firmware image is uploaded as {OCTET_STREAM}, not {clip(media) or 'nothing'}"
        )
    body = await request.body()
    if len(body) > settings.max_firmware_size:  # the guard has refused a declared length
        raise FirmwareTooLarge(f"body is more than {settings.max_firmware_size} bytes")
    if not body:
        raise EmptyFirmware()
    try:
        firmware, replaced = await store.put(version, body, now=now.timestamp())
    except FirmwareUnavailable as exc:
        log.warning("%s", exc)
        raise FirmwareStoreUnavailable() from exc
    log.info("firmware %s stored: %d bytes, sha256 %s", version, firmware.size, firmware.sha256)
    return JSONResponse(
        FirmwareOut.of(firmware).model_dump(),
        status_code=200 if replaced else 201,
        headers={} if replaced else {"Location": f"/firmware/{version}"},
    )


@management.get(
    "",
    summary="Every stored firmware image (without the images)",
    responses=error_responses(*_MANAGEMENT_ERRORS),
)
async def list_firmware(store: FirmwareDep) -> FirmwareList:
    try:
        stored = await store.list()
    except FirmwareUnavailable as exc:
        log.warning("%s", exc)
        raise FirmwareStoreUnavailable() from exc
    return FirmwareList(firmware=[FirmwareOut.of(firmware) for firmware in stored])


@management.delete(
    "/{version}",
    summary="Delete a firmware image",
    status_code=204,
    responses=error_responses(FirmwareNotFound, *_MANAGEMENT_ERRORS),
)
async def delete_firmware(version: VersionPath, store: FirmwareDep) -> Response:
    if valid_version(version):
        try:
            deleted = await store.delete(version)
        except FirmwareUnavailable as exc:
            log.warning("%s", exc)
            raise FirmwareStoreUnavailable() from exc
        if deleted:
            log.info("firmware %s deleted", version)
            return Response(status_code=204)
    raise FirmwareNotFound(f"no firmware {clip(version)}")


# --- the device's download (called by the proxy) --------------------------------------------

router = APIRouter(tags=["firmware"])


def _not_modified(request: Request, etag: str) -> bool:
    """RFC 9110 §13.1.2: If-None-Match names the current tag (or ``*``). The proxy sends it
    when a device validates the ETag it holds (RFC 7252 §5.10.6.2)."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def _range_of(request: Request, firmware: Firmware, etag: str) -> ByteRange | Unsatisfiable | None:
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    # RFC 9110 §13.1.5: a Range with If-Range holds only when the strong tag is the current
    # one; a date (we send no Last-Modified) or another tag gets the whole, current image.
    if header is None or (if_range is not None and if_range.strip() != etag):
        return None
    return parse_range(header, firmware.size)


@router.get(
    "/firmware/{version}",
    summary="A firmware image, whole or one byte range (called by the proxy)",
    description=(
        "The CoAP `GET /firmware/{version}` a device downloads block-wise (RFC 7959): the "
        "proxy asks for each block as one `Range: bytes=first-last` (RFC 9110 §14). The "
        "calling device (by `Forwarded`, over DTLS by its PSK identity) must be a registered, "
        "active device (else 401 → 4.01). One range → 206 with `Content-Range`; several or "
        "a malformed one → the whole image (200); past the end → 416. Strong `ETag` from the "
        "image's sha256; `If-Range` and `If-None-Match` (304) are honoured."
    ),
    response_class=Response,
    dependencies=[Depends(require_proxy)],
    responses={
        200: {
            "description": "the whole image",
            "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                "ETag": {"schema": {"type": "string"}},
                "Accept-Ranges": {"schema": {"type": "string"}},
            },
        },
        206: {
            "description": "one byte range of the image",
            "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
            "headers": {
                "Content-Range": {"schema": {"type": "string"}},
                "ETag": {"schema": {"type": "string"}},
            },
        },
        304: {"description": "the device's ETag is the current one"},
        **error_responses(
            BadForwarded,
            DeviceUnauthorized,
            ProxyForbidden,
            FirmwareNotFound,
            RangeNotSatisfiable,
            FirmwareStoreUnavailable,
            NotConfigured,
        ),
    },
)
async def download_firmware(
    version: VersionPath, request: Request, devices: StoreDep, store: FirmwareDep
) -> Response:
    device, _origin = await calling_device(request, devices)
    for _ in range(_READ_ATTEMPTS):
        firmware = await _get(store, version)
        etag = etag_of(firmware)
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        wanted = _range_of(request, firmware, etag)
        if isinstance(wanted, Unsatisfiable):
            raise RangeNotSatisfiable(firmware.size)
        first, last = (wanted.first, wanted.last) if wanted else (0, firmware.size - 1)
        try:
            data = await store.read(firmware, first, last)
        except FirmwareChanged:
            continue  # replaced or deleted since we opened it: open it again
        except FirmwareUnavailable as exc:
            log.warning(
                "firmware %s for device %s: %s",
                version,
                device.id,
                exc,
                extra={"device": device.id},
            )
            raise FirmwareStoreUnavailable() from exc
        if wanted is None:
            return Response(data, media_type=OCTET_STREAM, headers=headers)
        log.debug("firmware %s: bytes %d-%d of %d", version, first, last, firmware.size)
        headers["Content-Range"] = wanted.content_range
        return Response(data, status_code=206, media_type=OCTET_STREAM, headers=headers)
    raise FirmwareStoreUnavailable("firmware kept changing while it was read; retry")
