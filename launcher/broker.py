"""The embedded MQTT broker for ``coap-bridge up`` without ``--mqtt-url`` (amqtt, in process).

amqtt speaks MQTT 3.1.1 only, so the API publishes to it without MQTT 5 user properties. It is
meant for a laptop, not for production (docs/ARCHITECTURE.md, "Embedded broker").
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import BrokerError

from launcher.listeners import bind_tcp
from proxy.server import ListenerError


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

    def _listener_error(self, exc: OSError) -> ListenerError:
        return ListenerError(
            "embedded MQTT broker",
            self.host,
            self.port,
            exc,
            host_setting="mqtt_host",
            port_setting="mqtt_port",
        )

    async def start(self) -> None:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Try the port first, bound as amqtt binds it: amqtt reports a taken port with a
        # logged traceback and a BrokerError; this way it is one line (launcher/listeners.py).
        try:
            bind_tcp(self.host, self.port).close()
        except OSError as exc:
            raise self._listener_error(exc) from exc
        broker = Broker(self._config)
        try:
            await broker.start()
        except BrokerError as exc:
            if isinstance(exc.__cause__, OSError):
                raise self._listener_error(exc.__cause__) from exc
            raise
        self._broker = broker

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
