"""Benchmark harness: ``make bench`` / ``python -m bench``. The scenarios are listed in
:data:`bench.harness.SCENARIOS`; BENCHMARKS.md says what each measures and why. Modules:
``harness`` (scenarios), ``loadgen`` (the CoAP load generator the other two build on),
``blockload`` (B), ``dtls_loadgen`` (D, H), ``observeload`` (O: observing devices and the
API calls that feed them), ``origin`` (B's HTTP origin), ``services``
(processes and /proc readings), ``subscriber`` (the MQTT witness), ``report`` (results JSON →
BENCHMARKS.md)."""
