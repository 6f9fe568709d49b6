"""Issue 16 acceptance: each platform's devices work unchanged against ``coap-bridge up --profile``.

The managed-PSK profile (``--profile nhub``) is driven by the exact shell commands of that
platform's CoAP client guide (docs/PROFILES.md quotes them), with only the host and port
replaced by the bridge's: ``aiocoap-client`` and libcoap's ``coap-client`` (Debian installs it
as ``coap-client-openssl``; a ``coap-client`` link in a directory of the test's own puts it under
the guide's name). The signed-session profile (``--profile enos``) is driven by a device that
computes its signature exactly as that platform's guide describes, over real UDP. What
arrives on a real ``mosquitto`` is checked each time.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import cbor2
import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import coap_client
from tests.support.coap import RawClient, request_datagram
from tests.support.dtls import dtls_ready
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration

GUIDE_HOST = "coap.dev-au-03.nnnco.io"
IDENTITY = "koru-869181072798893"
IMEI = "869181072798893"


# --- the managed-PSK profile: the guide's own commands -------------------------------------


@pytest.fixture
async def managed(
    tmp_path: Path, redis_server: RedisServer, mosquitto: MosquittoServer
) -> AsyncIterator[Bridge]:
    async with _up(tmp_path, redis_server, mosquitto, "nhub") as bridge:
        async with bridge.api() as api:
            for body in ({"id": "test-001"}, {"id": IDENTITY, "imei": IMEI}):
                reply = await api.post("/devices", json=body)
                assert reply.status_code == 201, reply.text
        yield bridge


def _guide_env(tmp_path: Path) -> dict[str, str]:
    """PATH with ``coap-client`` (the guide's name) = libcoap's OpenSSL build, then the venv's
    ``aiocoap-client`` and ``python3`` (which has ``cbor2``, as the guide's CBOR example needs)."""
    tools = tmp_path / "guide-tools"
    tools.mkdir(exist_ok=True)
    libcoap = shutil.which("coap-client-openssl")
    assert libcoap is not None, "coap-client-openssl not found: install libcoap3-bin"
    link = tools / "coap-client"
    if not link.exists():
        link.symlink_to(libcoap)
    venv_bin = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{tools}:{venv_bin}:{os.environ['PATH']}"}


async def _guide(command: str, bridge: Bridge, tmp_path: Path) -> tuple[int, str]:
    """Run one command of the guide through a shell, its host replaced by the bridge's."""
    here = command.replace(f"{GUIDE_HOST}:5683", f"127.0.0.1:{bridge.coap_port}").replace(
        f"{GUIDE_HOST}:5684", f"127.0.0.1:{bridge.coaps_port}"
    )
    assert GUIDE_HOST not in here
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", here, env=_guide_env(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(errors="replace")


async def test_guide_aiocoap_json_with_payload_arrives_and_is_created(
    managed, mosquitto, tmp_path
) -> None:
    command = """
aiocoap-client coap://coap.dev-au-03.nnnco.io:5683/telemetry?id=test-001 \\
  -m POST --content-format application/json \\
  --payload '{"temperature": 23.5}'
"""
    async with subscribed(mosquitto.url, "devices/test-001/messages") as sub:
        code, output = await _guide(command, managed, tmp_path)
        assert code == 0, output
        [message] = await sub.wait_for(1)
    assert message.payload == b'{"temperature": 23.5}'
    properties = dict(message.properties.UserProperty)
    assert properties["device"] == "test-001"
    assert properties["content-format"] == "50"


async def test_guide_libcoap_plain_json(managed, mosquitto, tmp_path) -> None:
    command = """
coap-client -m post \\
  -t application/json \\
  -e '{"temperature": 23.5}' \\
  "coap://coap.dev-au-03.nnnco.io:5683/telemetry?id=test-001"
"""
    async with subscribed(mosquitto.url, "devices/test-001/messages") as sub:
        code, output = await _guide(command, managed, tmp_path)
        assert code == 0, output
        [message] = await sub.wait_for(1)
    assert message.payload == b'{"temperature": 23.5}'


async def test_guide_libcoap_over_dtls_with_issued_credentials(
    managed, mosquitto, tmp_path
) -> None:
    await dtls_ready(managed.coaps_port)
    async with managed.api() as api:
        reply = await api.post(
            f"/api/v4/manage/devices/{IDENTITY}/credentials/", json={"auth_type": "psk"}
        )
    assert reply.status_code == 201, reply.text
    issued = reply.json()
    assert issued["psk_identity"] == IDENTITY
    assert issued["status"] == "active"
    key = issued["psk_key"]
    assert len(key) == 64
    assert set(key) <= set("0123456789abcdef")
    command = """
coap-client -m post \\
  -t application/json \\
  -e '{"temperature": 23.5}' \\
  -u "koru-869181072798893" \\
  -k "<psk-key-hex>" \\
  "coaps://coap.dev-au-03.nnnco.io:5684/telemetry?id=869181072798893"
""".replace("<psk-key-hex>", key)
    async with subscribed(mosquitto.url, f"devices/{IDENTITY}/messages") as sub:
        code, output = await _guide(command, managed, tmp_path)
        assert code == 0, output
        [message] = await sub.wait_for(1)
    assert message.payload == b'{"temperature": 23.5}'
    assert dict(message.properties.UserProperty)["device"] == IDENTITY
    # The platform's "online from the first message", through the API.
    async with managed.api() as api:
        presence = (await api.get(f"/devices/{IDENTITY}/presence")).json()
    assert presence["online"] is True
    assert presence["last_seen"] is not None


async def test_revoked_credentials_are_refused_and_never_listed(managed) -> None:
    """The listing never shows a key; after DELETE the same key no longer completes a DTLS
    handshake (every proxy's PSK mirror hears of it through Redis pub/sub; the guide's platform
    waits for a 5-minute cache)."""
    await dtls_ready(managed.coaps_port)
    key = await _issue_credentials(managed, IDENTITY)
    url = f"{managed.coaps_url}/telemetry?id={IMEI}"
    args = ["-m", "post", "-t", "application/json", "-e", "{}", "-u", IDENTITY, "-k", key, url]
    accepted = await coap_client(*args, binary="coap-client-openssl", timeout=5)
    assert accepted.codes == ["2.01"], accepted.stdout + accepted.stderr
    path = f"/api/v4/manage/devices/{IDENTITY}/credentials/"
    async with managed.api() as api:
        listed = await api.get(path)
        assert listed.status_code == 200, listed.text
        assert key not in listed.text
        [credential] = listed.json()
        assert credential["status"] == "active"
        assert (await api.delete(f"{path}{credential['id']}/")).status_code == 204
        [revoked] = (await api.get(path)).json()
        assert revoked["status"] == "revoked"
    # The revocation travels by pub/sub: a handshake that starts before it lands may still
    # pass, so a few tries (the point is "refused soon", not how soon).
    for _ in range(5):
        refused = await coap_client(*args, binary="coap-client-openssl", timeout=3)
        if not refused.codes:
            break
    assert refused.codes == [], refused.stdout + refused.stderr


async def _issue_credentials(bridge: Bridge, device: str) -> str:
    async with bridge.api() as api:
        reply = await api.post(
            f"/api/v4/manage/devices/{device}/credentials/", json={"auth_type": "psk"}
        )
    assert reply.status_code == 201, reply.text
    key: str = reply.json()["psk_key"]
    return key


async def test_managed_device_observes_its_commands_over_dtls(managed, tmp_path) -> None:
    """The guide's "Receiving Commands (Observe)": the device, over DTLS with its issued
    credentials, observes ``/commands/{device_id}``; a command queued by an operator arrives as
    a notification, and is then acknowledged as delivered."""
    await dtls_ready(managed.coaps_port)
    key = await _issue_credentials(managed, IDENTITY)
    libcoap = shutil.which("coap-client-openssl")
    assert libcoap is not None, "coap-client-openssl not found: install libcoap3-bin"
    observer = await asyncio.create_subprocess_exec(
        "stdbuf", "-oL", libcoap, "-s", "8", "-B", "10", "-v", "6", "-m", "get",
        "-u", IDENTITY, "-k", key, f"{managed.coaps_url}/commands/{IDENTITY}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    seen: list[str] = []
    changed = asyncio.Event()

    async def read() -> None:
        assert observer.stdout is not None
        async for raw in observer.stdout:
            seen.append(raw.decode(errors="replace"))
            changed.set()

    async def shown(*needles: str) -> None:
        async with asyncio.timeout(10):
            while not any(needle in line for line in seen for needle in needles):
                changed.clear()
                await changed.wait()

    reader = asyncio.create_task(read())
    try:
        await shown("c:2.05", "c:4.04")  # registered: the first answer came back
        async with managed.api() as api:
            queued = await api.post(
                f"/devices/{IDENTITY}/commands", json={"payload": {"led": "on"}}
            )
            assert queued.status_code == 201, queued.text
            # libcoap's -v 6 dump shows a JSON payload as text, other payloads as <<hex>>.
            await shown('{"led":"on"}', b'{"led":"on"}'.hex())
            states = []
            for _ in range(50):
                listed = (await api.get(f"/devices/{IDENTITY}/commands")).json()["commands"]
                states = [entry["state"] for entry in listed]
                if states == ["delivered"]:
                    break
                await asyncio.sleep(0.1)
            assert states == ["delivered"]
    finally:
        if observer.returncode is None:
            observer.terminate()
        await observer.wait()
        await reader


async def test_managed_profile_serves_firmware_block_wise(managed) -> None:
    """``GET /firmware/{version}`` is this profile's route: an image uploaded over HTTP comes
    back byte-exact through libcoap's Block2 download; an unknown version is 4.04."""
    image = os.urandom(5000)
    async with managed.api() as api:
        stored = await api.put(
            "/firmware/1.0.0",
            content=image,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert stored.status_code in (200, 201), stored.text
    await dtls_ready(managed.coaps_port)
    key = await _issue_credentials(managed, IDENTITY)
    run = await coap_client(
        "-m", "get", "-b", "512", "-u", IDENTITY, "-k", key,
        f"{managed.coaps_url}/firmware/1.0.0", binary="coap-client-openssl",
    )  # fmt: skip
    # 5000 bytes in 512-byte blocks: ten 2.05 answers.
    assert run.codes == ["2.05"] * 10, run.stdout + run.stderr
    missing = await coap_client(
        "-m", "get", "-u", IDENTITY, "-k", key,
        f"{managed.coaps_url}/firmware/9.9.9", binary="coap-client-openssl",
    )  # fmt: skip
    assert missing.codes == ["4.04"], missing.stdout + missing.stderr


async def test_guide_json_example_piped_into_aiocoap_sends_no_payload(
    managed, mosquitto, tmp_path
) -> None:
    """The guide's first example pipes the JSON into ``aiocoap-client`` without ``--payload``:
    aiocoap-client reads standard input only for ``--payload @-``, so the request carries no
    payload at all; an empty body is not JSON, so the bridge answers 4.00 and publishes
    nothing (docs/PROFILES.md)."""
    command = """
echo '{"temperature": 23.5, "humidity": 45.2}' | \\
aiocoap-client coap://coap.dev-au-03.nnnco.io:5683/telemetry?id=test-001 \\
-m POST --content-format application/json
"""
    async with subscribed(mosquitto.url, "devices/test-001/messages") as sub:
        _, output = await _guide(command, managed, tmp_path)
        assert "Bad Request" in output, output
        await sub.assert_silent()
    # The same data with the flag that reads standard input is created.
    async with subscribed(mosquitto.url, "devices/test-001/messages") as sub:
        code, output = await _guide(
            command.replace("application/json\n", "application/json --payload @-\n"),
            managed,
            tmp_path,
        )
        assert code == 0, output
        [message] = await sub.wait_for(1)
    assert json.loads(message.payload) == {"temperature": 23.5, "humidity": 45.2}


async def test_guide_cbor_example(managed, mosquitto, tmp_path) -> None:
    """The guide's CBOR example passes ``--payload -``: aiocoap-client reads ``-`` as CBOR
    diagnostic notation, not as standard input, and refuses before sending. With ``@-`` (its
    flag for standard input) the CBOR bytes arrive on MQTT unchanged."""
    command = """
python3 -c "import cbor2,sys; sys.stdout.buffer.write(cbor2.dumps({'temperature':23.5}))" | \\
aiocoap-client coap://coap.dev-au-03.nnnco.io:5683/telemetry?id=test-001 \\
-m POST --content-format application/cbor --payload -
"""
    async with subscribed(mosquitto.url, "devices/test-001/messages") as sub:
        code, output = await _guide(command, managed, tmp_path)
        assert code != 0, output
        await sub.assert_silent()
        code, output = await _guide(
            command.replace("--payload -", "--payload @-"), managed, tmp_path
        )
        assert code == 0, output
        [message] = await sub.wait_for(1)
    assert message.payload == cbor2.dumps({"temperature": 23.5})
    assert dict(message.properties.UserProperty)["content-format"] == "60"


async def test_managed_profile_codes_over_raw_coap(managed, mosquitto) -> None:
    """The guide's code table: 2.01 Created for good telemetry; malformed JSON or CBOR 4.00, a
    missing id 4.00, an unknown device 4.01, and nothing published for any of these."""
    cases = [
        (["id=test-001"], 60, cbor2.dumps({"t": 1})),
        (["id=test-001"], 50, b"{not json"),
        (["id=test-001"], 60, b"\xff\xff"),
        ([], 50, b"{}"),
        (["id=nobody-here"], 50, b"{}"),
    ]
    client = await RawClient.connect("127.0.0.1", managed.coap_port)
    codes = []
    try:
        async with subscribed(mosquitto.url, "devices/+/messages") as sub:
            for mid, (queries, content_format, payload) in enumerate(cases, start=1):
                reply = await client.request(
                    request_datagram(
                        status.POST, mid, "/telemetry", token=bytes([mid]), queries=queries,
                        payload=payload, extra=[(opt.CONTENT_FORMAT, bytes([content_format]))],
                    )
                )  # fmt: skip
                codes.append(reply.code)
            [created] = await sub.wait_for(1)
            await sub.assert_silent()
    finally:
        client.close()
    assert created.payload == cbor2.dumps({"t": 1})
    assert codes == [
        status.CREATED,
        status.BAD_REQUEST,
        status.BAD_REQUEST,
        status.BAD_REQUEST,
        status.UNAUTHORIZED,
    ]


async def test_production_mode_refuses_plain_telemetry(tmp_path, redis_server, mosquitto) -> None:
    async with _up(tmp_path, redis_server, mosquitto, "nhub", "--require-dtls") as bridge:
        async with bridge.api() as api:
            assert (await api.post("/devices", json={"id": "test-001"})).status_code == 201
        run = await coap_client(
            "-m", "post", "-t", "application/json", "-e", "{}",
            f"{bridge.coap_url}/telemetry?id=test-001",
        )  # fmt: skip
    assert run.codes == ["4.01"], run.stdout + run.stderr


# --- the signed-session profile: a device signing as the guide describes --------------------

_serial = itertools.count(1)


def guide_sign(
    product_key: str, device_key: str, lifetime: int, secure_mode: int, secret: str
) -> str:
    """The guide's three steps: concatenate the fields in order, append the device secret,
    SHA-256 it and capitalise every letter of the hex digest."""
    text = (
        f"deviceKey{device_key}lifetime{lifetime}productKey{product_key}"
        f"secureMode{secure_mode}{secret}"
    )
    return hashlib.sha256(text.encode()).hexdigest().upper()


@pytest.fixture
async def signed(
    tmp_path: Path, redis_server: RedisServer, mosquitto: MosquittoServer
) -> AsyncIterator[Bridge]:
    async with _up(tmp_path, redis_server, mosquitto, "enos") as bridge:
        yield bridge


async def _register(bridge: Bridge) -> tuple[str, str, str]:
    device_key = f"86918107{next(_serial):07d}"  # an IMEI, as the guide suggests
    async with bridge.api() as api:
        product = await api.post("/products", json={})
        assert product.status_code == 201, product.text
        product_key = product.json()["productKey"]
        device = await api.post(f"/products/{product_key}/devices", json={"deviceKey": device_key})
        assert device.status_code == 201, device.text
    return product_key, device_key, device.json()["deviceSecret"]


_mids = itertools.count(1)


async def _post(
    client: RawClient, path: str, payload: bytes, content_format: int | None = 50
) -> int:
    mid = next(_mids)
    extra = [] if content_format is None else [(opt.CONTENT_FORMAT, bytes([content_format]))]
    reply = await client.request(
        request_datagram(
            status.POST, mid, path, token=mid.to_bytes(2, "big"), payload=payload, extra=extra
        )
    )
    return reply.code


def _auth(product_key: str, device_key: str, body: dict[str, object]) -> tuple[str, bytes]:
    return f"/auth/{product_key}/{device_key}", json.dumps(body).encode()


async def test_signed_device_authenticates_reports_and_is_online(signed, mosquitto) -> None:
    product_key, device_key, secret = await _register(signed)
    lifetime = 300
    sign = guide_sign(product_key, device_key, lifetime, 2, secret)
    report = b'{"params":{"measurepoints":{"temp":21.5}}}'
    client = await RawClient.connect("127.0.0.1", signed.coap_port)
    try:
        async with subscribed(mosquitto.url, f"devices/{product_key}:{device_key}/#") as sub:
            path, body = _auth(
                product_key, device_key, {"secureMode": 2, "lifetime": lifetime, "sign": sign}
            )
            assert await _post(client, path, body) == status.CONTENT
            data_path = f"/topic/sys/{product_key}/{device_key}/thing/measurepoint/post"
            assert await _post(client, data_path, report) == status.CHANGED
            messages = await sub.wait_for(2)
    finally:
        client.close()
    [online] = [m for m in messages if str(m.topic).endswith("/status")]
    [data] = [m for m in messages if str(m.topic).endswith("/messages")]
    assert json.loads(online.payload)["status"] == "online"
    assert data.payload == report
    # The status is retained: a subscriber that comes later still learns it.
    async with subscribed(mosquitto.url, str(online.topic), retained=True) as late:
        [kept] = await late.wait_for(1)
    assert kept.retain
    assert json.loads(kept.payload)["status"] == "online"


async def test_signed_device_refusals(signed, mosquitto) -> None:
    """A sign off by one character 4.01, a lifetime below 30 s 4.00, no sign 4.00, telemetry
    before any session 4.01; nothing reaches MQTT."""
    product_key, device_key, secret = await _register(signed)
    good = guide_sign(product_key, device_key, 300, 2, secret)
    wrong = good[:-1] + ("0" if good[-1] != "0" else "1")
    short = guide_sign(product_key, device_key, 29, 2, secret)
    cases = [
        ({"secureMode": 2, "lifetime": 300, "sign": wrong}, status.UNAUTHORIZED),
        ({"secureMode": 2, "lifetime": 29, "sign": short}, status.BAD_REQUEST),
        ({"secureMode": 2, "lifetime": 300}, status.BAD_REQUEST),
    ]
    client = await RawClient.connect("127.0.0.1", signed.coap_port)
    try:
        async with subscribed(mosquitto.url, f"devices/{product_key}:{device_key}/#") as sub:
            for body, expected in cases:
                assert await _post(client, *_auth(product_key, device_key, body)) == expected
            raw_path = f"/topic/sys/{product_key}/{device_key}/thing/model/up_raw"
            assert await _post(client, raw_path, b"\x01\x02", None) == status.UNAUTHORIZED
            await sub.assert_silent()
    finally:
        client.close()


def _up(
    tmp_path: Path, redis_server: RedisServer, mosquitto: MosquittoServer, *args: str
) -> AbstractAsyncContextManager[Bridge]:
    """``coap-bridge up --profile <first arg>`` with DTLS on a free port of 127.0.0.1."""
    profile, *rest = args
    return running_bridge(
        tmp_path,
        redis_url=redis_server.url,
        mqtt_url=mosquitto.url,
        extra=["--profile", profile, "--coaps-host", "127.0.0.1", *rest],
    )
