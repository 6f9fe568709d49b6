"""Downlink commands (issue 15): the service behind the HTTP routes (api/routes/commands.py)
and the MQTT intake (api/command_intake.py).

A command waits in its device's queue (stores/queue.py) until the device acknowledges it. The
proxy reads the head for the device (``GET /commands/{iccid}``: the head becomes *sent*) and,
once the device ACKed the CON notification carrying it, confirms it (``DELETE`` with
``If-Match``: *delivered*). Whenever the head changes — a command queued into an empty queue, a
delivery, the head's expiry — the change is announced on the change feed (api/feed.py), so the
proxies holding an Observe relation on ``/commands/{iccid}`` fetch the new head.

Every state a command reaches after *queued* (sent, delivered, expired) is published to
``<command topic>/<id>/status`` (QoS 1, ``{"id", "state", "at"}``) by one background worker,
in the order the states were reached, so a slow broker never holds a device's request; a
status the broker does not take within :data:`STATUS_GIVE_UP` seconds is dropped with a
warning (the listing, ``GET /devices/{iccid}/commands``, still shows it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar

from api.errors import (
    ApiError,
    DeviceNotFound,
    InvalidField,
    PayloadTooLarge,
    StoreUnavailable,
    clip,
)
from api.feed import ChangeFeed
from api.publisher import Publisher
from api.settings import MAX_COMMAND_TTL, ApiSettings
from api.store.base import DeviceStore
from policies.media import content_type_for
from stores.queue import Command, CommandQueue, Outcome, QueueUnavailable

__all__ = [
    "BadCommand",
    "Command",
    "CommandDeviceNotFound",
    "CommandForbidden",
    "CommandNotHead",
    "CommandQueueFull",
    "CommandRejected",
    "CommandTooLarge",
    "Commands",
    "PreconditionRequired",
    "StatusWorker",
    "command_path",
]

log = logging.getLogger(__name__)

STATUS_GIVE_UP = 60.0
"""Seconds a status may wait for the broker before it is dropped."""
STATUS_BACKLOG = 100_000
"""Statuses waiting at most; beyond, the oldest go (a broker down for long)."""
_STATUS_BATCH = 256
_ID_DRAWS = 4


def _same_time(a: float, b: float) -> bool:
    return round(a * 1000) == round(b * 1000)  # the queue keeps milliseconds


# --- errors ---------------------------------------------------------------------------------


class CommandRejected(ApiError):
    """A command that cannot be queued, for a reason the submitter must fix: retrying the
    same submission gets the same answer (the MQTT intake drops it and counts it)."""


class CommandDeviceNotFound(CommandRejected, DeviceNotFound):
    """404: no device has this iccid."""


class CommandTooLarge(CommandRejected, PayloadTooLarge):
    """413: the payload is larger than ``max_payload``, more than any device is sent."""


class CommandQueueFull(CommandRejected):
    status_code = 409
    default_message = "the device's command queue is full"


class BadCommand(CommandRejected, InvalidField):
    """422: a field the schema admits but the rules do not (content format, ttl, base64)."""

    default_message = "invalid command"

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field

    def body(self) -> object:
        loc = ["body", self.field]
        return {"detail": [{"loc": loc, "msg": self.message, "type": "value_error"}]}


class CommandForbidden(ApiError):
    """The calling device is not the one whose commands it asks for: 4.03."""

    status_code = 403
    default_message = "a device may only read and acknowledge its own commands"


class CommandNotHead(ApiError):
    """412: the acknowledged command is not the head (delivered already, expired, unknown)."""

    status_code = 412
    default_message = "If-Match does not name the command at the head of the queue"


class PreconditionRequired(ApiError):
    """428 (RFC 6585 §3): an acknowledgement must say which command it acknowledges."""

    status_code = 428
    default_message = 'If-Match: "<command id>" is required'


# --- the service ----------------------------------------------------------------------------


def command_path(iccid: str) -> str:
    """The origin path of a device's commands: what the default policy's route target
    ``/commands/{device}`` expands to, and what the change feed names."""
    return f"/commands/{iccid}"


def new_command_id() -> str:
    """40 random bits as 8 characters of lower-case base32: the ETag fits a CoAP ETag option
    as it is (1–8 bytes, RFC 7252 §5.10.6), and the id is a valid topic level. Unique per
    device is all it needs to be (a clash is detected at the push and drawn again)."""
    return base64.b32encode(secrets.token_bytes(5)).decode().lower()


class StatusWorker:
    """Publishes status messages in order, in batches, off the request path."""

    def __init__(self, publisher: Callable[[], Publisher | None]) -> None:
        self._publisher = publisher
        self._waiting: deque[tuple[float, str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0

    def put(self, topic: str, payload: bytes) -> None:
        if len(self._waiting) >= STATUS_BACKLOG:
            self._waiting.popleft()
            self.dropped += 1
        self._waiting.append((time.monotonic(), topic, payload))
        self._drained.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="status-worker")

    @property
    def idle(self) -> bool:
        return not self._waiting

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                now = time.monotonic()
                while self._waiting and now - self._waiting[0][0] > STATUS_GIVE_UP:
                    _, topic, _ = self._waiting.popleft()
                    self.dropped += 1
                    log.warning(
                        "command status to %s dropped: no broker for %gs", topic, STATUS_GIVE_UP
                    )
                batch = [self._waiting[i] for i in range(min(_STATUS_BATCH, len(self._waiting)))]
                if not batch:
                    break
                publisher = self._publisher()
                if publisher is None:
                    outcomes: list[object] = ["no publisher"] * len(batch)
                else:
                    outcomes = list(await publisher.publish_many([(t, p, {}) for _, t, p in batch]))
                # Those before the first failure are done; the rest wait, in order.
                done = next((i for i, o in enumerate(outcomes) if o is not None), len(batch))
                for _ in range(done):
                    self._waiting.popleft()
                self.published += done
                if done < len(batch):
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                else:
                    backoff = 0.1
            self._drained.set()

    async def flush(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until every status has gone out."""
        if self._task is None or self._task.done():
            return  # nothing is publishing them (there is no loop running this worker)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), within)

    async def close(self, within: float = 2.0) -> None:
        await self.flush(within)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Commands:
    """The commands of every device: ``app.state.commands``.

    ``store`` and ``publisher`` are read at each call (they are ``app.state``'s, which the
    lifespan may build after this object). ``clock`` gives unix seconds; tests move it.
    """

    statuses: ClassVar[tuple[str, ...]] = ("sent", "delivered", "expired")

    def __init__(
        self,
        settings: ApiSettings,
        queue: CommandQueue,
        changes: ChangeFeed,
        *,
        store: Callable[[], DeviceStore | None],
        publisher: Callable[[], Publisher | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self.queue = queue
        self.changes = changes
        self._store = store
        self.status = StatusWorker(publisher)
        self.clock = clock

    async def _queue(self, call: Awaitable[Outcome]) -> Outcome:
        try:
            return await call
        except QueueUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _device_exists(self, iccid: str) -> None:
        store = self._store()
        if store is None or await store.get(iccid) is None:
            raise CommandDeviceNotFound(f"device {clip(iccid)} not found")

    def _publish(self, command: Command, state: str, at: float) -> None:
        body = {"id": command.id, "state": state, "at": round(at, 3)}
        topic = self._settings.command_status_topic(command.iccid, command.id)
        self.status.put(topic, json.dumps(body, separators=(",", ":")).encode())

    async def _settle(self, iccid: str, outcome: Outcome, extra: Iterable[Command] = ()) -> None:
        """What every operation owes after it ran: statuses, and the announcement when the
        head changed."""
        for command in outcome.expired:
            self._publish(command, "expired", command.expires_at)
        for command in extra:
            at = command.delivered_at if command.state == "delivered" else command.sent_at
            self._publish(command, command.state, at or self.clock())
        if outcome.head_changed:
            await self.changes.announce(command_path(iccid))

    def check(self, payload: bytes, content_format: int, ttl: float | None) -> float:
        """The rules of a submission that need no store; the TTL to use."""
        if len(payload) > self._settings.max_payload:
            raise CommandTooLarge(
                f"payload is {len(payload)} bytes, at most {self._settings.max_payload}"
            )
        if content_type_for(content_format) is None:
            raise BadCommand(
                f"content_format {content_format} is not one this bridge translates "
                "(policies/media.py)",
                "content_format",
            )
        chosen = self._settings.command_ttl if ttl is None else ttl
        if not 1 <= chosen <= MAX_COMMAND_TTL:
            raise BadCommand(f"ttl must be 1..{MAX_COMMAND_TTL} seconds, not {chosen:g}", "ttl")
        return float(chosen)

    async def submit(
        self, iccid: str, payload: bytes, content_format: int, ttl: float | None
    ) -> Command:
        """Queue a command for ``iccid``. Raises :class:`CommandRejected` (404, 409, 413, 422)
        or :class:`~api.errors.StoreUnavailable` (503: try again)."""
        lifetime = self.check(payload, content_format, ttl)
        await self._device_exists(iccid)
        now = self.clock()
        for _ in range(_ID_DRAWS):
            command = Command(
                id=new_command_id(),
                iccid=iccid,
                payload=payload,
                content_format=content_format,
                state="queued",
                created_at=now,
                expires_at=now + lifetime,
                size=len(payload),
            )
            outcome = await self._queue(
                self.queue.push(command, limit=self._settings.max_commands_per_device, now=now)
            )
            await self._settle(iccid, outcome)
            # The queue answers a known id with its record: another command's, when the
            # random id clashed (a record made at another time).
            if outcome.command is None or _same_time(outcome.command.created_at, now):
                break
        else:
            raise StoreUnavailable("no free command id: try again")
        if outcome.command is None:
            raise CommandQueueFull(
                f"device {clip(iccid)} has {self._settings.max_commands_per_device} commands "
                "waiting already"
            )
        return outcome.command

    async def list(self, iccid: str) -> list[Command]:
        await self._device_exists(iccid)
        outcome = await self._queue(self.queue.list(iccid, now=self.clock()))
        await self._settle(iccid, outcome)
        return list(outcome.commands)

    async def head(self, iccid: str) -> Command | None:
        """The command the device is to receive now (it becomes sent), or None."""
        outcome = await self._queue(self.queue.head(iccid, now=self.clock(), mark_sent=True))
        sent = [outcome.command] if outcome.sent_now and outcome.command is not None else []
        await self._settle(iccid, outcome, sent)
        return outcome.command

    async def deliver(self, iccid: str, command_id: str) -> Command:
        """The device acknowledged ``command_id``; :class:`CommandNotHead` unless it is the
        head."""
        outcome = await self._queue(self.queue.ack(iccid, command_id, now=self.clock()))
        delivered = [outcome.command] if outcome.command is not None else []
        await self._settle(iccid, outcome, delivered)
        if outcome.command is None:
            raise CommandNotHead()
        return outcome.command

    async def close(self) -> None:
        await self.status.close()
        await self.queue.close()
