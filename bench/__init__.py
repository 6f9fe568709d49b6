"""Benchmark harness: ``make bench`` / ``python -m bench``.

Scenarios (one table row per system, with the ratio to the baseline):

- **T** termination: CON GET /.well-known/core, closed loop, against coap-bridge's proxy,
  libcoap's ``coap-server-notls`` and an aiocoap server (``bench/aiocoap_server.py``).
  T also runs ``coap-bridge+redis``: the proxy in the production shape, started with
  ``--redis-url`` (a redis-server of its own); the target is that row ≥ 0.5 × libcoap.
- **B** block-wise: a 256 KiB resource fetched with Block2 (1024-byte blocks, RFC 7959) by many
  clients at once, each block after block and then again (``bench/blockload.py``); libcoap's
  ``coap-server-notls`` serving what was PUT to /example_data, beside ``coap-bridge+redis`` in
  front of the bench's byte-range HTTP origin (``bench/origin.py``). Block req/s, blocks/s,
  transfers/s, latency per block, server memory per transfer in progress.
- **E** telemetry end to end: CON POST /?t=bench/x with a 100-byte payload through
  proxy → HTTP → API → Redis + Mosquitto (MQTT 5, QoS 1) → 2.04; baseline: aiocoap's do-nothing
  POST. An MQTT subscriber checks that every acknowledged message arrived exactly once.
- **L** latency: E in open loop at 50% of E's measured maximum.
- **R** replicas: E through one ``coap-bridge proxy --workers N`` (SO_REUSEPORT, dedup shared
  in Redis) with ``coap-bridge api --workers M``; the E table names the best N.
- **D** E over DTLS: one device with its own PSK per client (dedup keys on identity and MID),
  sessions established before the clock starts (``bench/dtls_loadgen.py``, tinydtls).
- **H** DTLS handshakes: full handshakes with fresh sessions per second, server CPU each.
- **M** memory: proxy RSS before/after T at full rate; Redis bytes per dedup entry (``cb:dd:*``).

Every row reports the CPU each process used and what limited it (client, server or the
machine's cores). Every proxy gets a free coaps port or ``--coaps-port=off``, never 5684.

A run writes one results JSON (``--results``, default ``build/bench-results.json``);
BENCHMARKS.md's generated section is rendered from it (``python -m bench.report FILE``).

Modules: ``loadgen`` (the CoAP load generator; requests encoded by the product's codec),
``dtls_loadgen`` (the same over DTLS, and handshakes), ``blockload`` (block-wise transfers, B),
``origin`` (B's HTTP origin), ``services`` (processes and probes), ``subscriber`` (the MQTT
witness), ``harness`` (the scenario table and the scenarios), ``report`` (one declarative
table per scenario, rendered from the results JSON).
"""
