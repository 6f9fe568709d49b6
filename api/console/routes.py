"""``/console``: the web console's pages and forms (docs/OPERATIONS.md, "Console").

Every operation calls the management API's own route functions or the ingest path's own
functions (api/routes/devices.py, credentials.py, location.py, ingest.py), so the console
applies exactly the rules and errors the API does; it adds the session (api/console/auth.py),
HTML and the live view (api/console/live.py). The guard (api/guard.py) caps bodies under
``/console`` and leaves the caller to these routes: the cookie, not a bearer header.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from api.console import pages
from api.console.auth import (
    COOKIE,
    SESSION_LIFETIME,
    same_origin_refusal,
    session_token,
    valid_session,
)
from api.console.live import LiveHub, LiveUnavailable
from api.errors import ApiError, PayloadTooLarge, StoreUnavailable
from api.routes.credentials import (
    CredentialsRequest,
    PskIn,
    create_credentials,
    delete_psk,
    put_psk,
)
from api.routes.devices import DeviceCreate, create_device
from api.routes.ingest import (
    default_topic,
    message_properties,
    publish_once,
    template_of,
    translate,
)
from api.routes.location import LocationIn, put_location
from api.routes.templates import store_location
from api.settings import ApiSettings
from api.store.base import Device, DeviceStore
from policies.media import content_format_for
from policies.profiles import SIM_IDENTITY
from stores.presence import Presence

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)

LIST_LIMIT = 200
"""Devices one listing shows; the search narrows it down."""
_MAX_FIELDS = 16
_HEADERS = {
    # No inline code, nothing from elsewhere, no framing (clickjacking), forms post here only.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Pages show keys once and device data: never kept by a cache or the back button.
    "Cache-Control": "no-store",
}
_DONE = {
    "registered": "Device registered.",
    "psk-set": "PSK set: every proxy uses it within a second.",
    "psk-revoked": "PSK revoked: DTLS handshakes with this identity fail from now on.",
    "located": "Location saved.",
    "sent": "Message published (the broker acknowledged it).",
}
_STATIC = {"console.js": "text/javascript", "console.css": "text/css"}

DevicePath = Annotated[str, Path(max_length=128)]


class FormError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def _store(request: Request) -> DeviceStore:
    store: DeviceStore = request.app.state.store
    return store


def _signed_in(request: Request) -> bool:
    return valid_session(_settings(request).api_key, request.cookies.get(COOKIE))


def _page_refusal(request: Request) -> Response | None:
    """A page (GET) without a session goes to the sign-in form."""
    if _settings(request).api_key is None:
        return _html(pages.login(configured=False), 503)
    if not _signed_in(request):
        return RedirectResponse("/console/login", status_code=303, headers=_HEADERS)
    return None


def _write_refusal(request: Request) -> Response | None:
    """A state-changing request: the key configured, the same origin, a session."""
    if _settings(request).api_key is None:
        return _html(pages.login(configured=False), 503)
    if (why := same_origin_refusal(request)) is not None:
        log.warning("console: cross-origin %s %s refused", request.method, request.url.path)
        return _html(pages.problem("Refused", f"Refused: {why}."), 403)
    if not _signed_in(request):
        return _html(pages.login("Your session has ended: sign in again."), 401)
    return None


async def _form(request: Request) -> dict[str, str]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise FormError(415, "a console form is sent as application/x-www-form-urlencoded")
    body = await request.body()  # the guard capped it (api/guard.py)
    try:
        pairs = parse_qsl(
            body.decode("latin-1"), keep_blank_values=True, max_num_fields=_MAX_FIELDS
        )
    except ValueError as exc:
        raise FormError(400, f"the form is malformed: {exc}") from exc
    return {name: value.strip() for name, value in pairs}


def _invalid(exc: ValidationError) -> str:
    # The messages name the rule, never the value (a PSK, say): include_input=False.
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(parts)


_REFUSED = (FormError, ValidationError, ApiError)
"""What an operation's form, model or the API's own function raises when it refuses."""


def _refusal(exc: FormError | ValidationError | ApiError, what: str) -> tuple[str, int]:
    """The notice and status of a refused operation: a form error as it is (it names the
    field); the API's rules and errors after ``what`` ("PSK not set"), with the API's status."""
    if isinstance(exc, FormError):
        return exc.message, exc.status
    if isinstance(exc, ValidationError):
        return f"{what}: {_invalid(exc)}", 422
    return f"{what}: {exc.message}", exc.status_code


async def _presences(request: Request, ids: list[str]) -> dict[str, Presence]:
    if not ids:
        return {}
    try:
        found = await request.app.state.presence.get_many(ids)
    except StoreUnavailable:
        return {}
    return {presence.device: presence for presence in found}


async def _device_page(
    request: Request,
    device_id: str,
    *,
    message: str | None = None,
    error: bool = False,
    status: int = 200,
    issued_key: str | None = None,
) -> Response:
    try:
        device = await _store(request).get(device_id)
    except ApiError as exc:
        return _html(pages.problem("Device", exc.message), exc.status_code)
    if device is None:
        return _html(pages.problem("Device", f"No device {device_id}."), 404)
    presence = (await _presences(request, [device.id])).get(device.id)
    body = pages.device(
        device,
        presence,
        location_managed=SIM_IDENTITY in _settings(request).profiles,
        message=message,
        error=error,
        issued_key=issued_key,
    )
    return _html(body, status)


async def _refused(
    request: Request, device_id: str, exc: FormError | ValidationError | ApiError, what: str
) -> Response:
    """The device's page again, with why the operation was refused (see :func:`_refusal`)."""
    message, status = _refusal(exc, what)
    return await _device_page(request, device_id, message=message, error=True, status=status)


def _done(device_id: str, what: str) -> RedirectResponse:
    # Post/redirect/get: a reload does not post again. The notice is one of ours (_DONE).
    return RedirectResponse(
        f"/console/devices/{device_id}?done={what}", status_code=303, headers=_HEADERS
    )


# --- sign-in ---------------------------------------------------------------------------------


@router.get("/login")
async def login_form(request: Request) -> Response:
    configured = _settings(request).api_key is not None
    return _html(pages.login(configured=configured), 200 if configured else 503)


@router.post("/login")
async def login(request: Request) -> Response:
    api_key = _settings(request).api_key
    if api_key is None:
        return _html(pages.login(configured=False), 503)
    if (why := same_origin_refusal(request)) is not None:
        return _html(pages.problem("Refused", f"Refused: {why}."), 403)
    try:
        key = (await _form(request)).get("key", "")
    except FormError as exc:
        return _html(pages.login(exc.message), exc.status)
    if not key or not hmac.compare_digest(key.encode(), api_key.encode()):
        log.warning("console: sign-in with a wrong key from %s", _peer(request)[0])
        return _html(pages.login("Wrong key: it must be the management API key."), 401)
    response = RedirectResponse("/console", status_code=303, headers=_HEADERS)
    response.set_cookie(
        COOKIE,
        session_token(api_key),
        max_age=SESSION_LIFETIME,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    if (why := same_origin_refusal(request)) is not None:
        return _html(pages.problem("Refused", f"Refused: {why}."), 403)
    response = RedirectResponse("/console/login", status_code=303, headers=_HEADERS)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
    return response


# --- devices ---------------------------------------------------------------------------------


@router.get("")
async def devices(request: Request, q: str = "", done: str = "") -> Response:
    if (refusal := _page_refusal(request)) is not None:
        return refusal
    query = q.strip()[:128]
    try:
        every = await _store(request).list()
    except ApiError as exc:
        return _html(pages.problem("Devices", exc.message), exc.status_code)
    needle = query.lower()
    matching = sorted(
        (
            device
            for device in every
            if not needle
            or any(needle in (value or "").lower() for value in (device.id, device.imei, device.ip))
        ),
        key=lambda device: device.id,
    )
    shown = matching[:LIST_LIMIT]
    presence = await _presences(request, [device.id for device in shown])
    body = pages.devices(
        [(device, presence.get(device.id)) for device in shown],
        query=query,
        total=len(every),
        more=len(matching) - len(shown),
        message=_DONE.get(done),
    )
    return _html(body)


@router.post("/devices")
async def register(request: Request) -> Response:
    if (refusal := _write_refusal(request)) is not None:
        return refusal
    try:
        fields = await _form(request)
        wanted = {
            name: fields[name]
            for name in ("id", "iccid", "ip", "imei", "status")
            if fields.get(name)
        }
        created = await create_device(DeviceCreate.model_validate(wanted), _store(request))
    except _REFUSED as exc:
        return await _list_with_error(request, *_refusal(exc, "Not registered"))
    log.info("console: device %s registered", created.id)
    return _done(created.id, "registered")


async def _list_with_error(request: Request, message: str, status: int) -> Response:
    try:
        every = await _store(request).list()
    except ApiError:
        every = []
    shown = sorted(every, key=lambda device: device.id)[:LIST_LIMIT]
    body = pages.devices(
        [(device, None) for device in shown],
        query="",
        total=len(every),
        more=len(every) - len(shown),
        message=message,
        error=True,
    )
    return _html(body, status)


@router.get("/devices/{device_id}")
async def device(request: Request, device_id: DevicePath, done: str = "") -> Response:
    if (refusal := _page_refusal(request)) is not None:
        return refusal
    return await _device_page(request, device_id, message=_DONE.get(done))


# --- PSK operations (api/routes/credentials.py) ---------------------------------------------


@router.post("/devices/{device_id}/psk")
async def set_psk(request: Request, device_id: DevicePath) -> Response:
    if (refusal := _write_refusal(request)) is not None:
        return refusal
    try:
        fields = await _form(request)
        body = PskIn(psk=fields.get("psk", ""), format=fields.get("format", "plain"))  # type: ignore[arg-type]
        await put_psk(device_id, body, _store(request))
    except _REFUSED as exc:
        return await _refused(request, device_id, exc, "PSK not set")
    return _done(device_id, "psk-set")


@router.post("/devices/{device_id}/psk/revoke")
async def revoke_psk(request: Request, device_id: DevicePath) -> Response:
    if (refusal := _write_refusal(request)) is not None:
        return refusal
    try:
        await delete_psk(device_id, _store(request))
    except ApiError as exc:
        return await _refused(request, device_id, exc, "PSK not revoked")
    return _done(device_id, "psk-revoked")


@router.post("/devices/{device_id}/credentials")
async def generate_psk(request: Request, device_id: DevicePath) -> Response:
    if (refusal := _write_refusal(request)) is not None:
        return refusal
    try:
        fields = await _form(request)
        body = CredentialsRequest(
            auth_type="psk",
            key_format=fields.get("key_format", "alnum16"),  # type: ignore[arg-type]
        )
        issued = await create_credentials(
            device_id, body, _store(request), _settings(request), Response()
        )
    except _REFUSED as exc:
        return await _refused(request, device_id, exc, "No PSK generated")
    # Answered here, not redirected: this page is the only place the key is ever shown.
    return await _device_page(
        request,
        device_id,
        message="A new PSK was generated; the previous key no longer works.",
        issued_key=issued.psk_key,
        status=201,
    )


# --- location (api/routes/location.py) ------------------------------------------------------


@router.post("/devices/{device_id}/location")
async def set_location(request: Request, device_id: DevicePath) -> Response:
    if (refusal := _write_refusal(request)) is not None:
        return refusal
    if SIM_IDENTITY not in _settings(request).profiles:
        return await _device_page(
            request, device_id, message="Locations are set for the SIM profile only "
            "(docs/PROFILES.md).", error=True, status=404,
        )  # fmt: skip
    try:
        fields = await _form(request)
        sample = fields.get("sample_time", "")
        if sample and not sample.isdigit():
            raise FormError(422, "sample time must be whole unix seconds")
        body = LocationIn(
            longitude=fields.get("longitude", ""),  # type: ignore[arg-type]
            latitude=fields.get("latitude", ""),  # type: ignore[arg-type]
            source=fields.get("source", ""),
            sample_time=int(sample[:12]) if sample else int(time.time()),
        )
        update = await put_location(device_id, body, _store(request), datetime.now(UTC))
    except _REFUSED as exc:
        return await _refused(request, device_id, exc, "Location not saved")
    if not update.stored:
        return await _device_page(request, device_id, message=update.detail, error=True)
    return _done(device_id, "located")


# --- send as device (api/routes/ingest.py) --------------------------------------------------


def _peer(request: Request) -> tuple[str, int]:
    client = request.client
    return (client.host, client.port) if client is not None else ("0.0.0.0", 0)


def _payload(fields: Mapping[str, str], limit: int) -> bytes:
    text = fields.get("payload", "")
    if fields.get("encoding", "text") == "hex":
        digits = "".join(text.split()).removeprefix("0x")
        try:
            payload = bytes.fromhex(digits)
        except ValueError as exc:
            raise FormError(422, "hex payload: pairs of hex digits, spaces allowed") from exc
    else:
        payload = text.encode()
    if len(payload) > limit:
        raise FormError(
            PayloadTooLarge.status_code, f"payload is {len(payload)} bytes, at most {limit}"
        )
    return payload


@router.post("/devices/{device_id}/send")
async def send_as_device(request: Request, device_id: DevicePath) -> Response:
    """The message goes where the device's own would: its default topic, its template, the
    user properties of /ingest with the browser's address as ``source``, exactly-once
    publishing (``publish_once``). Presence is not touched: the device did not speak."""
    if (refusal := _write_refusal(request)) is not None:
        return refusal
    settings = _settings(request)
    state: Any = request.app.state
    received_at = time.time_ns() // 1_000_000
    try:
        fields = await _form(request)
        device: Device | None = await _store(request).get(device_id)
        if device is None:
            return _html(pages.problem("Device", f"No device {device_id}."), 404)
        if not device.is_active:
            raise FormError(409, "the device is inactive: its messages are refused (4.01)")
        payload = _payload(fields, settings.max_payload)
        content_type = fields.get("content_type") or "application/octet-stream"
        number = content_format_for(content_type)
        if number is None:
            raise FormError(415, "that content type has no CoAP Content-Format")
        ip, port = _peer(request)
        properties = message_properties(device, ip, port, str(number), received_at)
        topic = default_topic(settings, device)
        located = None
        template = await template_of(state.templates, device)
        if template is not None:
            assert device.template is not None
            payload, properties, located = translate(
                template, device.template, payload, properties, received_at
            )
        await publish_once(request, state.idempotency, state.publisher, topic, payload, properties)
        if located is not None:
            await store_location(_store(request), device.id, located)
    except (FormError, ApiError) as exc:  # BrokerUnavailable (no PUBACK) is an ApiError
        return await _refused(request, device_id, exc, "Not published")
    log.info("console: test message published as device %s topic=%s", device_id, topic)
    return _done(device_id, "sent")


# --- live view (api/console/live.py) --------------------------------------------------------


def live_hub(request: Request) -> LiveHub:
    """This process's hub, made on first use (a test may put its own in ``app.state``)."""
    hub: LiveHub | None = getattr(request.app.state, "console_live", None)
    if hub is None:
        hub = LiveHub(_settings(request))
        request.app.state.console_live = hub
    return hub


@router.get("/live")
async def live_page(request: Request) -> Response:
    if (refusal := _page_refusal(request)) is not None:
        return refusal
    return _html(pages.live())


@router.get("/live/events")
async def live_events(request: Request) -> Response:
    if _settings(request).api_key is None or not _signed_in(request):
        return PlainTextResponse("sign in at /console/login first", status_code=401)
    hub = live_hub(request)
    try:
        await hub.ensure_subscribed(request.app.state.publisher)
        viewer = hub.join()
    except LiveUnavailable as exc:
        return PlainTextResponse(str(exc), status_code=503, headers={"Retry-After": "5"})
    return StreamingResponse(
        hub.stream(viewer),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # Runs also when the client left before the stream began: the slot is given back.
        background=BackgroundTask(hub.leave, viewer),
    )


# --- static files ---------------------------------------------------------------------------

_loaded: dict[str, bytes] = {}


@router.get("/static/{name}")
async def static(name: str) -> Response:
    media = _STATIC.get(name)
    if media is None:
        return PlainTextResponse("no such console file", status_code=404)
    if name not in _loaded:
        _loaded[name] = resources.files("api.console").joinpath("static", name).read_bytes()
    return Response(
        _loaded[name],
        media_type=media,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
