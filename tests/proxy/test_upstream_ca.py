"""An ``https`` upstream signed by a CA of its own (issue 18): ``--upstream-ca``.

The CA and the origin's certificate (for 127.0.0.1 and localhost) are made by ``openssl`` for
this module (tests/support/tls.py); the origin is a small TLS server that answers every request
with 200 and the request target. The proxy started by :func:`proxy.server.start_proxy` with
``upstream_ca`` reaches it; without the setting (the system's trust store) or with another CA,
the call is refused (5.02) before any byte of the request goes out.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.errors import UpstreamUnreachable
from proxy.http1 import Http1Upstream, upstream_tls
from proxy.server import start_proxy
from proxy.settings import ProxySettings
from tests.support.tls import Pki, make_pki

Origin = Callable[[], Awaitable[tuple[str, list[bytes]]]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def origin(pki: Pki) -> AsyncIterator[tuple[str, list[bytes]]]:
    """``(base URL, request heads received)`` of an https origin with the test CA's cert."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        heads.append(head)
        target = head.split(b" ", 2)[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))
        await writer.drain()
        writer.close()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}", heads
    finally:
        server.close()
        await server.wait_closed()


async def test_the_running_proxy_reaches_an_origin_signed_by_upstream_ca(
    origin: tuple[str, list[bytes]], pki: Pki
) -> None:
    url, heads = origin
    settings = ProxySettings(coap_host="127.0.0.1", coap_port=0, coaps_port="off",
                             upstream=url, upstream_ca=str(pki.ca))  # fmt: skip
    proxy = await start_proxy(settings)
    try:
        answer = await proxy.upstream.request("POST", f"{url}/ingest", {}, b"x")
    finally:
        await proxy.close()
    assert (answer.status, answer.body) == (200, b"/ingest")
    assert len(heads) == 1


@pytest.mark.parametrize("ca", ["none", "other"])
async def test_without_the_origins_ca_nothing_is_sent(
    origin: tuple[str, list[bytes]], pki: Pki, ca: str
) -> None:
    url, heads = origin
    upstream = Http1Upstream(
        timeout=2.0, tls=upstream_tls(str(pki.other_ca) if ca == "other" else None)
    )
    try:
        with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await upstream.request("POST", f"{url}/secret", {"X-Bridge-Token": "t"}, b"x")
    finally:
        await upstream.aclose()
    assert heads == []


async def test_the_context_checks_host_names_and_takes_a_name_the_certificate_carries(
    origin: tuple[str, list[bytes]], pki: Pki
) -> None:
    url, _ = origin
    port = url.rsplit(":", 1)[1]
    context = upstream_tls(str(pki.ca))
    assert context is not None
    assert context.check_hostname
    upstream = Http1Upstream(timeout=2.0, tls=context)
    try:
        answer = await upstream.request("GET", f"https://localhost:{port}/by-name", {}, b"")
        assert answer.body == b"/by-name"
    finally:
        await upstream.aclose()


def test_a_missing_upstream_ca_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="upstream_ca: cannot read"):
        ProxySettings(upstream_ca=str(tmp_path / "absent.pem"))


def test_an_upstream_ca_that_is_no_certificate_names_the_setting(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match=r"upstream_ca: .* is not a PEM CA bundle"):
        ProxySettings(upstream_ca=str(junk))
