"""The proxy's UDP sockets get the receive buffer asked for (proxy/sockets.py): the kernel's
default (net.core.rmem_default) overflows in a burst (benchmark RB), and the kernel caps a
request at net.core.rmem_max silently, so what was granted is read back and a shortfall logged."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from proxy.server import start_proxy
from proxy.settings import ProxySettings
from proxy.sockets import size_receive_buffer
from proxy.state.psk import MemoryPskStore


def _sysctl(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


def _granted(transport: object) -> int:
    sock = transport.get_extra_info("socket")  # type: ignore[attr-defined]
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


async def _proxy(**settings: object):  # type: ignore[no-untyped-def]
    return await start_proxy(
        ProxySettings(
            **{
                "coap_host": "127.0.0.1",
                "coap_port": 0,
                "coaps_port": 0,
                "upstream": "http://127.0.0.1:9",
                "proxy_token": "t",
                **settings,
            }
        ),
        psk_store=MemoryPskStore({}),
    )


async def test_both_listeners_get_the_buffer_asked_for() -> None:
    wanted = min(1 << 20, _sysctl("rmem_max"))
    assert wanted > _sysctl("rmem_default")  # else this machine cannot show a difference
    proxy = await _proxy(udp_receive_buffer=wanted)
    try:
        assert proxy.dtls is not None
        # Linux reports twice what was set (socket(7), SO_RCVBUF).
        assert _granted(proxy.transport) == 2 * wanted
        assert _granted(proxy.dtls) == 2 * wanted
    finally:
        await proxy.close()


async def test_zero_keeps_the_kernel_default() -> None:
    proxy = await _proxy(udp_receive_buffer=0)
    try:
        assert _granted(proxy.transport) == _sysctl("rmem_default")
    finally:
        await proxy.close()


def test_a_request_over_the_kernel_cap_is_logged_naming_the_sysctl(
    caplog: pytest.LogCaptureFixture,
) -> None:
    over = _sysctl("rmem_max") * 4
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, caplog.at_level(logging.INFO):
        granted = size_receive_buffer(sock, over, "test listener")
    assert granted == 2 * _sysctl("rmem_max")
    [record] = [r for r in caplog.records if r.name == "proxy.sockets"]
    assert record.levelno == logging.WARNING
    assert "net.core.rmem_max" in record.getMessage()
    assert "test listener" in record.getMessage()


def test_the_setting_is_bounded() -> None:
    with pytest.raises(ValueError, match="udp_receive_buffer"):
        ProxySettings(upstream="http://127.0.0.1:9", udp_receive_buffer=-1)
