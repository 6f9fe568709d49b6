"""MqttPublisher against a real mosquitto: PUBACK semantics, outages, reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from api.errors import BrokerUnavailable
from api.publisher import MqttPublisher
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer, free_port


async def _wait_disconnected(publisher: MqttPublisher) -> None:
    for _ in range(200):
        if not publisher.connected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("publisher did not notice the broker going away")


@pytest.fixture
async def slow_retry_publisher(mosquitto: MosquittoServer) -> AsyncIterator[MqttPublisher]:
    # A backoff far longer than the test: only the publish-triggered attempt can reconnect.
    publisher = MqttPublisher(host="127.0.0.1", port=mosquitto.port, min_backoff=60, max_backoff=60)
    await publisher.start()
    assert publisher.connected
    try:
        yield publisher
    finally:
        await publisher.close()


async def test_publish_returns_after_puback_and_delivers(
    mosquitto: MosquittoServer, slow_retry_publisher: MqttPublisher
) -> None:
    async with subscribed(mosquitto.url, "pub/one") as sub:
        await slow_retry_publisher.publish("pub/one", b"\x00\x01", {"iccid": "1"})
        [message] = await sub.wait_for(1)
    assert message.payload == b"\x00\x01"
    assert message.properties is not None
    assert message.properties.UserProperty == [("iccid", "1")]


async def test_first_publish_after_broker_restart_reconnects_at_once(
    mosquitto: MosquittoServer, slow_retry_publisher: MqttPublisher
) -> None:
    mosquitto.stop()
    await _wait_disconnected(slow_retry_publisher)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await slow_retry_publisher.publish("pub/restart", b"lost", {})
    # Bounded by the reconnect wait, not by the publish timeout or the backoff.
    assert time.monotonic() - started < 2.5
    mosquitto.start()
    async with subscribed(mosquitto.url, "pub/restart") as sub:
        await slow_retry_publisher.publish("pub/restart", b"back", {})
        [message] = await sub.wait_for(1)
        await sub.assert_silent(0.2)
    assert message.payload == b"back"
    assert slow_retry_publisher.connected


async def test_start_does_not_fail_without_broker() -> None:
    publisher = MqttPublisher(host="127.0.0.1", port=free_port(), reconnect_wait=0.2)
    await publisher.start()
    try:
        assert not publisher.connected
        with pytest.raises(BrokerUnavailable):
            await publisher.publish("x", b"x", {})
    finally:
        await publisher.close()


async def test_publish_before_start_is_broker_unavailable() -> None:
    publisher = MqttPublisher(host="127.0.0.1", port=free_port())
    with pytest.raises(BrokerUnavailable, match="not running"):
        await publisher.publish("x", b"x", {})


async def test_missing_puback_times_out_as_broker_unavailable(
    mosquitto: MosquittoServer,
) -> None:
    publisher = MqttPublisher(host="127.0.0.1", port=mosquitto.port, publish_timeout=0.5)
    await publisher.start()
    try:
        mosquitto.pause()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"no PUBACK within 0\.5 s"):
            await publisher.publish("pub/hung", b"x", {})
        assert 0.4 < time.monotonic() - started < 1.5
    finally:
        mosquitto.resume()
        await publisher.close()


async def test_puback_waits_are_concurrent(mosquitto: MosquittoServer) -> None:
    # With a hung broker, 50 publishes must all time out together, not one after another.
    hung = MqttPublisher(host="127.0.0.1", port=mosquitto.port, publish_timeout=0.5)
    await hung.start()
    try:
        mosquitto.pause()
        started = time.monotonic()
        results = await asyncio.gather(
            *(hung.publish(f"pub/c{n}", b"x", {}) for n in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, BrokerUnavailable) for r in results)
        assert time.monotonic() - started < 1.5
    finally:
        mosquitto.resume()
        await hung.close()


async def test_publish_many_delivers_all_and_reports_each(
    mosquitto: MosquittoServer, slow_retry_publisher: MqttPublisher
) -> None:
    link = slow_retry_publisher._link
    assert link is not None
    messages = [(f"many/{n}", f"m{n}".encode(), {"n": str(n)}) for n in range(200)]
    async with subscribed(mosquitto.url, "many/#") as sub:
        results = await slow_retry_publisher.publish_many(messages)
        received = await sub.wait_for(200)
    assert results == [None] * 200
    assert sorted((str(m.topic), m.payload) for m in received) == sorted(
        (topic, payload) for topic, payload, _ in messages
    )
    assert link.in_flight == 0  # nothing left waiting


async def test_publish_many_refuses_a_bad_message_alone(
    mosquitto: MosquittoServer, slow_retry_publisher: MqttPublisher
) -> None:
    # MQTT forbids a wildcard in a PUBLISH topic; the messages around it still go out.
    messages = [("one/a", b"1", {}), ("one/#", b"2", {}), ("one/b", b"3", {})]
    async with subscribed(mosquitto.url, "one/#") as sub:
        results = await slow_retry_publisher.publish_many(messages)
        received = await sub.wait_for(2)
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], BrokerUnavailable)
    assert "MQTT publish failed" in str(results[1])
    assert sorted(m.payload for m in received) == [b"1", b"3"]


async def test_publish_many_with_broker_hung_fails_every_message(
    mosquitto: MosquittoServer,
) -> None:
    hung = MqttPublisher(host="127.0.0.1", port=mosquitto.port, publish_timeout=0.5)
    await hung.start()
    try:
        mosquitto.pause()
        started = time.monotonic()
        results = await hung.publish_many([("pub/h", b"x", {})] * 5)
        waited = time.monotonic() - started
    finally:
        mosquitto.resume()
        await hung.close()
    assert [type(r) for r in results] == [BrokerUnavailable] * 5
    assert all("no PUBACK within 0.5 s" in str(r) for r in results)
    assert 0.4 < waited < 1.5


async def test_publish_many_fails_at_once_when_the_connection_drops(
    mosquitto: MosquittoServer,
) -> None:
    publisher = MqttPublisher(
        host="127.0.0.1", port=mosquitto.port, publish_timeout=10, min_backoff=60, max_backoff=60
    )
    await publisher.start()
    try:
        mosquitto.pause()
        batch = asyncio.ensure_future(publisher.publish_many([("pub/d", b"x", {})] * 5))
        await asyncio.sleep(0.2)
        mosquitto.kill()  # the hung broker dies: the kernel resets its connections
        started = time.monotonic()
        results = await asyncio.wait_for(batch, 5)
    finally:
        await publisher.close()
    assert time.monotonic() - started < 3  # long before the 10 s publish timeout
    assert [str(r) for r in results] == ["MQTT connection lost before PUBACK"] * 5


async def test_publish_many_without_connection_fails_fast() -> None:
    never = MqttPublisher(host="127.0.0.1", port=1, reconnect_wait=0.2)
    results = await never.publish_many([("x", b"", {})] * 3)
    assert [type(r) for r in results] == [BrokerUnavailable] * 3


async def test_publish_many_within_bounds_the_wait_below_the_publish_timeout(
    mosquitto: MosquittoServer,
) -> None:
    # The proxy's budget (X-Bridge-Timeout) shortens the wait for a PUBACK, so the API's 503
    # is on its way before the proxy gives up with 5.04.
    publisher = MqttPublisher(host="127.0.0.1", port=mosquitto.port, publish_timeout=30)
    await publisher.start()
    try:
        mosquitto.pause()
        results = await asyncio.wait_for(
            publisher.publish_many([("pub/w", b"x", {})] * 3, within=0.3), 10
        )
    finally:
        mosquitto.resume()
        await publisher.close()
    assert [str(r) for r in results] == ["no PUBACK within 0.3 s"] * 3
