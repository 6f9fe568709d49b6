"""Commands from MQTT (issue 15): topic → ``Commands.submit``. The rules are unit-tested on a
stand-in with the contract's ``submit`` signature; one test goes through a real Mosquitto and
the publisher end to end."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from api.command_intake import (
    DEFAULT_COMMAND_TOPIC,
    MAX_TTL,
    CommandIntake,
    command_filter,
)
from api.errors import ApiError, DeviceNotFound, PayloadTooLarge, StoreUnavailable
from api.mqtt_link import topic_matches
from api.publisher import MqttPublisher
from tests.support.services import MosquittoServer

ICCID = "8988280666000000001"
TOPIC = f"devices/{ICCID}/commands"
QOS1 = {"qos": 1, "retain": False, "duplicate": False}


class QueueFull(ApiError):  # the contract's CommandQueueFull (409), as the stand-in raises it
    status_code = 409


@dataclass
class StandIn:
    """``Commands.submit`` as the contract fixes it; raises ``fail`` once when set."""

    calls: list[tuple[str, bytes, int, float | None]] = field(default_factory=list)
    fail: Exception | None = None
    submitted: asyncio.Event = field(default_factory=asyncio.Event)

    async def submit(
        self, iccid: str, payload: bytes, content_format: int, ttl: float | None
    ) -> object:
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        self.calls.append((iccid, payload, content_format, ttl))
        self.submitted.set()
        return type("Command", (), {"id": f"c{len(self.calls)}"})()


# --- the filter


def test_the_default_filter_is_one_level_wildcard_and_the_status_topic_is_outside_it() -> None:
    topic_filter = command_filter(DEFAULT_COMMAND_TOPIC)
    assert topic_filter == "devices/+/commands"
    assert topic_matches(topic_filter, TOPIC)
    assert not topic_matches(topic_filter, f"devices/{ICCID}/commands/7f3a/status")
    assert not topic_matches(topic_filter, f"devices/{ICCID}/messages")
    intake = CommandIntake(StandIn())
    assert intake.topic_filter == "devices/+/commands"
    assert intake.iccid_of(f"devices/{ICCID}/commands/7f3a/status") is None


def test_a_custom_template_and_a_share_group() -> None:
    assert command_filter("fleet/a/{iccid}/down") == "fleet/a/+/down"
    assert command_filter("{iccid}/cmd", "api") == "$share/api/+/cmd"
    assert topic_matches("$share/api/+/cmd", f"{ICCID}/cmd")
    intake = CommandIntake(StandIn(), "fleet/a/{iccid}/down")
    assert intake.iccid_of(f"fleet/a/{ICCID}/down") == ICCID
    assert intake.iccid_of(f"fleet/b/{ICCID}/down") is None


@pytest.mark.parametrize(
    ("template", "share_group", "message"),
    [
        ("devices/commands", None, "{iccid} once"),
        ("devices/{iccid}/{iccid}", None, "{iccid} once"),
        ("devices/x{iccid}/commands", None, "whole level"),
        ("devices/{id}/commands", None, "{iccid} once"),
        ("devices/{iccid}/+", None, "wildcards"),
        ("devices/{iccid}/#", None, "wildcards"),
        ("$SYS/{iccid}", None, "start with \\$"),
        ("devices/{iccid}/commands", "a/b", "share group"),
        ("devices/{iccid}/commands", "", "share group"),
    ],
)
def test_an_unusable_template_or_group_is_refused_at_start(
    template: str, share_group: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        command_filter(template, share_group)


# --- messages → submit


async def test_a_plain_message_is_octet_stream_with_the_default_ttl() -> None:
    commands = StandIn()
    intake = CommandIntake(commands)
    await intake.on_message(TOPIC, b"\x01\x02", QOS1)
    assert commands.calls == [(ICCID, b"\x01\x02", 42, None)]
    assert intake.accepted == 1
    assert not intake.dropped


async def test_content_type_and_expiry_become_content_format_and_ttl() -> None:
    commands = StandIn()
    intake = CommandIntake(commands)
    await intake.on_message(
        TOPIC,
        b'{"reboot": true}',
        {**QOS1, "content_type": "application/json", "message_expiry_interval": 600},
    )
    await intake.on_message(
        TOPIC,
        b"\xa0",
        {**QOS1, "content_type": "application/cbor", "message_expiry_interval": 2**32 - 1},
    )
    assert commands.calls == [
        (ICCID, b'{"reboot": true}', 50, 600.0),
        (ICCID, b"\xa0", 60, float(MAX_TTL)),  # capped at the API's longest TTL
    ]


async def test_a_callable_gives_the_service_when_it_is_built_later() -> None:
    holder: dict[str, StandIn] = {}
    intake = CommandIntake(lambda: holder["commands"])
    holder["commands"] = StandIn()
    await intake.on_message(TOPIC, b"x", QOS1)
    assert holder["commands"].calls == [(ICCID, b"x", 42, None)]


@pytest.mark.parametrize(
    ("topic", "properties", "reason"),
    [
        ("devices/123/commands", QOS1, "iccid"),
        ("devices/8988280666000000001x/commands", QOS1, "iccid"),
        (f"devices/{ICCID}/commands/1/status", QOS1, "topic"),
        (TOPIC, {**QOS1, "retain": True}, "retained"),
        (TOPIC, {**QOS1, "content_type": "application/x-unknown"}, "content_type"),
        (TOPIC, {**QOS1, "content_type": "text/plain; charset=latin-1"}, "content_type"),
        (TOPIC, {**QOS1, "message_expiry_interval": 0}, "expired"),
    ],
)
async def test_what_cannot_be_a_command_is_dropped_counted_and_logged(
    topic: str, properties: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    commands = StandIn()
    intake = CommandIntake(commands)
    with caplog.at_level(logging.WARNING, logger="api.command_intake"):
        await intake.on_message(topic, b"x", properties)  # returns: the message is taken
    assert commands.calls == []
    assert intake.dropped == {reason: 1}
    assert f"reason={reason}" in caplog.text


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (DeviceNotFound("device not found"), "DeviceNotFound"),
        (PayloadTooLarge("payload too large"), "PayloadTooLarge"),
        (QueueFull("queue full"), "QueueFull"),
        (ValueError("a bug"), "error"),
    ],
)
async def test_a_refusal_or_a_bug_is_dropped_and_the_next_message_still_goes_through(
    failure: Exception, reason: str
) -> None:
    commands = StandIn(fail=failure)
    intake = CommandIntake(commands)
    await intake.on_message(TOPIC, b"refused", QOS1)
    await intake.on_message(TOPIC, b"next", QOS1)
    assert intake.dropped == {reason: 1}
    assert commands.calls == [(ICCID, b"next", 42, None)]


@pytest.mark.parametrize(
    "failure", [StoreUnavailable("redis down"), ConnectionError("reset"), TimeoutError()]
)
async def test_a_failure_that_may_pass_is_raised_so_the_broker_sends_it_again(
    failure: Exception,
) -> None:
    commands = StandIn(fail=failure)
    intake = CommandIntake(commands)
    with pytest.raises(type(failure)):
        await intake.on_message(TOPIC, b"again", QOS1)
    assert not intake.dropped
    await intake.on_message(TOPIC, b"again", {**QOS1, "duplicate": True})
    assert commands.calls == [(ICCID, b"again", 42, None)]


# --- end to end through a real broker


async def test_an_mqtt_application_queues_commands_through_the_broker(
    mosquitto: MosquittoServer,
) -> None:
    commands = StandIn()
    intake = CommandIntake(commands)
    publisher = MqttPublisher(host="127.0.0.1", port=mosquitto.port, publish_timeout=3.0)
    await publisher.start()
    try:
        await intake.start(publisher)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ContentType = "application/json"
        properties.MessageExpiryInterval = 120
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5
        ) as app:
            await app.publish(f"devices/{ICCID}/commands/x1/status", b"{}", qos=1)
            await app.publish("devices/42/commands", b"bad iccid", qos=1)
            await app.publish(TOPIC, b'{"led": "on"}', qos=1, properties=properties)
            await app.publish(TOPIC, b"\x07", qos=0)
        async with asyncio.timeout(5):
            while len(commands.calls) < 2:
                commands.submitted.clear()
                await commands.submitted.wait()
        # The publishing side is the same connection and still works.
        await publisher.publish("devices/x/messages", b"telemetry", {})
    finally:
        await publisher.close()
    iccid, payload, content_format, ttl = commands.calls[0]
    assert (iccid, payload, content_format) == (ICCID, b'{"led": "on"}', 50)
    assert ttl is not None
    assert 100 <= ttl <= 120
    assert commands.calls[1] == (ICCID, b"\x07", 42, None)
    assert intake.dropped == {"iccid": 1}  # the status topic never arrived at all
    assert intake.accepted == 2
