"""``POST /ingest``: telemetry from a device, via the proxy, to MQTT (docs/CONTRACT.md §9, §11).

Two things happen here to every device message, on every path (``/ingest``, ``/ingest/batch``,
the batch's fast path, and the telemetry routes of the other profiles through
:func:`publish_once`):

- a SIM-profile device with a payload template (api/routes/templates.py) has its payload
  translated to JSON before it is published (:func:`translate`); a payload the template cannot
  read is a 400 (→ 4.00) and nothing is published;
- with ``mqtt_metadata = "envelope"`` the payload is wrapped with its metadata
  (policies/envelope.py) in :func:`publish_claimed`, the one place every device message passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from api.admission import Admission
from api.deps import (
    AdmissionDep,
    IdempotencyDep,
    PublisherDep,
    SettingsDep,
    StoreDep,
    require_proxy,
)
from api.errors import (
    ApiError,
    BadBatch,
    BadForwarded,
    BatchVersionMismatch,
    BrokerUnavailable,
    DeviceUnauthorized,
    InvalidTopic,
    PayloadTooLarge,
    UntranslatablePayload,
)
from api.idempotency import claim_keys, settle_keys
from api.identity import calling_device
from api.publisher import Publisher
from api.routes.templates import TemplateBook, TemplatesDep, location_changes, store_location
from api.safe_json import SafeJsonRoute
from api.settings import ApiSettings
from api.store.base import Device, DeviceStore
from policies.batch import (
    BATCH_CONTENT_TYPE,
    BatchFormatError,
    BatchItem,
    decode_batch,
    encode_statuses,
)
from policies.envelope import JSON_CONTENT_FORMAT, TEMPLATE_PROPERTY, wrap
from policies.forwarding import (
    IDEMPOTENCY_HEADER,
    TIMEOUT_HEADER,
    Origin,
    backend_budget,
    parse_timeout,
)
from policies.media import content_format_for
from policies.templates import PayloadError, Template
from policies.topics import TopicError, render_topic, validate_topic
from stores.ledger import Claim, Ledger, Outcome

log = logging.getLogger(__name__)

router = APIRouter(tags=["ingest"], route_class=SafeJsonRoute)


def _error_responses(*errors: type[ApiError]) -> dict[int | str, dict[str, str]]:
    return {error.status_code: {"description": error.default_message} for error in errors}


def _message(
    settings: ApiSettings,
    device: Device,
    origin: Origin,
    topics: list[str],
    content_type: str | None,
    received_at: int,
) -> tuple[str, dict[str, str]]:
    """Topic and MQTT user properties for one accepted device message."""
    if len(topics) > 1:
        raise InvalidTopic("query 't' given more than once")
    try:
        topic = validate_topic(topics[0]) if topics else default_topic(settings, device)
    except TopicError as exc:
        raise InvalidTopic(str(exc)) from exc
    content_format: str | None = None
    if content_type:
        number = content_format_for(content_type)
        content_format = str(number) if number is not None else content_type
    return topic, message_properties(device, origin.ip, origin.port, content_format, received_at)


def default_topic(settings: ApiSettings, device: Device) -> str:
    """The topic of a message that names none: the template with the device's id and ICCID."""
    return render_topic(settings.topic_template, device=device.id, iccid=device.iccid)


def message_properties(
    device: Device, ip: str, port: int, content_format: str | None, received_at: int
) -> dict[str, str]:
    """The MQTT user properties of an accepted message (docs/CONTRACT.md §9), in this order.
    ``iccid`` for a SIM, as always; ``device`` (the id, a SIM's being its ICCID) for every
    device, so a consumer of several profiles reads one property."""
    host = f"[{ip}]" if ":" in ip else ip
    properties = {"iccid": device.iccid} if device.iccid is not None else {}
    properties["device"] = device.id
    properties["source"] = f"{host}:{port}"
    if content_format is not None:
        properties["content-format"] = content_format
    properties["received-at"] = str(received_at)
    return properties


Located = dict[str, object]
"""The device fields a translated position sets (api/routes/templates.py location_changes)."""


def translate(
    template: Template,
    template_id: str,
    payload: bytes,
    properties: Mapping[str, str],
    received_at: int,
) -> tuple[bytes, dict[str, str], Located | None]:
    """A device message translated by its template: the compact JSON to publish, its user
    properties (``content-format`` 50, ``template`` the id), and the position to store once
    it is published, if the template has location fields. :class:`PayloadError` → 400."""
    try:
        text, latitude, longitude = template.translate_json(payload)
        body = text.encode()
    except (PayloadError, ValueError) as exc:
        raise UntranslatablePayload(f"payload does not fit template {template_id}: {exc}") from exc
    translated = {
        **properties,
        "content-format": JSON_CONTENT_FORMAT,
        TEMPLATE_PROPERTY: template_id,
    }
    located: Located | None = None
    if latitude is not None or longitude is not None:
        located = location_changes(latitude, longitude, received_at // 1000)
        if located is None:
            log.info(
                "template %s gave no usable position (%r, %r): location left as it is",
                template_id,
                latitude,
                longitude,
            )
    return body, translated, located


async def template_of(templates: TemplateBook, device: Device) -> Template | None:
    """The device's compiled template; None for a device without one, or (logged) one whose
    template is gone, which cannot happen through the API (a template in use is not
    deleted): its messages are published as they come rather than lost."""
    if device.template is None:
        return None
    template = await templates.compiled(device.template)
    if template is None:
        log.warning(
            "device %s names template %s, which does not exist: published untranslated",
            device.id,
            device.template,
        )
    return template


async def store_locations(store: DeviceStore, located: list[tuple[str, Located]]) -> None:
    """The positions of published, translated messages (errors are logged, not raised)."""
    if len(located) == 1:
        await store_location(store, *located[0])
    elif located:
        await asyncio.gather(*(store_location(store, device, fields) for device, fields in located))


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"payload is {declared} bytes, at most {limit}")
    body = bytearray()
    # Counted while streaming as well: a chunked body declares no length.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"payload is more than {limit} bytes")
    return bytes(body)


@router.post(
    "/ingest",
    status_code=204,
    summary="Publish one device message to MQTT",
    description=(
        "Called by the coap-bridge proxy with the device's address in `Forwarded` (and, over "
        "DTLS, its PSK identity). Answers 204 only after the broker's PUBACK (QoS 1); the body "
        "is published byte-exact, or, for a device with a payload template, as the JSON the "
        "template makes of it (400 when the payload does not fit the template)."
    ),
    dependencies=[Depends(require_proxy)],
    responses=_error_responses(
        BadForwarded,
        DeviceUnauthorized,
        InvalidTopic,
        UntranslatablePayload,
        PayloadTooLarge,
        BrokerUnavailable,
    )
    | {403: {"description": "missing or invalid proxy token"}},
)
async def ingest(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    publisher: PublisherDep,
    idempotency: IdempotencyDep,
    templates: TemplatesDep,
    t: Annotated[
        str | None,
        Query(description="MQTT topic: 1-253 of [A-Za-z0-9_/], no '//'"),
    ] = None,
) -> Response:
    received_at = time.time_ns() // 1_000_000
    device, origin = await calling_device(request, store)
    topic, properties = _message(
        settings,
        device,
        origin,
        request.query_params.getlist("t"),
        request.headers.get("content-type"),
        received_at,
    )
    payload = await read_body(request, settings.max_payload)
    located: Located | None = None
    template = await template_of(templates, device)
    if template is not None:
        assert device.template is not None
        payload, properties, located = translate(
            template, device.template, payload, properties, received_at
        )
    status = await publish_once(request, idempotency, publisher, topic, payload, properties)
    if located is not None and status == 204:
        await store_location(store, device.id, located)
    return Response(status_code=status)


Outgoing = tuple[str | None, str, bytes, dict[str, str]]  # idempotency key, topic, payload, props


async def publish_once(
    request: Request,
    idempotency: Ledger,
    publisher: Publisher,
    topic: str,
    payload: bytes,
    properties: dict[str, str],
) -> int:
    """One device message to MQTT, exactly once per the proxy's Idempotency-Key across
    replicas (docs/CONTRACT.md §11). Returns /ingest's status once the broker acknowledged it
    (204), or the status recorded for an earlier request with the same key;
    :class:`BrokerUnavailable` (503) when it could not be published, or another replica is
    publishing it right now. Every single-message telemetry route of every profile publishes
    through here."""
    key = request.headers.get(IDEMPOTENCY_HEADER) or None
    claims: list[Outcome | None] = list(await claim_keys(idempotency, [key])) if key else [None]
    settings: ApiSettings = request.app.state.settings
    [status], answered, released = await publish_claimed(
        publisher,
        [(key, topic, payload, properties)],
        claims,
        publish_budget(request.headers.get(TIMEOUT_HEADER)),
        envelope=settings.mqtt_metadata == "envelope",
    )
    settle_keys(idempotency, answered, released)
    if status == 503:
        raise BrokerUnavailable()
    return status


def publish_budget(proxy_timeout: str | bytes | None) -> float | None:
    """How long a publish may wait, from the caller's :data:`TIMEOUT_HEADER`: short enough that
    our 503 reaches the proxy before it gives up with 5.04 (policies.forwarding.backend_budget);
    None (the publisher's own limit) when the header is absent or not a number."""
    seconds = parse_timeout(proxy_timeout)
    return None if seconds is None else backend_budget(seconds)


async def publish_claimed(
    publisher: Publisher,
    messages: list[Outgoing],
    claims: list[Outcome | None],
    within: float | None = None,
    *,
    envelope: bool = False,
) -> tuple[list[int], list[tuple[str, bytes]], list[str]]:
    """Publish each message whose Idempotency-Key claim is ours (or that has no key), waiting
    at most ``within`` seconds (see :func:`publish_budget`). Every device message of every
    route passes here: with ``envelope`` (``mqtt_metadata = "envelope"``) its payload is
    wrapped with its metadata (policies/envelope.py), the user properties still sent.

    Returns the HTTP status of each message, in order, and what to record afterwards: the
    answered keys and the keys to release (their publish failed: the retry must go ahead). A
    key answered before gets that answer again without a publish; a key some other request is
    publishing right now gets 503 (the device retries, and by then the answer is recorded).
    """
    statuses = [204] * len(messages)
    sending: list[int] = []
    for n, claim in enumerate(claims):
        if isinstance(claim, bytes):
            statuses[n] = int(claim) if claim.isdigit() else 204
        elif claim is Claim.BUSY:
            statuses[n] = 503
        else:
            sending.append(n)
    if envelope:
        outgoing = [
            (messages[n][1], wrap(messages[n][2], messages[n][3]), messages[n][3]) for n in sending
        ]
    else:
        outgoing = [(messages[n][1], messages[n][2], messages[n][3]) for n in sending]
    results = await publisher.publish_many(outgoing, within=within)
    answered: list[tuple[str, bytes]] = []
    released: list[str] = []
    for n, error in zip(sending, results, strict=True):
        key = messages[n][0]
        if error is not None:
            statuses[n] = error.status_code
            if key:
                released.append(key)
        elif key:
            answered.append((key, b"204"))
    return statuses, answered, released


# The most a proxy may put in one call (its max_batch is at most this); settings.max_batch,
# the proxy's configured value, bounds the body (batch_body_limit).
MAX_BATCH_ITEMS = 1024
# Per item beyond its payload: the fixed head, address, proto, PSK identity, Idempotency-Key
# and topic (policies/batch.py); all but the topic (at most 253 bytes) are a few dozen bytes.
BATCH_ITEM_FRAMING = 1024


@router.post(
    "/ingest/batch",
    summary="Publish many device messages to MQTT in one call (group commit)",
    description=(
        "The batch form of `/ingest`, used by the proxy when many devices send at once. The "
        f"body (`{BATCH_CONTENT_TYPE}`) is a sequence of items, each carrying what the single "
        "form carries in headers and query, as typed fields the proxy has already checked (see "
        "`policies/batch.py`). The answer lists one HTTP status per item, in order: 204 "
        "(published, PUBACK received), 401, 413 or 503, exactly as `/ingest` would have "
        "answered that item alone."
    ),
    dependencies=[Depends(require_proxy)],
    responses={
        200: {
            "description": "one status per item",
            "content": {"application/json": {"example": {"statuses": [204, 401, 204]}}},
        },
        400: {"description": "the body is not a valid batch"},
        403: {"description": "missing or invalid proxy token"},
        413: {"description": "the body is larger than max_batch items of max_payload"},
        415: {"description": "the body is not in this backend's batch layout (Content-Type)"},
    },
)
async def ingest_batch(
    request: Request,
    settings: SettingsDep,
    admission: AdmissionDep,
    publisher: PublisherDep,
    idempotency: IdempotencyDep,
    templates: TemplatesDep,
    store: StoreDep,
) -> Response:
    given = request.headers.get("content-type", "")
    if given != BATCH_CONTENT_TYPE:
        raise BatchVersionMismatch(
            f"batch content type {given[:64]!r}, this backend reads {BATCH_CONTENT_TYPE!r}: "
            "run proxy and API of the same release"
        )
    body = await read_body(request, batch_body_limit(settings))
    return await answer_batch(
        body,
        settings,
        admission,
        publisher,
        idempotency,
        publish_budget(request.headers.get(TIMEOUT_HEADER)),
        templates=templates,
        store=store,
    )


def batch_body_limit(settings: ApiSettings) -> int:
    """The largest batch the proxy can send: ``max_batch`` items of ``max_payload`` each."""
    return (settings.max_payload + BATCH_ITEM_FRAMING) * settings.max_batch


async def answer_batch(
    body: bytes,
    settings: ApiSettings,
    admission: Admission,
    publisher: Publisher,
    idempotency: Ledger,
    within: float | None = None,
    *,
    templates: TemplateBook,
    store: DeviceStore,
) -> Response:
    """The whole of ``POST /ingest/batch`` once the caller is known to be the proxy and the
    body is read: the route above and the fast path (api/fast_path.py) both end here.
    ``within``: the publish budget (:func:`publish_budget`); ``templates``: the payload
    templates of the devices that have one; ``store``: where their positions go."""
    received_at = time.time_ns() // 1_000_000
    try:
        items = decode_batch(body)
    except BatchFormatError as exc:
        raise BadBatch(str(exc)) from exc
    if len(items) > MAX_BATCH_ITEMS:
        raise BadBatch(f"{len(items)} items in one batch, at most {MAX_BATCH_ITEMS}")
    statuses = [204] * len(items)
    keyed = [n for n, item in enumerate(items) if item.idempotency_key]
    # Who sent each item, and its Idempotency-Key claim: one question (api/admission.py).
    devices, claimed_in_order = await _admit(admission, items, keyed)
    claimed: dict[int, Outcome] = dict(zip(keyed, claimed_in_order, strict=True))
    compiled = await _templates(templates, devices.values())
    outgoing: list[Outgoing] = []
    positions: list[int] = []
    located: dict[int, tuple[str, Located]] = {}
    # The item's fields are used as they come: the proxy checked the topic and wrote the
    # address canonically (policies/batch.py); only what the backend decides is decided here.
    for index, item in enumerate(items):
        device = devices[(item.identity, "") if item.identity else ("", item.ip)]
        if isinstance(device, ApiError):
            statuses[index] = device.status_code
            continue
        if len(item.payload) > settings.max_payload:
            statuses[index] = PayloadTooLarge.status_code
            continue
        topic = item.topic or default_topic(settings, device)
        content_format = item.content_format
        properties = message_properties(
            device,
            item.ip,
            item.port,
            None if content_format is None else str(content_format),
            received_at,
        )
        payload = item.payload
        if device.template is not None:
            template = compiled.get(device.template)
            if isinstance(template, ApiError):
                statuses[index] = template.status_code
                continue
            if template is not None:
                try:
                    payload, properties, position = translate(
                        template, device.template, payload, properties, received_at
                    )
                except UntranslatablePayload as exc:
                    statuses[index] = exc.status_code
                    continue
                if position is not None:
                    located[len(positions)] = (device.id, position)
        outgoing.append((item.idempotency_key or None, topic, payload, properties))
        positions.append(index)
    claims = [claimed.get(index) for index in positions]
    sent, answered, released = await publish_claimed(
        publisher, outgoing, claims, within, envelope=settings.mqtt_metadata == "envelope"
    )
    # Refused items took a claim too: give it back, or their retry would wait for the lease.
    accepted = set(positions)
    released += [
        items[n].idempotency_key
        for n in keyed
        if n not in accepted and claimed.get(n) is Claim.OWNED
    ]
    retry_after = False
    for index, status in zip(positions, sent, strict=True):
        statuses[index] = status
        retry_after = retry_after or status == 503
    headers = {"Retry-After": "1"} if retry_after else None
    # Queued, written with the next claim: a duplicate arriving before that finds the claim and
    # gets 503, so it is retried, never published twice.
    settle_keys(idempotency, answered, released)
    if located:
        # Positions once their messages are published (a failed write is only logged).
        await store_locations(
            store, [position for n, position in located.items() if sent[n] == 204]
        )
    return Response(encode_statuses(statuses), media_type="application/json", headers=headers)


async def _templates(
    templates: TemplateBook, devices: Iterable[Device | ApiError]
) -> dict[str, Template | ApiError | None]:
    """The compiled template of each template the batch's devices name (a cache hit each,
    but the first time on a replica): None for a template that is gone (logged; the messages
    go out untranslated), an error for one that cannot be read now (those items' 503)."""
    wanted = {device.template for device in devices if isinstance(device, Device)} - {None}
    compiled: dict[str, Template | ApiError | None] = {}
    for template_id in wanted:
        assert template_id is not None
        try:
            compiled[template_id] = await templates.compiled(template_id)
        except ApiError as exc:
            compiled[template_id] = exc
        if compiled[template_id] is None:
            log.warning(
                "template %s does not exist: its devices' messages untranslated", template_id
            )
    return compiled


async def _admit(
    admission: Admission,
    items: list[BatchItem],
    keyed: list[int],
) -> tuple[dict[tuple[str, str], Device | ApiError], list[Outcome]]:
    """Every distinct device of a batch, by PSK identity (DTLS) or by address
    (docs/CONTRACT.md §2), keyed ``(identity, "")`` or ``("", ip)``, and the claims of the
    keyed items, in one question to the stores. Unknown or non-active → 401; a failed lookup
    is every item's 503; failed claims raise StoreUnavailable (the whole batch 503)."""
    identities = sorted({item.identity for item in items if item.identity})
    ips = sorted({item.ip for item in items if not item.identity})
    keys = [(identity, "") for identity in identities] + [("", ip) for ip in ips]
    admitted = await admission.admit(identities, ips, [items[n].idempotency_key for n in keyed])
    if admitted.lookup_error is not None:
        return dict.fromkeys(keys, admitted.lookup_error), admitted.claims
    found: dict[tuple[str, str], Device | ApiError] = {}
    for key, device in zip(keys, [*admitted.by_identity, *admitted.by_ip], strict=True):
        found[key] = device if device is not None and device.is_active else DeviceUnauthorized()
    return found, admitted.claims
