"""``rediss://`` to a real redis-server with a TLS port (issue 18, connectivity).

Debian's redis-server is built with TLS; the CA and the server's certificate (for localhost and
127.0.0.1) come from tests/support/tls.py. TLS URLs go to redis-py, never to our own RESP link
(stores/resp.py speaks plain TCP only): the client factory, the exactly-once ledger and the
API's device store are each checked over TLS, with the CA given in the URL's query.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.store.base import Device
from api.store.redis_store import RedisDeviceStore
from stores.ledger import redis_ledger
from stores.redis import REDIS_ERRORS, connect
from stores.resp import address_of
from tests.support.tls import Pki, TlsRedis, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsRedis]:
    with TlsRedis(tmp_path_factory.mktemp("redis-tls"), pki) as server:
        yield server


async def test_a_client_reaches_the_tls_port_with_the_ca_from_the_url(
    redis_tls: TlsRedis, pki: Pki
) -> None:
    url = redis_tls.tls_url(f"ssl_ca_certs={pki.ca}")
    assert address_of(url) is None  # not our plain RESP link
    connection = connect(url, timeout=2.0)
    try:
        await connection.client.set("tls:key", b"value")
        assert await connection.client.get("tls:key") == b"value"
    finally:
        await connection.aclose()
    assert b"value" in redis_tls.execute("GET", "tls:key")  # the same server, plain port


async def test_without_the_ca_the_server_is_not_trusted(redis_tls: TlsRedis) -> None:
    connection = connect(redis_tls.tls_url(), timeout=2.0)
    try:
        with pytest.raises(REDIS_ERRORS, match=r"(?i)certificate verify failed"):
            await connection.client.ping()
    finally:
        await connection.aclose()


async def test_the_ledger_and_the_device_store_run_over_tls(redis_tls: TlsRedis, pki: Pki) -> None:
    url = redis_tls.tls_url(f"ssl_ca_certs={pki.ca}")
    ledger = redis_ledger(url, prefix="tlsdd", timeout=2.0)
    try:
        first = await ledger.claim(["k1"], lease=5.0)
        again = await ledger.claim(["k1"], lease=5.0)
    finally:
        await ledger.close()
    assert first != again  # the second claim saw the first one's record, on the server
    store = RedisDeviceStore.from_url(url, prefix="tlsdev")
    try:
        await store.create(Device(iccid="8988280666000000009", ip="10.0.0.9", status="active"))
        found = await store.get("8988280666000000009")
    finally:
        await store.close()
    assert found is not None
    assert found.ip == "10.0.0.9"


def test_a_missing_ca_file_in_the_url_names_the_parameter(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    with pytest.raises(ValueError, match=f"redis_url: ssl_ca_certs='{missing}' cannot be read"):
        connect(f"rediss://localhost:6380/0?ssl_ca_certs={missing}", timeout=1.0)
