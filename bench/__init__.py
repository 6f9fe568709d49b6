"""Benchmark harness: ``make bench`` / ``python -m bench``.

Scenarios (one table row per system, with the ratio to the baseline):

- **T** termination: CON GET /.well-known/core, closed loop, against coap-bridge's proxy,
  libcoap's ``coap-server-notls`` and an aiocoap server (``bench/aiocoap_server.py``).
- **E** telemetry end to end: CON POST /?t=bench/x with a 100-byte payload through
  proxy → HTTP → API → Redis + Mosquitto (MQTT 5, QoS 1) → 2.04; baseline: aiocoap's do-nothing
  POST. An MQTT subscriber checks that every acknowledged message arrived exactly once.
- **L** latency: E in open loop at 50% of E's measured maximum.
- **M** memory: proxy RSS before/after T at full rate; Redis bytes per dedup entry (``cb:dd:*``).

Modules: ``loadgen`` (the CoAP load generator), ``services`` (processes and probes),
``subscriber`` (the MQTT witness), ``harness`` (scenarios), ``report`` (tables, BENCHMARKS.md).
"""
