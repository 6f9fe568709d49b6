"""Issue 19: nothing meant for one device reaches another device's DTLS session.

Over DTLS the proxy sends to an address, and the transport encrypts for whatever session sits
there when it sends. A separate response (RFC 7252 §5.2.2) leaves long after its request: by
then device A may have moved on (a new NAT mapping; its session follows it by its Connection
ID, RFC 9146 §6) and device B may sit at A's old address (the NAT gave B that port, and B's
session moved there). The proxy must then send A's answer nowhere — not encrypted under B's
keys — and count it (``misdirected``), for the response and for its retransmissions (§4.2).

Real parts: the proxy (``start_proxy``) with its DTLS port and a real HTTP upstream whose
answer the test holds back, and two clients of our own (tests/support/dtls_cid_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, RST, decode, encode_empty, encode_parts
from proxy.server import start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore
from tests.support.dtls_cid_client import BoundPorts, CidClient, DtlsTimeout
from tests.support.http import serve_app

_mids = iter(range(1, 0xFFFF))


@contextlib.asynccontextmanager
async def slow_proxy(
    tmp_path: Path, psks: dict[str, str], release: asyncio.Event
) -> AsyncIterator[Any]:
    """The proxy over DTLS; its upstream answers /slow only once ``release`` is set."""

    async def slow(request: HttpRequest) -> HttpResponse:
        await release.wait()
        return HttpResponse(b"for A only", media_type="text/plain")

    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/slow"\nmethods = ["GET"]\ntarget = "/slow"\n')
    async with serve_app(Starlette(routes=[Route("/slow", slow)])) as base_url:
        proxy = await start_proxy(
            ProxySettings(
                coap_host="127.0.0.1",
                coap_port=0,
                coaps_port=0,
                upstream=base_url,
                policy=str(policy),
                proxy_token="t",
                ack_window=0.2,
            ),
            psk_store=MemoryPskStore(psks),
        )
        try:
            assert proxy.dtls is not None
            assert proxy.dtls_driver is not None
            yield proxy
        finally:
            await proxy.close()


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _ping(client: CidClient) -> None:
    """A CoAP ping (RFC 7252 §4.3): the record that moves the session to the client's
    current address; the proxy's Reset proves it arrived and was answered there."""
    assert decode(await client.request(encode_empty(CON, next(_mids)))).mtype == RST


async def test_a_separate_response_is_not_sent_to_the_device_now_at_its_address(
    tmp_path,
) -> None:
    a_id, b_id = f"dev-a-{secrets.token_hex(4)}", f"dev-b-{secrets.token_hex(4)}"
    a_psk, b_psk = secrets.token_hex(8), secrets.token_hex(8)
    release = asyncio.Event()
    async with slow_proxy(tmp_path, {a_id: a_psk, b_id: b_psk}, release) as proxy:
        dtls, stats = proxy.dtls, proxy.dtls_driver.stats
        server = int(dtls.get_extra_info("sockname")[1])
        ports = BoundPorts()
        a = CidClient(a_id.encode(), a_psk.encode(), offer_cid=b"")
        b = CidClient(b_id.encode(), b_psk.encode(), offer_cid=b"", socket_factory=ports)
        try:
            await a.connect("127.0.0.1", server)
            await b.connect("127.0.0.1", server)
            mid = next(_mids)
            a.send(encode_parts(CON, 1, mid, b"\xa1", [(opt.URI_PATH, b"slow")], b""))
            # The upstream holds the answer: the ACK window closes with an empty ACK, and the
            # answer will follow as a separate CON to A's address as it was then.
            empty = decode(await a.recv(timeout=5.0))
            assert (empty.mtype, empty.code, empty.mid) == (ACK, 0, mid)
            old = ("127.0.0.1", a.local_port)
            await a.rebind()  # A's device gets a new NAT mapping; its session follows it
            await _ping(a)
            assert dtls.identity_of(("127.0.0.1", a.local_port)) == a_id
            assert dtls.identity_of(old) is None
            await asyncio.sleep(0)  # (asyncio closes A's old socket on the next loop pass)
            ports.port = old[1]
            await b.rebind()  # ... and B's device gets A's old port; B's session moves there
            assert b.local_port == old[1]
            await _ping(b)
            assert dtls.identity_of(old) == b_id
            received = b.stats.records_received
            assert stats.misdirected == 0

            release.set()
            # The separate response is made (and sent, or not, in the same step) for `old`,
            # where B's session now is: B must not read it.
            assert await _until(lambda: stats.separate_responses == 1, 10.0)
            with pytest.raises(DtlsTimeout):
                await b.recv(timeout=0.3)
            assert stats.misdirected == 1
            # Its retransmission (RFC 7252 §4.2, after ACK_TIMEOUT) is dropped the same way.
            assert await _until(lambda: stats.misdirected == 2, 10.0)
            assert stats.retransmissions >= 1
            with pytest.raises(DtlsTimeout):
                await b.recv(timeout=0.3)
            assert b.stats.records_received == received
            # B's session itself is unharmed: it is still answered.
            await _ping(b)
        finally:
            a.close()
            b.close()
