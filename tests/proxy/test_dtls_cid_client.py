"""The tests' own DTLS 1.2 Connection ID client (tests/support/dtls_cid_client.py), checked
against two servers: the proxy's (tinydtls with our Connection ID patch, issue 19) and
OpenSSL 3's ``s_server``, which has no Connection ID; its PRF against OpenSSL's TLS1-PRF.

What a server without RFC 9146 support must do with a client that offers the extension is to
ignore it: the handshake completes and no CID is used (RFC 9146 §3, RFC 5246 §7.4.1.4)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from proxy.coap.codec import ACK, decode
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore
from tests.support.bridge import running_bridge
from tests.support.coap import request_datagram
from tests.support.dtls import dtls_ready
from tests.support.dtls_cid_client import (
    CT_APPLICATION_DATA,
    CT_TLS12_CID,
    CidClient,
    DtlsAlert,
    DtlsClientError,
    DtlsHandshakeError,
    DtlsTimeout,
    prf,
)
from tests.support.http import free_port

CONTENT = 69  # 2.05
GET = 1
IDENTITY, PSK = "cid-client-test", "0123456789abcdef"


@contextlib.asynccontextmanager
async def tinydtls_server(tmp_path: Path, **settings: object) -> AsyncIterator[RunningProxy]:
    """The proxy in this process, coaps on a free port, PSKs from a memory store. No upstream
    is needed: /.well-known/core is answered by the proxy from its route table."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/thing"\nmethods = ["GET"]\ntarget = "/thing"\n')
    proxy = await start_proxy(
        ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port=0,
            upstream="http://127.0.0.1:9",
            policy=str(policy),
            proxy_token="t",
            **settings,  # type: ignore[arg-type]
        ),
        psk_store=MemoryPskStore({IDENTITY: PSK}),
    )
    try:
        yield proxy
    finally:
        await proxy.close()


def dtls_port(proxy: RunningProxy) -> int:
    address = proxy.dtls_address
    assert address is not None
    return address[1]


async def well_known_core(client: CidClient, mid: int = 0x1234) -> bytes:
    answer = decode(await client.request(request_datagram(GET, mid, "/.well-known/core"), 2.0))
    assert (answer.mtype, answer.code, answer.mid) == (ACK, CONTENT, mid)
    return answer.payload


@pytest.mark.parametrize("offer_cid", [None, b"", b"\x01\x02\x03\x04"], ids=["none", "empty", "4"])
async def test_handshake_and_request_against_the_tinydtls_server(tmp_path, offer_cid) -> None:
    async with tinydtls_server(tmp_path) as proxy:
        client = CidClient(IDENTITY.encode(), PSK.encode(), offer_cid=offer_cid)
        try:
            await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            assert client.extended_master_secret  # tinydtls answers the RFC 7627 offer
            if offer_cid is None:
                assert client.negotiated_cid is None
            else:
                # Our server gives every CID session a CID of its own (issue 19); the client
                # then sends tls12_cid records, and with offer_cid b"\x01…" drops any record
                # from the server that is not tls12_cid with that CID (RFC 9146 §3).
                assert client.negotiated_cid
            assert b"</thing>" in await well_known_core(client)
            assert client.stats.handshakes == 1
            # ClientHello twice, ClientKeyExchange, ChangeCipherSpec, Finished, the request.
            assert client.stats.records_sent == 6
            # HelloVerifyRequest, ServerHello, ServerHelloDone, ChangeCipherSpec, Finished, answer
            assert client.stats.records_received == 6
            assert client.stats.records_dropped == 0
        finally:
            client.close()
        assert proxy.dtls is not None
        for _ in range(50):  # the close_notify ends the server's session
            if proxy.dtls.stats.closed_by_peer:
                break
            await asyncio.sleep(0.02)
        assert proxy.dtls.stats.closed_by_peer == 1


async def test_without_extended_master_secret_the_rfc_5246_master_secret_is_used(tmp_path) -> None:
    async with tinydtls_server(tmp_path) as proxy:
        client = CidClient(
            IDENTITY.encode(), PSK.encode(), extended_master_secret=False, renegotiation_info=False
        )
        try:
            await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            assert not client.extended_master_secret
            assert b"</thing>" in await well_known_core(client)
        finally:
            client.close()


async def test_a_server_that_insists_on_extended_master_secret_aborts_with_an_alert(
    tmp_path,
) -> None:
    async with tinydtls_server(tmp_path, dtls_require_extended_master_secret=True) as proxy:
        client = CidClient(IDENTITY.encode(), PSK.encode(), extended_master_secret=False)
        try:
            with pytest.raises(DtlsAlert) as alert:
                await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            # tinydtls 0.8.6 aborts with close_notify (a warning), not handshake_failure.
            assert alert.value.name in ("close_notify", "handshake_failure")
            assert client.stats.handshakes == 0
        finally:
            client.close()
        client = CidClient(IDENTITY.encode(), PSK.encode())  # both extensions: it completes
        try:
            await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            assert client.extended_master_secret
            assert b"</thing>" in await well_known_core(client)
        finally:
            client.close()


async def test_a_wrong_psk_never_gets_a_finished(tmp_path) -> None:
    async with tinydtls_server(tmp_path) as proxy:
        client = CidClient(IDENTITY.encode(), b"not the key", offer_cid=b"\x07", retransmit=0.3)
        try:
            with pytest.raises(DtlsHandshakeError, match="no answer to flight 5") as failed:
                await client.connect("127.0.0.1", dtls_port(proxy), timeout=1.0)
            assert "sending it" in str(failed.value)
            assert client.stats.handshakes == 0
            assert client.stats.flights_retransmitted >= 1  # flight 5 went out again
            with pytest.raises(DtlsClientError, match="before connect"):
                client.send(b"x")
        finally:
            client.close()


async def test_after_a_rebinding_a_session_without_cid_is_not_found(tmp_path) -> None:
    """Today (and for clients without CID after issue 19) the session is keyed by address:
    records from a new source port are dropped, so the client must handshake again."""
    async with tinydtls_server(tmp_path) as proxy:
        client = CidClient(IDENTITY.encode(), PSK.encode())
        try:
            await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            await well_known_core(client, 1)
            before = client.local_port
            await client.rebind()
            assert client.local_port != before
            with pytest.raises(DtlsTimeout):
                await well_known_core(client, 2)
            assert proxy.dtls is not None
            assert proxy.dtls.stats.dropped_stateless >= 1
            await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            await well_known_core(client, 3)
            assert client.stats.handshakes == 2
        finally:
            client.close()


async def test_a_forged_record_is_dropped_and_the_session_goes_on(tmp_path) -> None:
    async with tinydtls_server(tmp_path) as proxy:
        client = CidClient(IDENTITY.encode(), PSK.encode())
        try:
            await client.connect("127.0.0.1", dtls_port(proxy), timeout=3.0)
            record = bytearray(client.seal(CT_APPLICATION_DATA, request_datagram(GET, 9, "/x")))
            record[-1] ^= 1  # the tag no longer verifies
            client.send_raw(bytes(record))
            with pytest.raises(DtlsTimeout):
                await client.recv(0.3)
            await well_known_core(client, 10)
        finally:
            client.close()


@pytest.mark.integration
async def test_coap_bridge_up_with_a_psk_registered_through_the_api(tmp_path) -> None:
    coaps_port = free_port(socket.SOCK_DGRAM)
    extra = ["--coaps-host", "127.0.0.1", "--coaps-port", str(coaps_port)]
    async with running_bridge(tmp_path, extra=extra) as bridge:
        await dtls_ready(coaps_port)
        iccid, psk = "89882806660005990001", "fedcba9876543210"
        await bridge.register(iccid, "10.9.9.9")
        async with bridge.api() as api:
            reply = await api.put(f"/devices/{iccid}/psk", json={"psk": psk, "format": "plain"})
            assert reply.status_code == 204, reply.text
        client = CidClient(iccid.encode(), psk.encode(), offer_cid=b"\xca\xfe")
        try:
            await client.connect("127.0.0.1", coaps_port, timeout=3.0)
            assert client.negotiated_cid  # the product negotiates RFC 9146 (issue 19)
            assert b"</" in await well_known_core(client, 1)
            await client.rebind()  # a NAT rebinding: the session continues by its CID
            assert b"</" in await well_known_core(client, 2)
            assert client.stats.handshakes == 1
        finally:
            client.close()


def _need_openssl() -> None:
    # `make test` installs it (Makefile TEST_DEBS): missing means a broken set-up, not a pass.
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is missing: install the Debian package openssl")


@pytest.mark.interop
@pytest.mark.parametrize("ems", [True, False])
async def test_against_openssl_s_server(ems) -> None:
    """A second, unrelated implementation: OpenSSL 3's DTLS 1.2 server with the same suite."""
    _need_openssl()
    port = free_port(socket.SOCK_DGRAM)
    server = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-dtls1_2", "-nocert", "-accept", f"127.0.0.1:{port}",
        "-psk", PSK.encode().hex(), "-psk_identity", IDENTITY, "-cipher", "PSK-AES128-CCM8",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert server.stdin is not None
    assert server.stdout is not None
    client = CidClient(
        IDENTITY.encode(), PSK.encode(), offer_cid=b"\x01", extended_master_secret=ems
    )
    try:
        while b"ACCEPT" not in await asyncio.wait_for(server.stdout.readline(), 5.0):
            pass
        await client.connect("127.0.0.1", port, timeout=3.0)
        assert client.extended_master_secret is ems
        assert client.negotiated_cid is None  # OpenSSL 3.0 has no RFC 9146
        client.send(b"to the server\n")
        server.stdin.write(b"to the client\n")
        await server.stdin.drain()
        assert await client.recv(2.0) == b"to the client\n"
        lines = []
        while b"to the server" not in (line := await asyncio.wait_for(server.stdout.readline(), 2)):
            lines.append(line)
        assert b"CIPHER is PSK-AES128-CCM8" in b"".join(lines)
    finally:
        client.close()
        server.kill()
        await server.wait()


def test_prf_matches_openssl_tls1_prf() -> None:
    _need_openssl()
    secret, seed = os.urandom(48), os.urandom(64)
    run = subprocess.run(
        ["openssl", "kdf", "-keylen", "100", "-kdfopt", "digest:SHA256",
         "-kdfopt", f"hexsecret:{secret.hex()}", "-kdfopt", f"hexseed:{b'key expansion'.hex()}",
         "-kdfopt", f"hexseed:{seed.hex()}", "TLS1-PRF"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        prf(secret, b"key expansion", seed, 100).hex()
        == run.stdout.strip().replace(":", "").lower()
    )


def test_cid_record_layout_follows_rfc_9146() -> None:
    """The bytes helper C's server must accept: header with the CID after the sequence number,
    explicit nonce, AES-CCM-8 over DTLSInnerPlaintext with the §5.3 additional data."""
    client = CidClient(b"id", b"key", offer_cid=b"")
    key, iv = os.urandom(16), os.urandom(4)
    client._write = (AESCCM(key, tag_length=8), iv)
    client.negotiated_cid = cid = b"\xab\xcd\xef"
    client._write_seq = [0, 5]
    record = client.seal(CT_APPLICATION_DATA, b"coap")
    epoch_seq = b"\x00\x01" + (5).to_bytes(6, "big")
    assert record[:11] == bytes([CT_TLS12_CID]) + b"\xfe\xfd" + epoch_seq
    assert record[11:14] == cid
    (length,) = struct.unpack("!H", record[14:16])
    assert length == len(record) - 16 == 8 + 5 + 8  # explicit nonce, inner plaintext, tag
    assert record[16:24] == epoch_seq  # nonce_explicit = epoch + sequence number (RFC 6655)
    aad = b"\xff" * 8 + bytes([25, 3, 25]) + b"\xfe\xfd" + epoch_seq + cid + b"\x00\x05"
    inner = AESCCM(key, tag_length=8).decrypt(iv + epoch_seq, record[24:], aad)
    assert inner == b"coap" + bytes([CT_APPLICATION_DATA])  # content, real_type, no zeros
