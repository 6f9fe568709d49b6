"""A broker that takes the connection but never sends PUBACK: the device hears 5.03 with
Max-Age (come back later), the answer of a broker that is down — not 5.04.

With the proxy's upstream timeout equal to the API's publish timeout (5 s each, the defaults),
the proxy used to give up first and answer 5.04. The proxy now tells the API its timeout
(policies/forwarding.py, TIMEOUT_HEADER) and the API bounds its PUBACK wait by it, so the API's
503 always arrives first. A real `coap-bridge up`, a real Redis and a real Mosquitto that is
stopped with SIGSTOP (its sockets stay open, nothing is answered).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, encode_empty, encode_parts, parse_uint
from tests.support.bridge import Bridge, running_bridge
from tests.support.coap import RawClient

pytestmark = pytest.mark.integration

_mids = itertools.count(100)


@pytest.fixture
async def bridge(tmp_path, redis_server, mosquitto) -> AsyncIterator[Bridge]:
    # Both timeouts at their defaults: the case that used to end in 5.04.
    async with running_bridge(tmp_path, redis_url=redis_server.url, mqtt_url=mosquitto.url) as b:
        await b.register("8988280666000000777", "127.0.0.1")
        yield b


async def _post(client: RawClient, payload: bytes) -> object:
    """A CON POST; the answer, piggybacked or separate (an empty ACK comes first then)."""
    mid = next(_mids)
    client.send(encode_parts(CON, status.POST, mid, b"\x07", [(opt.URI_PATH, b"data")], payload))
    reply = await client.recv_message(timeout=10)
    if reply.mtype == ACK and reply.code == 0:
        reply = await client.recv_message(timeout=10)
        if reply.mtype == CON:
            client.send(encode_empty(ACK, reply.mid))
    return reply


async def test_a_broker_that_never_acknowledges_gives_5_03_with_max_age(
    bridge: Bridge, mosquitto
) -> None:
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    try:
        before = await _post(client, b"before")
        assert before.code == status.CHANGED
        mosquitto.pause()
        try:
            reply = await _post(client, b"during")
        finally:
            mosquitto.resume()
    finally:
        await client.aclose()
    assert (reply.code, reply.payload) == (status.SERVICE_UNAVAILABLE, b"")
    max_age = [parse_uint(v) for n, v in reply.options if n == opt.MAX_AGE]
    assert len(max_age) == 1
    assert max_age[0] >= 1
