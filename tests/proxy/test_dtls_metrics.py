"""The DTLS counters reach /metrics (proxy/metrics.py): each DtlsStats field that the
Connection ID work added is exported under its documented name, read at scrape time from a real
proxy's transport."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import ProxyCollector
from proxy.server import start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_connection_id_counters_are_exported() -> None:
    proxy = await start_proxy(
        ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port=0,
            upstream="http://127.0.0.1:9",
            proxy_token="t",
        ),
        psk_store=MemoryPskStore({}),
    )
    try:
        assert proxy.dtls is not None
        stats = proxy.dtls.stats
        stats.parked, stats.unsent_parked, stats.address_updates = 3, 5, 7
        stats.dropped_unknown_cid, stats.cid_not_moved = 11, 13
        registry = CollectorRegistry()
        registry.register(ProxyCollector(proxy))
        assert proxy.dtls_driver is not None
        proxy.dtls_driver.stats.misdirected = 17
        samples = _samples(generate_latest(registry).decode())
        assert samples["coap_bridge_dtls_parked_total", ()] == 3
        assert samples["coap_bridge_dtls_address_updates_total", ()] == 7
        dropped = "coap_bridge_dtls_dropped_total"
        assert samples[dropped, (("reason", "unsent_parked"),)] == 5
        assert samples[dropped, (("reason", "unknown_cid"),)] == 11
        assert samples[dropped, (("reason", "cid_not_moved"),)] == 13
        assert samples["coap_bridge_dtls_cid_sessions", ()] == 0
        misdirected = "coap_bridge_proxy_misdirected_total"
        assert samples[misdirected, (("transport", "coaps"),)] == 17
        assert samples[misdirected, (("transport", "coap"),)] == 0
    finally:
        await proxy.close()
