"""Commands from MQTT: a PUBLISH on ``devices/{iccid}/commands`` queues a command (issue 15).

An MQTT application reaches devices without HTTP (docs/API.md, commands): the API subscribes
at QoS 1 to the command topic template with ``{iccid}`` as ``+`` (default
``devices/+/commands``) and turns each message into ``Commands.submit(iccid, payload,
content_format, ttl)``:

- payload: the message's bytes as they are;
- content format: from the MQTT 5 *content-type* property (a media type of the CoAP registry,
  policies/media.py), else 42 (application/octet-stream);
- TTL: the *message-expiry-interval* the broker passed on (the time left, MQTT 5 §3.3.2.3.3),
  capped at the API's longest TTL; absent → the API's default.

What cannot become a command (an iccid that is not 19–20 digits, an unknown device, an
unregistered content type, a payload too large, a full queue, a retained message) is logged,
counted in :attr:`CommandIntake.dropped` by reason, and taken from the broker (PUBACK): sending
it again would not change the answer, and an exception must never end the MQTT link that
``/ingest`` shares. Only a failure that may pass (the store unreachable, a 5xx) is raised, so
the link does not acknowledge and the broker sends the message again (api/mqtt_link.py).

A retained message is refused because the broker would hand it out again with each new
subscription (MQTT 3.1.1 §3.3.1.3): the command would be queued once per reconnect.

The delivery status topic ``devices/{iccid}/commands/{id}/status`` is two levels deeper than
the filter and ``+`` matches one level only (MQTT 5 §4.7.1.3), so the API never receives its
own status messages.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from api.errors import ApiError
from api.mqtt_link import check_filter
from api.settings import DEFAULT_COMMAND_TOPIC, MAX_COMMAND_TTL
from policies.media import content_format_for

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_COMMAND_TOPIC", "MAX_TTL", "CommandIntake", "command_filter"]

OCTET_STREAM = 42
MAX_TTL = MAX_COMMAND_TTL
"""The longest command TTL the API accepts (30 days); a longer expiry is capped to it."""

_ICCID = re.compile(r"[0-9]{19,20}")
_PLACEHOLDER = "{iccid}"


class Submitter(Protocol):
    """What the intake needs of ``api.commands.Commands``."""

    async def submit(
        self, iccid: str, payload: bytes, content_format: int, ttl: float | None
    ) -> object: ...


class Subscriber(Protocol):
    """What the intake needs of the publisher (api/publisher.py)."""

    async def subscribe(
        self,
        topic_filter: str,
        on_message: Callable[[str, bytes, dict[str, object]], Awaitable[None]],
    ) -> None: ...


def command_filter(template: str, share_group: str | None = None) -> str:
    """The subscription filter for a command topic template: ``{iccid}`` becomes ``+``.

    The template must hold ``{iccid}`` exactly once, as a whole level, and no wildcard; a
    ``share_group`` prefixes ``$share/<group>/`` (MQTT 5 §4.8.2: one replica of a group gets
    each message). ValueError otherwise.
    """
    levels = template.split("/")
    if levels.count(_PLACEHOLDER) != 1 or template.count("{") != 1 or template.count("}") != 1:
        raise ValueError(f"command topic {template!r} must hold {{iccid}} once, as a whole level")
    if "+" in template or "#" in template or template.startswith("$"):
        raise ValueError(f"command topic {template!r} must not hold wildcards or start with $")
    topic_filter = "/".join("+" if level == _PLACEHOLDER else level for level in levels)
    if share_group is not None:
        if not share_group or any(c in share_group for c in "/+#"):
            raise ValueError(f"share group {share_group!r} must be non-empty without / + #")
        topic_filter = f"$share/{share_group}/{topic_filter}"
    check_filter(topic_filter)
    return topic_filter


class CommandIntake:
    """The ``on_message`` hook that queues commands; see the module docstring.

    ``commands`` is the Commands service, or a callable returning it (when it is built after
    the intake). :meth:`start` subscribes through the publisher.
    """

    def __init__(
        self,
        commands: Submitter | Callable[[], Submitter],
        template: str = DEFAULT_COMMAND_TOPIC,
        *,
        share_group: str | None = None,
    ) -> None:
        self._commands = commands
        self.topic_filter = command_filter(template, share_group)
        levels = template.split("/")
        self._levels = levels
        self._iccid_level = levels.index(_PLACEHOLDER)
        self.accepted = 0
        self.dropped: Counter[str] = Counter()

    async def start(self, subscriber: Subscriber) -> None:
        await subscriber.subscribe(self.topic_filter, self.on_message)

    def iccid_of(self, topic: str) -> str | None:
        """The topic's ``{iccid}`` level, or None when the topic is not a command topic."""
        levels = topic.split("/")
        if len(levels) != len(self._levels):
            return None
        for index, (level, wanted) in enumerate(zip(levels, self._levels, strict=True)):
            if index != self._iccid_level and level != wanted:
                return None
        return levels[self._iccid_level]

    def _service(self) -> Submitter:
        commands = self._commands
        if hasattr(commands, "submit"):
            return commands
        return commands()

    def _drop(self, reason: str, topic: str, detail: str) -> None:
        self.dropped[reason] += 1
        log.warning("mqtt command dropped reason=%s topic=%s: %s", reason, topic[:200], detail)

    async def on_message(
        self, topic: str, payload: bytes, properties: Mapping[str, object]
    ) -> None:
        iccid = self.iccid_of(topic)
        if iccid is None:
            self._drop("topic", topic, f"not a command topic ({self.topic_filter})")
            return
        if _ICCID.fullmatch(iccid) is None:
            self._drop("iccid", topic, "the iccid level must be 19 or 20 digits")
            return
        if properties.get("retain"):
            self._drop("retained", topic, "retained messages are not commands")
            return
        content_format = OCTET_STREAM
        content_type = properties.get("content_type")
        if isinstance(content_type, str):
            found = content_format_for(content_type)
            if found is None:
                self._drop("content_type", topic, f"unregistered content type {content_type!r}")
                return
            content_format = found
        ttl: float | None = None
        expiry = properties.get("message_expiry_interval")
        if isinstance(expiry, int):
            if expiry < 1:
                self._drop("expired", topic, "message expiry interval left is 0")
                return
            ttl = float(min(expiry, MAX_TTL))
        try:
            command = await self._service().submit(iccid, payload, content_format, ttl)
        except ApiError as exc:
            if exc.status_code >= 500:
                raise  # the store may come back: not taken, the broker sends it again
            self._drop(type(exc).__name__, topic, str(exc))
            return
        except (OSError, TimeoutError):
            raise
        except Exception:
            # A bug must not end the link /ingest shares, nor loop on redelivery.
            self.dropped["error"] += 1
            log.exception("mqtt command failed topic=%s", topic[:200])
            return
        self.accepted += 1
        log.info(
            "mqtt command queued iccid=%s id=%s size=%d",
            iccid,
            getattr(command, "id", "?"),
            len(payload),
        )
