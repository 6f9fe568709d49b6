"""Subscribe first, act, then assert what the broker delivered (byte-exact) or that it was silent.

    async with subscribed(mosquitto.url, "devices/+/messages") as sub:
        ...  # trigger the publish
        [message] = await sub.wait_for(1)
        assert message.payload == b"..."

    async with subscribed(mosquitto.url, "#") as sub:
        ...  # something that must not publish
        await sub.assert_silent(0.3)

:func:`collect` is the one-shot form for a background task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit

import aiomqtt


class Subscription:
    """Messages received so far on one subscription, in arrival order."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.messages: list[aiomqtt.Message] = []
        self._arrived = asyncio.Event()
        self._consumed = 0

    def _add(self, message: aiomqtt.Message) -> None:
        self.messages.append(message)
        self._arrived.set()

    # A deadline argument (ASYNC109) because the count and the time both go into the
    # assertion message; an outer asyncio.timeout would only say "TimeoutError".
    async def wait_for(
        self,
        count: int,
        timeout: float = 5.0,
    ) -> list[aiomqtt.Message]:
        """The first ``count`` messages; fails the test if they do not arrive in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.messages) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} message(s) on {self.topic!r} within {timeout} s, "
                    f"got {len(self.messages)}: {[str(m.topic) for m in self.messages]}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        self._consumed = max(self._consumed, count)
        return self.messages[:count]

    async def assert_silent(self, within: float = 0.3) -> None:
        """Fails if anything beyond the messages already returned by :meth:`wait_for` arrives
        (or arrived) on the subscription within ``within`` seconds."""
        await asyncio.sleep(within)
        extra = self.messages[self._consumed :]
        assert not extra, (
            f"expected nothing more on {self.topic!r}, got "
            f"{[(str(m.topic), m.payload) for m in extra]}"
        )


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


@contextlib.asynccontextmanager
async def subscribed(
    url: str,
    topic: str,
    *,
    protocol: Literal["5", "3.1.1"] = "5",
    qos: int = 1,
    retained: bool = False,
) -> AsyncIterator[Subscription]:
    """Yields once the broker has acknowledged the subscription (SUBACK), so nothing published
    after that is missed. Messages the broker retained from before (the devices' status
    messages other tests left on a shared broker) are dropped unless ``retained``: a message
    published while subscribed arrives with the retain flag clear (MQTT 5 §3.3.1.3)."""
    host, port = _endpoint(url)
    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
    subscription = Subscription(topic)
    async with aiomqtt.Client(host, port, protocol=version, timeout=5) as client:
        await client.subscribe(topic, qos=qos)

        async def pump() -> None:
            with contextlib.suppress(aiomqtt.MqttError):
                async for message in client.messages:
                    if retained or not message.retain:
                        subscription._add(message)

        task = asyncio.create_task(pump())
        try:
            yield subscription
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def collect(
    url: str,
    topic: str,
    count: int,
    timeout: float = 5.0,
    *,
    ready: asyncio.Event | None = None,
) -> list[aiomqtt.Message]:
    """Subscribe, set ``ready``, and return the first ``count`` messages (AssertionError if
    they do not arrive within ``timeout``). Run it as a task; await ``ready`` before acting."""
    async with subscribed(url, topic) as subscription:
        if ready is not None:
            ready.set()
        return await subscription.wait_for(count, timeout)
