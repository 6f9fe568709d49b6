"""``mqtts://`` to a real Mosquitto with TLS listeners (issue 18, connectivity).

The CA, the broker's certificate and a client certificate are made by ``openssl`` for this
module (tests/support/tls.py); the broker has a plain listener (the subscriber's), a TLS one, a
client-certificate-only one and a user/password one. What is checked: a publish over TLS
reaches a subscriber (MQTT 5 and 3.1.1); a broker whose certificate does not chain to the CA
leaves the API unready with a log line that says why; the certificate-only listener takes us
with the client certificate and refuses us without it; user/password from the URL or the
settings; and a missing or wrong file is a start-up error naming its setting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pydantic import ValidationError

from api.app import create_app
from api.mqtt_link import LinkError, MqttLink
from api.publisher import MqttPublisher
from api.settings import ApiSettings, parse_mqtt_url
from launcher.cli import main
from tests.api.conftest import make_settings, real_server
from tests.support.mqtt import subscribed
from tests.support.tls import PASSWORD, USERNAME, Pki, TlsMosquitto, make_pki

SETTLE_WITHIN = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsMosquitto]:
    with TlsMosquitto(tmp_path_factory.mktemp("mosquitto-tls"), pki) as server:
        yield server


def settings(**values: Any) -> ApiSettings:
    return ApiSettings(mqtt_publish_timeout=2.0, **values)


@pytest.fixture
async def started() -> AsyncIterator[list[MqttPublisher]]:
    """Publishers made by a test, closed after it."""
    made: list[MqttPublisher] = []
    yield made
    for publisher in made:
        await publisher.close()


async def start(made: list[MqttPublisher], config: ApiSettings) -> MqttPublisher:
    publisher = MqttPublisher.from_settings(config)
    made.append(publisher)
    await publisher.start()
    return publisher


async def publishes_through(publisher: MqttPublisher, broker: TlsMosquitto, topic: str) -> None:
    assert publisher.connected
    async with subscribed(broker.url, topic) as sub:
        await publisher.publish(topic, b"over tls", {"k": "v"})
        [message] = await sub.wait_for(1)
    assert message.payload == b"over tls"


# --- publishing over TLS ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_publish_over_tls_reaches_a_subscriber(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher], protocol: str
) -> None:
    config = settings(
        mqtt_url=broker.url_of(broker.tls_port), mqtt_ca=str(pki.ca), mqtt_protocol=protocol
    )
    publisher = await start(started, config)
    await publishes_through(publisher, broker, f"tls/{protocol}")


async def test_the_host_name_may_be_a_dns_name_the_certificate_carries(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher]
) -> None:
    config = settings(mqtt_url=f"mqtts://localhost:{broker.tls_port}", mqtt_ca=str(pki.ca))
    publisher = await start(started, config)
    await publishes_through(publisher, broker, "tls/by-name")


async def test_without_mqtt_ca_the_system_trust_store_decides(
    broker: TlsMosquitto, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = broker.url_of(broker.tls_port)
    # The test CA is in no system store: refused by default …
    with pytest.raises(LinkError, match="not verified"):
        await MqttLink.open("127.0.0.1", broker.tls_port, tls=settings(mqtt_url=url).mqtt_tls())
    # … and trusted once the default store is that CA (OpenSSL's SSL_CERT_FILE), which shows
    # the default is the system store rather than no verification.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    link = await MqttLink.open("127.0.0.1", broker.tls_port, tls=settings(mqtt_url=url).mqtt_tls())
    link.close()
    await link.wait_closed()


async def test_a_plain_mqtt_url_uses_no_tls(broker: TlsMosquitto) -> None:
    assert settings(mqtt_url=broker.url).mqtt_tls() is None
    # A TLS listener does not speak plain MQTT: the CONNECT never gets a CONNACK.
    with pytest.raises(LinkError):
        await MqttLink.open("127.0.0.1", broker.tls_port, connect_timeout=1.0)


# --- a broker we must not trust --------------------------------------------------------------


async def _ready_status(client: httpx.AsyncClient, status: int) -> dict[str, Any]:
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        answer = await client.get("/readyz")
        if answer.status_code == status:
            body: dict[str, Any] = answer.json()
            return body
        assert time.monotonic() < deadline, f"/readyz still {answer.status_code}: {answer.text}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_broker_certificate_from_another_ca_leaves_the_api_unready(
    broker: TlsMosquitto, pki: Pki, caplog: pytest.LogCaptureFixture, trusted: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="api.publisher")
    ca = pki.ca if trusted else pki.other_ca
    app = create_app(
        make_settings(broker, mqtt_url=broker.url_of(broker.tls_port), mqtt_ca=str(ca))
    )
    async with real_server(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as client:
        body = await _ready_status(client, 200 if trusted else 503)
    assert body["mqtt"] == ("connected" if trusted else "disconnected")
    failures = [r.getMessage() for r in caplog.records if "mqtt unavailable" in r.getMessage()]
    if trusted:
        assert failures == []
    else:
        assert failures, caplog.text
        assert f"port={broker.tls_port}" in failures[0]
        assert "certificate of the broker" in failures[0]
        assert "not verified" in failures[0]
        assert "mqtt_ca" in failures[0]


# --- client certificates ---------------------------------------------------------------------


async def test_a_certificate_only_listener_takes_the_client_certificate(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher]
) -> None:
    config = settings(
        mqtt_url=broker.url_of(broker.mtls_port),
        mqtt_ca=str(pki.ca),
        mqtt_cert=str(pki.client_cert),
        mqtt_key=str(pki.client_key),
    )
    publisher = await start(started, config)
    await publishes_through(publisher, broker, "tls/client-cert")


async def test_a_certificate_only_listener_refuses_a_client_without_one(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher], caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(mqtt_url=broker.url_of(broker.mtls_port), mqtt_ca=str(pki.ca))
    with pytest.raises(LinkError, match="requires a client certificate"):
        await MqttLink.open("127.0.0.1", broker.mtls_port, tls=config.mqtt_tls())
    caplog.set_level(logging.WARNING, logger="api.publisher")
    publisher = await start(started, config)
    assert not publisher.connected
    assert any("mqtt unavailable" in r.getMessage() for r in caplog.records), caplog.text


async def test_a_cert_and_key_in_one_file_are_read_from_mqtt_cert(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher], tmp_path: Path
) -> None:
    both = tmp_path / "client-with-key.pem"
    both.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    config = settings(
        mqtt_url=broker.url_of(broker.mtls_port), mqtt_ca=str(pki.ca), mqtt_cert=str(both)
    )
    publisher = await start(started, config)
    await publishes_through(publisher, broker, "tls/cert-and-key")


# --- user name and password ------------------------------------------------------------------


async def test_user_and_password_from_the_url(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher]
) -> None:
    userinfo = f"{quote(USERNAME, safe='')}:{quote(PASSWORD, safe='')}@"
    config = settings(mqtt_url=broker.url_of(broker.password_port, userinfo), mqtt_ca=str(pki.ca))
    assert (config.mqtt_endpoint.username, config.mqtt_endpoint.password) == (USERNAME, PASSWORD)
    publisher = await start(started, config)
    await publishes_through(publisher, broker, "tls/url-credentials")


async def test_user_and_password_settings_override_the_url(
    broker: TlsMosquitto, pki: Pki, started: list[MqttPublisher]
) -> None:
    config = settings(
        mqtt_url=broker.url_of(broker.password_port, "someone:wrong@"),
        mqtt_ca=str(pki.ca),
        mqtt_username=USERNAME,
        mqtt_password=PASSWORD,
        mqtt_client_id="bridge-api-1",
    )
    publisher = await start(started, config)
    await publishes_through(publisher, broker, "tls/setting-credentials")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_wrong_password_is_refused_by_the_broker(
    broker: TlsMosquitto, pki: Pki, protocol: str
) -> None:
    config = settings(
        mqtt_url=broker.url_of(broker.password_port, f"{USERNAME}:nope@"),
        mqtt_ca=str(pki.ca),
        mqtt_protocol=protocol,
    )
    endpoint = config.mqtt_endpoint
    with pytest.raises(LinkError, match=r"refused the connection: (bad user name|not author)"):
        await MqttLink.open(
            endpoint.host,
            endpoint.port,
            protocol=config.mqtt_protocol,
            username=endpoint.username,
            password=endpoint.password,
            tls=config.mqtt_tls(),
        )


# --- settings: every bad input named ---------------------------------------------------------


def test_mqtts_defaults_to_port_8883() -> None:
    endpoint = parse_mqtt_url("mqtts://broker.example")
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.example", 8883, True)
    assert not parse_mqtt_url("mqtt://broker.example").tls


def _error(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        settings(**values)
    return str(caught.value)


def test_a_missing_ca_file_names_the_setting(tmp_path: Path) -> None:
    message = _error(mqtt_url="mqtts://h", mqtt_ca=str(tmp_path / "absent.pem"))
    assert "mqtt_ca: cannot read" in message
    assert "No such file" in message


def test_a_ca_file_that_is_no_certificate_names_the_setting(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert "mqtt_ca:" in _error(mqtt_url="mqtts://h", mqtt_ca=str(junk))


def test_an_unreadable_key_file_names_the_setting(pki: Pki, tmp_path: Path) -> None:
    message = _error(
        mqtt_url="mqtts://h", mqtt_cert=str(pki.client_cert), mqtt_key=str(tmp_path / "none")
    )
    assert "mqtt_key: cannot read" in message


def test_a_key_that_does_not_match_the_certificate_is_refused(pki: Pki) -> None:
    message = _error(
        mqtt_url="mqtts://h", mqtt_cert=str(pki.client_cert), mqtt_key=str(pki.server_key)
    )
    assert "mqtt_cert/mqtt_key: cannot load the client certificate" in message


def test_a_key_without_a_certificate_is_refused(pki: Pki) -> None:
    assert "mqtt_key is set without mqtt_cert" in _error(
        mqtt_url="mqtts://h", mqtt_key=str(pki.client_key)
    )


def test_tls_files_with_a_plain_url_are_refused(pki: Pki) -> None:
    assert "mqtt_ca is set but mqtt_url 'mqtt://h' is not mqtts://" in _error(
        mqtt_url="mqtt://h", mqtt_ca=str(pki.ca)
    )
    assert "mqtt_cert is set but" in _error(mqtt_url="mqtt://h", mqtt_cert=str(pki.client_cert))


def test_a_password_without_a_user_name_under_3_1_1_is_refused_without_echoing_it() -> None:
    message = _error(mqtt_url="mqtts://h", mqtt_protocol="3.1.1", mqtt_password="hunter2")
    assert "mqtt_password is set without mqtt_username" in message
    assert "hunter2" not in message
    # MQTT 5 allows a password alone (§3.1.2.9).
    assert settings(mqtt_url="mqtts://h", mqtt_password="hunter2").mqtt_endpoint.password


def test_an_empty_client_id_is_refused() -> None:
    assert "mqtt_client_id must be" in _error(mqtt_client_id="")


def test_the_command_line_reports_a_missing_ca_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    code = main(["api", "--mqtt-url", "mqtts://127.0.0.1", "--mqtt-ca", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid setting" in err
    assert f"mqtt_ca: cannot read '{missing}'" in err
