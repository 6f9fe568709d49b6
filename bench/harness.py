"""The scenarios, listed in :data:`SCENARIOS` (name → method, systems, description): start the
systems (:mod:`bench.services`), drive them with :mod:`bench.loadgen` (B:
:mod:`bench.blockload`, D and H: :mod:`bench.dtls_loadgen`), stop them, and collect one row
(a dict, as it goes into the results JSON) per system."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import secrets
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from bench import blockload, cid_loadgen, dtls_loadgen, loadgen, observeload, services
from bench.blockload import BlockConfig
from bench.dtls_loadgen import Credential, DtlsLoadConfig
from bench.loadgen import LoadConfig, LoadResult, RequestSpec
from bench.observeload import Call, Fleet
from bench.services import Service, cpu_seconds, free_port, rss_bytes, start_redis
from bench.subscriber import Subscriber, check_delivery

DEVICE = {"iccid": "8988280666000000001", "ip": "127.0.0.1", "status": "active"}
TOPIC = "bench/x"
# The production shape: the proxy with --redis-url (a redis-server of its own) for the
# cross-replica claim (docs/ARCHITECTURE.md, gate.py).
REDIS_SYSTEM = "coap-bridge+redis"
SYSTEMS = ("coap-bridge", REDIS_SYSTEM, "libcoap", "aiocoap")
# B: libcoap's example server holds what was PUT to /example_data and serves it block-wise;
# the proxy serves the bench's HTTP origin (bench/origin.py, byte ranges) through a route.
B_SYSTEMS = ("libcoap", REDIS_SYSTEM)
B_PATHS = {"libcoap": "/example_data", REDIS_SYSTEM: "/blob"}
# F: a firmware image through the whole chain (proxy → API → Redis, docs/API.md "Firmware"),
# beside libcoap's example server holding the same bytes.
F_SYSTEMS = ("libcoap", "coap-bridge")
F_VERSION = "bench-1.0.0"
F_PATHS = {"libcoap": "/example_data", "coap-bridge": f"/firmware/{F_VERSION}"}
# A GET safe to repeat, so no cross-replica claim (docs/ARCHITECTURE.md), as docs/API.md
# "Firmware" shows it.
FIRMWARE_POLICY = (
    '[[route]]\npath = "/firmware/{version}"\nmethods = ["GET"]\n'
    'target = "/firmware/{version}"\nidempotent = true\n'
)
DTLS_SYSTEM = "coap-bridge over DTLS"
# ET: E's load from a device with a payload template (docs/API.md, "Payload templates"): the
# API translates each 100-byte payload into JSON before publishing. Ten fields of every kind
# over E's payload, the sequence id first so the witness finds it in the JSON; no location
# field, so the row measures the translation and not a location write per message.
TEMPLATE_SYSTEM = "coap-bridge, 10-field template"
# EO: the proxy as an operator runs it (docs/OPERATIONS.md): metrics listener on, request log at
# info, and both /metrics scraped every second during the run.
OBSERVED_SYSTEM = "coap-bridge, metrics scraped + info log"
SCRAPE_INTERVAL = 1.0
SEQ_KEY = "seq"
TEMPLATE_10: dict[str, Any] = {
    "sense": [
        {"asset": SEQ_KEY, "value": {"byte": 0, "bytelength": 8, "type": "uint"}},
        {"asset": "env.temperature",
         "value": {"byte": 8, "bytelength": 2, "type": "int", "scale": 0.01}},
        {"asset": "env.humidity", "value": {"byte": 10, "bytelength": 1, "type": "uint"}},
        {"asset": "env.pressure", "value": {"byte": 12, "bytelength": 4, "type": "float"}},
        {"asset": "battery.mv",
         "value": {"byte": 16, "bytelength": 2, "type": "uint", "byteorder": "little"}},
        {"asset": "battery.low", "value": {"byte": 18, "bytelength": 1, "type": "boolean"}},
        {"asset": "gps.lat", "value": {"byte": 20, "bytelength": 8, "type": "float"}},
        {"asset": "counter", "value": {"byte": 28, "bytelength": 3, "type": "uint"}},
        {"asset": "flags.mode",
         "value": {"byte": 31, "bytelength": 1, "type": "uint", "bit": 0, "bitlength": 3}},
        {"asset": "name", "value": {"byte": 32, "bytelength": 8, "type": "string"}},
    ]
}  # fmt: skip
R_SYSTEM = "coap-bridge --workers N"
# RB: sessions that offer a (zero-length) Connection ID, RFC 9146; and the same without CID.
RB_SYSTEM = "coap-bridge, CID sessions"
RB_PLAIN = "coap-bridge, sessions without CID"
RB_STEPS = 5  # RB: the sessions are set up in this many steps, the RSS read after each
EXCHANGE_LIFETIME = 247.0  # RFC 7252 §4.8.2
Row = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    method: str  # the Bench method that runs it (one method may run several scenarios)
    systems: tuple[str, ...]  # the rows it adds
    description: str


# In the order they run: D and H before R, which may restart the API with more workers.
SCENARIOS = {
    "T": Scenario("scenario_t", SYSTEMS, "termination: CON GET /.well-known/core, closed loop"),
    "B": Scenario("scenario_b", B_SYSTEMS, "block-wise GET of a large resource, Block2"),
    "E": Scenario(
        "scenario_e", ("aiocoap", "coap-bridge"),
        "telemetry end to end: CON POST through proxy, API, Redis, MQTT; aiocoap baseline",
    ),
    "L": Scenario("scenario_e", ("coap-bridge",), "E in open loop at 50% of E's maximum"),
    "ET": Scenario(
        "scenario_et", ("coap-bridge", TEMPLATE_SYSTEM),
        "E from a device with a 10-field payload template (JSON published), beside E raw",
    ),
    "EO": Scenario(
        "scenario_eo", ("coap-bridge", OBSERVED_SYSTEM),
        "E with the proxy's metrics listener on, log level info, /metrics scraped each second",
    ),
    "D": Scenario("scenario_dtls", (DTLS_SYSTEM,), "E over DTLS, one PSK per client"),
    "H": Scenario("scenario_dtls", ("coap-bridge",), "full DTLS handshakes per second"),
    "RB": Scenario(
        "scenario_rb", (RB_SYSTEM, RB_PLAIN),
        "rebinding: N idle DTLS sessions with a Connection ID change source port at once, one "
        "CON request each; memory per idle session with and without CID",
    ),
    "O": Scenario(
        "scenario_o", ("coap-bridge",),
        "observing devices (Observe), one command each queued over HTTP and fanned out",
    ),
    "F": Scenario(
        "scenario_f", F_SYSTEMS,
        "firmware downloads: one image block-wise by many clients through proxy, API, Redis",
    ),
    "R": Scenario("scenario_r", (R_SYSTEM,), "E through proxy --workers N (SO_REUSEPORT)"),
    "M": Scenario("scenario_m", ("coap-bridge",), "memory: proxy RSS over T, Redis per entry"),
}  # fmt: skip
CHAIN = {
    "scenario_e",
    "scenario_et",
    "scenario_eo",
    "scenario_dtls",
    "scenario_rb",
    "scenario_o",
    "scenario_f",
    "scenario_r",
}  # one Redis, Mosquitto, API
# What runs without --scenarios: all of them (O, 10,000 devices, adds about 90 s).
DEFAULT_SCENARIOS = list(SCENARIOS)


@dataclass
class Settings:
    """What a run was asked to do (``python -m bench --help`` says what each is)."""

    scenarios: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))
    t_systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    b_systems: list[str] = field(default_factory=lambda: list(B_SYSTEMS))
    duration: float = 10.0  # measured window of T and L
    e_duration: float = 15.0
    l_duration: float = 10.0
    warmup: float = 2.0
    m_duration: float = 60.0
    h_duration: float = 5.0
    b_duration: float = 10.0
    clients: int = 64
    loadgen_workers: int = 1
    proxy_workers: int = 1
    api_workers: int = 1
    timeout: float = 5.0
    workdir: Path = Path()
    quick: bool = False
    r_workers: int = 2  # R: proxy --workers (SO_REUSEPORT, dedup shared in Redis)
    r_api_workers: int = 2
    dtls_clients: int = 64  # D: sessions, one PSK identity (device) each
    dtls_loadgen_workers: int = 1
    h_workers: int = 1
    h_concurrency: int = 8  # handshakes in flight per worker
    rb_sessions: int = 4000  # RB: idle DTLS sessions, one PSK identity (device) each
    rb_concurrency: int = 32  # RB: handshakes at once while the sessions are set up
    rb_timeout: float = 30.0  # RB: how long the requests after the rebinding may take
    # M must keep every exchange (COAP_BRIDGE_DEDUP_MAX_ENTRIES), or bytes/exchange would be
    # measured on evicted entries.
    m_dedup_max_entries: int = 100_000_000
    b_clients: int = 32
    b_size: int = 256 * 1024
    b_block_size: int = 1024
    b_loadgen_workers: int = 1
    o_devices: int = 10_000  # O: observing devices, one loopback address and socket each
    o_memory_devices: int = 0  # O: devices whose commands wait (Redis memory); 0: o_devices
    o_loadgen_workers: int = 1  # O: device processes
    o_concurrency: int = 64  # O: HTTP requests in flight (device set-up, commands)
    o_window: int = 256  # O: registrations in flight per device process
    o_timeout: float = 120.0  # O: how long the fan-out may take after the last POST
    f_clients: int = 32  # F: clients, each downloading the whole image
    f_size: int = 1024 * 1024  # F: the image's bytes
    f_block_size: int = 1024
    f_duration: float = 10.0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workdir"}


_BULK = {"hist", "overflow", "acked_seqs"}
_DERIVED = ("rate", "p50_ms", "p99_ms", "p999_ms", "blocks_per_second", "transfers_per_second")


def figures(result: LoadResult) -> Row:
    """What a row of the results JSON keeps of a load's result."""
    data = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in _BULK}
    return data | {name: getattr(result, name) for name in _DERIVED}


def verdict(result: LoadResult, lost: int, duplicated: int) -> str:
    """A telemetry row (E, L, R, D) is OK only when requests were sent, every one was answered
    2.04 (no timeouts, no other code) and MQTT delivered each acknowledged one exactly once."""
    answered = result.sent > 0 and result.timeouts == 0 and result.codes == {"2.04": result.sent}
    return "OK" if answered and lost == 0 and duplicated == 0 else "FAILED"


def f_figures(result: LoadResult, cpu: dict[str, float], blocks: int) -> Row:
    """F's own figures: CPU µs per block of each server process (over every answered block,
    warm-up included, as the CPU was read), whole images per second (blocks/s over the
    image's blocks: at 1 MiB a transfer may outlast the window), and the verdict: OK only if
    blocks were answered, each 2.05 with the right bytes, no ETag change, no timeout."""
    done = result.completed
    per_block = {
        f"{name}_cpu_us_per_block": seconds / done * 1e6 if done else None
        for name, seconds in cpu.items() if name != "load generator"
    }  # fmt: skip
    clean = (
        done > 0 and result.blocks_in_window > 0 and result.codes == {"2.05": done}
        and result.corrupt == result.etag_changes == result.timeouts == result.restarts == 0
    )  # fmt: skip
    return per_block | {
        "image_transfers_per_second": result.blocks_per_second / blocks if blocks else 0.0,
        "status": "OK" if clean else "FAILED",
    }


class SourcePorts:
    """Disjoint blocks of client source ports below the kernel's ephemeral range (so no
    connect() elsewhere lands on them), one per load run: no (port, MID) pair repeats within a
    harness run, even between two runs against the same server (E then L)."""

    def __init__(self, block: int = 1000) -> None:
        self.next, self.block = 10000 + (os.getpid() % 8) * 100, block

    def take(self, blocks: int = 1) -> tuple[int, int]:
        size = self.block * blocks
        low = self.next if self.next + size <= 32768 else 10000  # wrapped: after many runs
        self.next = low + size
        return low, low + size


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ports = SourcePorts()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.redis_dedup: dict[str, Any] | None = None
        self.loadavg_start = os.getloadavg()
        self.seq_tag = 0
        self.chain: dict[str, Service] = {}  # redis, mosquitto, api, proxy of the running chain
        self.chain_stack = contextlib.ExitStack()
        self.chain_error: str | None = None
        self.urls: dict[str, str] = {}
        self.workers = {"api": 0, "proxy": 0}  # of the running chain
        self.secrets = {"api": secrets.token_urlsafe(16), "proxy": secrets.token_urlsafe(16)}
        self.dtls_batch = 0
        self.retried: dict[str, int] = {}  # O: API calls answered 503 and made again, by phase
        self.retry_reasons: set[str] = set()

    def log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    @contextlib.contextmanager
    def row(self, scenario: str, system: str) -> Iterator[Row]:
        """A row, added to the results when the block ends; an exception in the block becomes
        the row's error (the other scenarios still run)."""
        row: Row = {"scenario": scenario, "system": system}
        try:
            yield row
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            self.log(f"  ERROR {row['error']}")
        self.rows.append(row)

    def measure(self, row: Row, run: Callable[[], LoadResult], watch: dict[str, Service]) -> Any:
        """``run()``; its figures and the CPU seconds each ``watch`` process (with its
        children), the load generator and the rest of the machine spent meanwhile go to
        ``row``. Every watched process must still be alive after it."""
        before = {name: cpu_seconds(service.pid) for name, service in watch.items()}
        own, machine, t0 = os.times(), services.machine_cpu_seconds(), time.monotonic()
        result = run()
        wall = time.monotonic() - t0
        machine = services.machine_cpu_seconds() - machine
        cpu = {name: cpu_seconds(watch[name].pid) - sec for name, sec in before.items()}
        # The harness process and its joined children: the load generator's workers.
        cpu["load generator"] = sum(os.times()[:4]) - sum(own[:4])
        # Whatever else ran on the machine meanwhile (other people's tests: noise).
        other = max(0.0, machine - sum(cpu.values()))
        row |= figures(result) | {"cpu": cpu, "wall": wall, "other_cpu": other}
        used = ", ".join(f"{k} {v:.1f} ({100 * v / wall:.0f}%)" for k, v in cpu.items())
        outside = f"outside the bench {other:.1f} ({100 * other / max(wall, 1e-9):.0f}%)"
        self.log(
            f"  {result.summary()}\n  CPU s (% of a core) over {wall:.1f} s: {used}; {outside}"
        )
        for service in watch.values():
            service.check_alive()
        return result

    def load(
        self, row: Row, port: int, spec: RequestSpec, duration: float, watch: dict[str, Service],
        *, warmup: float | None = None, mode: str = "closed", rate: float = 0.0,
    ) -> LoadResult:  # fmt: skip
        s = self.settings
        self.seq_tag += 1
        config = LoadConfig(
            "127.0.0.1", port, spec, mode, s.clients, rate, duration,
            s.warmup if warmup is None else warmup, s.timeout, s.loadgen_workers,
            self.ports.take(), self.seq_tag << 56,
        )  # fmt: skip
        result: LoadResult = self.measure(row, lambda: loadgen.run_load(config), watch)
        return result

    def server(self, stack: contextlib.ExitStack, system: str, **proxy: Any) -> tuple[Service, int]:
        """``system`` answering CoAP, stopped when ``stack`` closes: (service, port)."""
        work = self.settings.workdir
        if system == "coap-bridge":
            proxy.setdefault("workers", self.settings.proxy_workers)
            service, port = services.start_proxy(work, **proxy)
        else:
            service, port = services.start_baseline(work, system)
        stack.callback(service.stop)
        return service, port

    def redis(self, stack: contextlib.ExitStack, name: str) -> tuple[Service, str]:
        service, url = start_redis(self.settings.workdir / name)
        stack.callback(service.stop)
        return service, url

    # --- T, M: termination and memory ------------------------------------------------------

    def scenario_t(self) -> None:
        for system in self.settings.t_systems:
            self.log(f"T: {system}, CON GET /.well-known/core, closed loop")
            with self.row("T", system) as row, contextlib.ExitStack() as stack:
                watch, proxy = {}, {}
                if system == REDIS_SYSTEM:
                    watch["redis"], proxy["redis_url"] = self.redis(stack, "redis-t")
                name = "coap-bridge" if system == REDIS_SYSTEM else system
                watch[name], port = self.server(stack, name, **proxy)
                self.load(row, port, RequestSpec(), self.settings.duration, watch)

    def scenario_m(self) -> None:
        s = self.settings
        self.log(f"M: proxy RSS before/after T at full rate for {s.m_duration:g} s")
        with self.row("M", "coap-bridge") as row, contextlib.ExitStack() as stack:
            env = {"COAP_BRIDGE_DEDUP_MAX_ENTRIES": str(s.m_dedup_max_entries)}
            service, port = self.server(stack, "coap-bridge", env=env)
            time.sleep(0.5)
            with rss_sampled(service.pid, max(1.0, s.m_duration / 6)) as samples:
                watch = {"coap-bridge": service}
                result = self.load(row, port, RequestSpec(), s.m_duration, watch, warmup=0.0)
            before, after = samples[0][1], rss_bytes(service.pid)
            if samples[-1][0] < result.window - 1:
                samples.append((result.window, after))
            held = round(result.sent * min(1.0, EXCHANGE_LIFETIME / s.m_duration))
            if s.m_duration <= EXCHANGE_LIFETIME:
                self.notes.append(
                    f"M ran {s.m_duration:g} s, less than the 247 s exchange lifetime: no entry "
                    "expired yet, so it shows growth per exchange, not the plateau "
                    "(run with --m-duration 300 to see RSS level off)."
                )
            per = (after - before) / held if held else None
            row |= {"rss_before": before, "rss_after": after, "rss_delta": after - before,
                    "exchanges_held": held, "bytes_per_exchange": per,
                    "rss_samples": samples}  # fmt: skip
            self.log(f"  RSS {before / 2**20:.1f} MiB → {after / 2**20:.1f} MiB over {held} "
                     f"exchanges: {per or 0:.0f} B/exchange")  # fmt: skip

    # --- B: block-wise -----------------------------------------------------------------------

    def scenario_b(self) -> None:
        s = self.settings
        for system in s.b_systems:
            self.log(f"B: {system}, {s.b_size // 1024} KiB fetched block-wise (Block2, "
                     f"{s.b_block_size} B) by {s.b_clients} clients, closed loop")  # fmt: skip
            with self.row("B", system) as row:
                with contextlib.ExitStack() as stack:
                    port, started = self._block_server(system, stack)
                    self._block_run(row, system, port, started)
                if "origin" in started:
                    # Printed by the origin as it stopped: how the proxy fetched the blocks.
                    answers = _origin_answers(started["origin"].log_path)
                    blocks = row["completed"] + row["blocks_per_transfer"]
                    row["origin_answers"] = answers
                    row["origin_requests_per_block"] = sum(answers.values()) / blocks
                    self.log(f"  origin answers {answers}, during the run and the check")

    def _block_server(
        self, system: str, stack: contextlib.ExitStack
    ) -> tuple[int, dict[str, Service]]:
        """``system`` serving the B resource: (CoAP port, its processes, the server first)."""
        s, path, work = self.settings, B_PATHS[system], self.settings.workdir / "b"
        work.mkdir(parents=True, exist_ok=True)
        if system == "libcoap":
            return self._libcoap_holding(
                stack, blockload.resource_body(s.b_size), work, s.b_block_size
            )
        origin, origin_port = services.start_origin(s.workdir, path, s.b_size)
        stack.callback(origin.stop)
        redis, redis_url = self.redis(stack, "redis-b")
        # A GET that is safe to repeat: no cross-replica claim needed (docs/ARCHITECTURE.md).
        policy = work / "policy.toml"
        policy.write_text(f'[[route]]\npath = "{path}"\nmethods = ["GET"]\ntarget = "{path}"\n'
                          "idempotent = true\n")  # fmt: skip
        proxy, port = self.server(
            stack, "coap-bridge", upstream=f"http://127.0.0.1:{origin_port}", redis_url=redis_url,
            extra=["--policy", str(policy), "--block-size", str(s.b_block_size)],
        )  # fmt: skip
        return port, {"proxy": proxy, "redis": redis, "origin": origin}

    def _libcoap_holding(
        self, stack: contextlib.ExitStack, body: bytes, work: Path, block_size: int
    ) -> tuple[int, dict[str, Service]]:
        """libcoap's example server holding ``body`` at /example_data: (port, its process)."""
        service, port = self.server(stack, "libcoap")
        upload = work / "resource.bin"
        upload.write_bytes(body)
        # The example server keeps what a PUT to /example_data carried and serves it
        # block-wise (its default block handling, -L 1).
        subprocess.run(
            [services.which("coap-client-notls"), "-m", "put", "-b", str(block_size),
             "-f", str(upload), f"coap://127.0.0.1:{port}/example_data"],
            capture_output=True, timeout=30, check=True,
        )  # fmt: skip
        return port, {"libcoap": service}

    @staticmethod
    def _whole_once(port: int, path: str, body: bytes, block_size: int) -> tuple[int, bytes]:
        """One whole transfer before the load: the resource is there, every byte right, no
        datagram over the block size (it also warms the server up): (blocks, ETag)."""
        got, sizes, etag = blockload.fetch_once("127.0.0.1", port, path, block_size, 5.0)
        if got != body or max(sizes) > block_size:
            raise RuntimeError(f"{path}: {len(got)} bytes in blocks up to {max(sizes)} B")
        return len(sizes), etag or b""

    def _block_run(self, row: Row, system: str, port: int, started: dict[str, Service]) -> None:
        s, path = self.settings, B_PATHS[system]
        body = blockload.resource_body(s.b_size)
        blocks, etag = self._whole_once(port, path, body, s.b_block_size)
        time.sleep(0.3)
        config = BlockConfig(
            "127.0.0.1", port, clients=s.b_clients, duration=s.b_duration, warmup=s.warmup,
            timeout=s.timeout, workers=s.b_loadgen_workers, port_range=self.ports.take(),
            path=path, size=s.b_size, block_size=s.b_block_size,
        )  # fmt: skip
        server = next(iter(started.values()))
        with rss_sampled(server.pid, min(0.5, max(0.1, s.b_duration / 20))) as samples:
            self.measure(row, lambda: blockload.run_blocks(config), started)
        # The load starts ~0.05 s after the sampler (0.5 s more with forked workers).
        begin = 0.05 + (0.5 + 0.05 * s.b_loadgen_workers if s.b_loadgen_workers > 1 else 0.0)
        end = begin + s.warmup + s.b_duration
        memory = block_memory(
            samples[1:], samples[0][1], end - s.b_duration, end, s.b_clients, begin
        )
        row |= {"clients": s.b_clients, "resource_bytes": s.b_size, "block_size": s.b_block_size,
                "blocks_per_transfer": blocks, "etag": etag.hex() if etag else None,
                **memory}  # fmt: skip
        upper, fitted = memory["rss_per_transfer"] or 0, memory["rss_per_transfer_corrected"] or 0
        self.log(f"  RSS per transfer in progress {fitted / 1024:.1f} KiB (≤ {upper / 1024:.1f})")

    # --- F: firmware downloads ----------------------------------------------------------------

    def scenario_f(self) -> None:
        """F: ``f_clients`` clients download one image block by block, closed loop (B's load
        generator: every block checked, the ETag constant within a transfer), from libcoap's
        example server holding the image, then through the chain: the proxy's route to
        ``/firmware/{version}`` (idempotent: one HTTP byte range per block), the API, the
        Redis store (docs/API.md "Firmware")."""
        s, work = self.settings, self.settings.workdir / "f"
        work.mkdir(parents=True, exist_ok=True)
        seed = secrets.token_bytes(16)  # a new image every run
        body = blockload.resource_body(s.f_size, seed)
        for system in F_SYSTEMS:
            self.log(f"F: {system}, a {s.f_size // 1024} KiB image downloaded block-wise (Block2, "
                     f"{s.f_block_size} B) by {s.f_clients} clients, closed loop")  # fmt: skip
            with self.row("F", system) as row, contextlib.ExitStack() as stack:
                if system == "libcoap":
                    port, watch = self._libcoap_holding(stack, body, work, s.f_block_size)
                else:
                    port, watch = self._firmware_chain(stack, body, work)
                path = F_PATHS[system]
                blocks, etag = self._whole_once(port, path, body, s.f_block_size)
                time.sleep(0.3)
                config = BlockConfig(
                    "127.0.0.1", port, clients=s.f_clients, duration=s.f_duration,
                    warmup=s.warmup, timeout=s.timeout, workers=s.b_loadgen_workers,
                    port_range=self.ports.take(), path=path, size=s.f_size, seed=seed,
                    block_size=s.f_block_size,
                )  # fmt: skip
                result = self.measure(row, partial(blockload.run_blocks, config), watch)
                row |= f_figures(result, row["cpu"], blocks) | {
                    "clients": s.f_clients, "resource_bytes": s.f_size,
                    "block_size": s.f_block_size, "blocks_per_transfer": blocks,
                    "etag": etag.hex(), "image_sha256": hashlib.sha256(body).hexdigest(),
                }  # fmt: skip
                self.log(
                    f"  {row['blocks_per_second']:,.0f} blocks/s, "
                    f"{row['image_transfers_per_second']:.2f} images/s, corrupt "
                    f"{result.corrupt}, ETag changes {result.etag_changes}, timeouts "
                    f"{result.timeouts}: {row['status']}"
                )

    def _firmware_chain(
        self, stack: contextlib.ExitStack, body: bytes, work: Path
    ) -> tuple[int, dict[str, Service]]:
        """The chain's proxy with the firmware route, and ``body`` uploaded as F_VERSION:
        (CoAP port, the processes whose CPU counts). The device 127.0.0.1 is registered with
        the chain: every load generator client downloads as that device."""
        import httpx

        s = self.settings
        policy = work / "policy.toml"
        policy.write_text(FIRMWARE_POLICY)
        port = self.chain_proxy(
            stack, s.api_workers, s.proxy_workers,
            extra=["--policy", str(policy), "--block-size", str(s.f_block_size)],
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {self.secrets['api']}",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        with httpx.Client(base_url=self.urls["api"], headers=headers, timeout=60) as client:
            answer = client.put(f"/firmware/{F_VERSION}", content=body)
        if answer.status_code not in (200, 201):
            raise RuntimeError(f"PUT /firmware/{F_VERSION} answered {answer.status_code}: "
                               f"{answer.text[:500]}\n{self.chain['api'].log_tail()}")  # fmt: skip
        if answer.json().get("sha256") != hashlib.sha256(body).hexdigest():
            raise RuntimeError(f"PUT /firmware/{F_VERSION}: another sha256: {answer.text[:500]}")
        return port, {name: self.chain[name] for name in ("proxy", "api", "redis")}

    # --- E, L, D, H, R: the telemetry chain --------------------------------------------------

    def run(self) -> None:
        """Each chosen scenario's method once, in the order of :data:`SCENARIOS`. The chain's
        Redis, Mosquitto and API are started by the first scenario that needs them and
        stopped before the next one that does not."""
        chosen = self.settings.scenarios
        methods = dict.fromkeys(SCENARIOS[name].method for name in SCENARIOS if name in chosen)
        with self.chain_stack:
            for method in methods:
                if method not in CHAIN:
                    self.chain_stack.close()
                getattr(self, method)()

    def failed(self) -> bool:
        return any("error" in row or row.get("status") == "FAILED" for row in self.rows)

    def chain_proxy(
        self, stack: contextlib.ExitStack, api_workers: int, workers: int, dtls: bool = False,
        extra: Sequence[str] = (),
    ) -> int:  # fmt: skip
        """The chain (Redis, Mosquitto and the API with ``api_workers``, started once, the API
        again when its worker count changes; a failure to start is remembered for the other
        rows) and a proxy in front of it, stopped when ``stack`` closes: its CoAP port, or
        with ``dtls`` its coaps port."""
        if self.chain_error is not None:
            raise RuntimeError(self.chain_error)
        s, chain = self.settings, self.chain
        try:
            if not chain:
                self.chain_stack.callback(chain.clear)
                chain["redis"], self.urls["redis"] = self.redis(self.chain_stack, "redis")
                mosquitto, self.urls["mqtt"] = services.start_mosquitto(s.workdir / "mosquitto")
                chain["mosquitto"] = mosquitto
                self.chain_stack.callback(mosquitto.stop)
            if "api" in chain and self.workers["api"] != api_workers:
                self.log(f"restarting the API with {api_workers} worker(s)")
                chain.pop("api").stop()
            if "api" not in chain:
                chain["api"], port = services.start_api(
                    s.workdir, redis_url=self.urls["redis"], mqtt_url=self.urls["mqtt"],
                    api_key=self.secrets["api"], proxy_token=self.secrets["proxy"],
                    workers=api_workers,
                )  # fmt: skip
                self.chain_stack.callback(chain["api"].stop)
                self.urls["api"], self.workers["api"] = f"http://127.0.0.1:{port}", api_workers
                self.register([DEVICE])
        except Exception as exc:
            self.chain_error = f"starting Redis, Mosquitto, API: {type(exc).__name__}: {exc}"
            raise
        coaps_port = free_port() if dtls else None
        chain["proxy"], port = self.server(
            stack, "coap-bridge", upstream=self.urls["api"], token=self.secrets["proxy"],
            redis_url=self.urls["redis"], workers=workers, coaps_port=coaps_port, extra=extra,
        )  # fmt: skip
        stack.callback(chain.pop, "proxy", None)
        self.workers["proxy"] = workers
        return coaps_port or port

    def register(self, devices: Sequence[dict[str, str]], psks: Sequence[str] = ()) -> None:
        """``devices`` through the API (409: already there), each with its PSK if given."""
        import httpx

        headers = {"Authorization": f"Bearer {self.secrets['api']}"}
        with httpx.Client(base_url=self.urls["api"], headers=headers, timeout=10) as client:
            for n, device in enumerate(devices):
                calls = [("POST", "/devices", device)]
                if psks:
                    path = f"/devices/{device['iccid']}/psk"
                    calls.append(("PUT", path, {"psk": psks[n], "format": "plain"}))
                for method, path, body in calls:
                    answer = client.request(method, path, json=body)
                    if answer.status_code >= 300 and answer.status_code != 409:
                        raise RuntimeError(
                            f"{method} {path} answered {answer.status_code}: {answer.text}\n"
                            f"{self.chain['api'].log_tail()}"
                        )

    def telemetry(
        self, row: Row, run: Callable[[dict[str, Service]], LoadResult],
        json_seq: str | None = None,
    ) -> None:  # fmt: skip
        """``run(watch)`` with an MQTT subscriber as witness: ``row`` gets what was lost or
        duplicated between the acknowledgements and MQTT, and its :func:`verdict`.
        ``json_seq``: the messages are JSON, the sequence id under that key."""
        work = self.settings.workdir / "subscriber"
        with Subscriber(self.urls["mqtt"], TOPIC, work, json_seq) as subscriber:
            result = run(self.chain | {"subscriber": subscriber.service})
            subscriber.settle(result.sent, quiet=1.5, limit=15.0)
            received = subscriber.close()
        mine = Counter(seq for seq in received if seq >> 56 == self.seq_tag)
        acked = result.acked()
        lost, duplicated = check_delivery(acked, mine)
        acked_set, delivered = set(acked), sum(mine.values())
        row |= {
            "acked": len(acked), "delivered": delivered, "lost": lost, "duplicated": duplicated,
            "delivered_unacked": sum(1 for seq in mine if seq not in acked_set),
            "foreign": len(received) - delivered, "status": verdict(result, lost, duplicated),
            "proxy_workers": self.workers["proxy"], "api_workers": self.workers["api"],
        }  # fmt: skip
        self.log(
            f"  MQTT: {len(acked)} acked, {delivered} delivered, lost {lost}, duplicated "
            f"{duplicated}, delivered but not acked {row['delivered_unacked']}: {row['status']}"
        )

    def telemetry_load(
        self, system: str, api_workers: int, proxy_workers: int, with_l: bool = False
    ) -> None:
        """E's row of ``system`` through a fresh proxy; with ``with_l`` L on the same one."""
        s, spec = self.settings, RequestSpec.telemetry(TOPIC, 100)
        with contextlib.ExitStack() as stack:
            with self.row("E", system) as row:
                port = self.chain_proxy(stack, api_workers, proxy_workers)
                self.telemetry(row, lambda watch: self.load(row, port, spec, s.e_duration, watch))
            if with_l:
                with self.row("L", system) as lrow:
                    if not row.get("rate"):
                        raise RuntimeError("E failed: no maximum rate to take 50% of")
                    rate = max(1.0, 0.5 * row["rate"])
                    self.log(f"L: open loop at {rate:,.0f} req/s (50% of E)")
                    self.telemetry(lrow, lambda watch: self.load(
                        lrow, port, spec, s.l_duration, watch, mode="open", rate=rate))  # fmt: skip

    def scenario_e(self) -> None:
        """E: the aiocoap baseline, then the chain with one proxy; L on the same proxy."""
        s = self.settings
        self.log("E: aiocoap do-nothing POST server (baseline)")
        with self.row("E", "aiocoap") as row, contextlib.ExitStack() as stack:
            service, port = self.server(stack, "aiocoap")
            spec = RequestSpec.telemetry(TOPIC, 100)
            self.load(row, port, spec, s.e_duration, {"aiocoap": service})
        self.log("E: coap-bridge chain (proxy → API → Redis + Mosquitto)")
        self.telemetry_load("coap-bridge", s.api_workers, s.proxy_workers, "L" in s.scenarios)
        with contextlib.suppress(Exception):
            self.redis_dedup = _redis_dedup_sample(self.urls["redis"])

    def scenario_et(self) -> None:
        """ET: E's load from the bench device with TEMPLATE_10 assigned, on the same chain and
        proxy as a raw E row run just before it (unless E itself ran: its row is the raw
        one), so the two differ by the translation alone. The template is unassigned
        afterwards: the scenarios that follow publish raw again."""
        s, spec = self.settings, RequestSpec.telemetry(TOPIC, 100)
        with contextlib.ExitStack() as stack:
            started: list[int] = []

            def proxy_port() -> int:  # one proxy for both rows, started by the first
                if not started:
                    started.append(self.chain_proxy(stack, s.api_workers, s.proxy_workers))
                return started[0]

            if "E" not in s.scenarios:
                self.log("ET: E raw first, for comparison")
                with self.row("E", "coap-bridge") as row:
                    port = proxy_port()
                    self.telemetry(row, lambda w: self.load(row, port, spec, s.e_duration, w))
            self.log("ET: E from a device with a 10-field template (JSON published)")
            with self.row("E", TEMPLATE_SYSTEM) as trow:
                tport = proxy_port()
                self._assign_template(TEMPLATE_10)
                try:
                    self.telemetry(
                        trow, lambda w: self.load(trow, tport, spec, s.e_duration, w), SEQ_KEY
                    )
                finally:
                    self._assign_template(None)

    def scenario_eo(self) -> None:
        """EO: E through a proxy with its metrics listener on and the request log at info
        (summaries, no line per message), while a scraper reads the proxy's and the API's
        /metrics every SCRAPE_INTERVAL, beside a raw E row on a proxy as the bench runs it
        (metrics off, log level warning) unless E itself ran. Issue 18's bar: exporting the
        counters must not cost E more than 3 %."""
        s, spec = self.settings, RequestSpec.telemetry(TOPIC, 100)
        if "E" not in s.scenarios:
            self.log("EO: E raw first, for comparison")
            self.telemetry_load("coap-bridge", s.api_workers, s.proxy_workers)
        self.log("EO: E with metrics on and scraped, request log at info")
        with self.row("E", OBSERVED_SYSTEM) as row, contextlib.ExitStack() as stack:
            metrics_port = free_port()
            extra = ["--metrics-port", str(metrics_port), "--log-level", "info"]
            port = self.chain_proxy(stack, s.api_workers, s.proxy_workers, extra=extra)
            urls = [f"http://127.0.0.1:{metrics_port}/metrics", f"{self.urls['api']}/metrics"]
            scraper = _Scraper(urls, SCRAPE_INTERVAL)
            stack.callback(scraper.stop)
            scraper.start()
            self.telemetry(row, lambda watch: self.load(row, port, spec, s.e_duration, watch))
            row["scrapes"], row["scrape_failures"] = scraper.scrapes, scraper.failures
            if not scraper.scrapes or scraper.failures:
                raise RuntimeError(
                    f"/metrics scraped {scraper.scrapes} times, {scraper.failures} failed"
                )

    def _assign_template(self, template: dict[str, Any] | None) -> None:
        """Upload ``template`` and assign it to the bench device; None: unassign."""
        import httpx

        headers = {"Authorization": f"Bearer {self.secrets['api']}"}
        with httpx.Client(base_url=self.urls["api"], headers=headers, timeout=10) as client:
            template_id = None
            if template is not None:
                created = client.post("/templates", json={"name": "bench", "template": template})
                if created.status_code != 201:
                    raise RuntimeError(f"POST /templates: {created.status_code} {created.text}")
                template_id = created.json()["id"]
            path = f"/devices/{DEVICE['iccid']}"
            assigned = client.patch(path, json={"template": template_id})
            if assigned.status_code != 200:
                raise RuntimeError(f"PATCH {path}: {assigned.status_code} {assigned.text}")

    def scenario_r(self) -> None:
        s = self.settings
        self.log(f"R: E through coap-bridge proxy --workers {s.r_workers} (SO_REUSEPORT, dedup "
                 f"shared in Redis), API workers {s.r_api_workers}")  # fmt: skip
        self.telemetry_load(R_SYSTEM, s.r_api_workers, s.r_workers)

    def scenario_dtls(self) -> None:
        """D (E over DTLS) and H (handshakes) on one proxy with a coaps port, with devices that
        each have a PSK: the DTLS identity is the ICCID, and dedup keys on (identity, MID),
        so every load generator client needs an identity of its own."""
        s, setup = self.settings, None
        with contextlib.ExitStack() as stack:
            try:
                port = self.chain_proxy(stack, s.api_workers, 1, dtls=True)
                self.log(f"D/H: registering {s.dtls_clients} devices, each with its own PSK")
                credentials = self._psk_devices(s.dtls_clients)
                self._wait_dtls(port, credentials[0])
            except Exception as exc:
                setup = exc
            if "D" in s.scenarios:
                self.log(
                    f"D: E over DTLS, {s.dtls_clients} sessions established first, one "
                    f"request in flight each, {s.dtls_loadgen_workers} load process(es)"
                )
                with self.row("E", DTLS_SYSTEM) as row:
                    if setup:
                        raise setup
                    self.seq_tag += 1
                    config = DtlsLoadConfig(
                        "127.0.0.1", port, credentials, RequestSpec.telemetry(TOPIC, 100),
                        duration=s.e_duration, warmup=s.warmup, timeout=s.timeout,
                        workers=s.dtls_loadgen_workers, seq_base=self.seq_tag << 56,
                        handshake_timeout=s.timeout,
                    )  # fmt: skip
                    self.telemetry(row, lambda watch: self.measure(
                        row, lambda: dtls_loadgen.run_sessions(config), watch))  # fmt: skip
            if "H" in s.scenarios:
                self.log(f"H: full DTLS handshakes, fresh session each, {s.h_workers} process(es)"
                         f" × {s.h_concurrency} in flight, {s.h_duration:g} s")  # fmt: skip
                with self.row("H", "coap-bridge") as row:
                    if setup:
                        raise setup
                    self._scenario_h(row, port, credentials)

    def _scenario_h(self, row: Row, port: int, credentials: list[Credential]) -> None:
        s = self.settings
        config = DtlsLoadConfig(
            "127.0.0.1", port, credentials, duration=s.h_duration, warmup=min(1.0, s.warmup),
            workers=s.h_workers, concurrency=s.h_concurrency, handshake_timeout=s.timeout,
            # Source ports in turn from a range, each back only after the others: the
            # kernel's own choice may hand a port out again at once.
            port_range=self.ports.take(4),
        )  # fmt: skip
        try:
            watch = {"proxy": self.chain["proxy"]}
            self.measure(row, lambda: dtls_loadgen.run_handshakes(config), watch)
        except RuntimeError as exc:
            if "completed" not in row:
                raise
            # The figures stand for the time before; the row still fails the run.
            row["error"] = f"{str(exc).splitlines()[0]} during the run, after " + (
                f"{row['completed']:,} handshakes"
            )

    def _psk_devices(self, count: int, concurrent: bool = False) -> list[Credential]:
        """``count`` new devices, each with a PSK of its own; ``concurrent``: many API calls
        at once (RB's thousands), else one after the other."""
        self.dtls_batch += 1
        batch = self.dtls_batch
        devices = [
            {"iccid": f"898828066620{batch * 10_000 + n:07d}", "status": "active",
             "ip": f"10.{200 + batch}.{n // 250}.{n % 250 + 1}"}
            for n in range(count)
        ]  # fmt: skip
        psks = [secrets.token_hex(8) for _ in devices]  # 16 characters: tinydtls takes ≤ 16 B
        if concurrent:
            self._o_call([Call("POST", "/devices", d) for d in devices], "registering devices",
                         {201, 409})  # fmt: skip
            self._o_call(
                [Call("PUT", f"/devices/{d['iccid']}/psk", {"psk": psk, "format": "plain"})
                 for d, psk in zip(devices, psks, strict=True)],
                "setting PSKs", {200, 201, 204},
            )  # fmt: skip
        else:
            self.register(devices, psks)
        return [(d["iccid"], psk.encode()) for d, psk in zip(devices, psks, strict=True)]

    def _wait_dtls(self, coaps_port: int, credential: Credential) -> None:
        """Until one handshake with ``credential`` completes: the DTLS listener is up and the
        proxy's PSK mirror holds the keys."""

        async def handshake() -> bool:
            endpoint = dtls_loadgen.Endpoint(*credential)
            try:
                return await endpoint.connect("127.0.0.1", coaps_port, 1.0)
            finally:
                endpoint.close()

        ready = lambda: asyncio.run(handshake())  # noqa: E731
        self.chain["proxy"].wait_until(ready, 30.0, "completing a DTLS handshake")

    # --- RB: every session's source port changes at once (Connection ID, RFC 9146) -----------

    def scenario_rb(self) -> None:
        """RB: ``rb_sessions`` devices, each with its own PSK, set up one idle DTLS session each
        through a fresh proxy (the proxy's RSS across it: memory per idle session; with CID
        also Redis' when the proxy stores sessions there). Then every session moves to a new
        UDP socket at once (a NAT rebinding: new source ports) and sends one CON POST, E's
        telemetry. With a Connection ID every request must be answered 2.04 and the proxy's
        handshake counter must not move; the second row is the same without CID (a client
        as today): the proxy cannot tell the new address is the old session and drops the
        records, which is what such a client sees until it handshakes again."""
        s = self.settings
        credentials: list[Credential] = []
        if not 1 <= s.rb_sessions <= 10_000:  # _psk_devices numbers 10,000 devices per batch
            raise ValueError(f"rb_sessions (--rb-sessions): 1 to 10,000, not {s.rb_sessions}")
        for system, cid in ((RB_SYSTEM, True), (RB_PLAIN, False)):
            self.log(f"RB: {system}: {s.rb_sessions:,} idle sessions, then all source ports "
                     "change and each sends one CON POST")  # fmt: skip
            with self.row("RB", system) as row, contextlib.ExitStack() as stack:
                metrics_port = free_port()
                port = self.chain_proxy(
                    stack, s.api_workers, 1, dtls=True, extra=["--metrics-port", str(metrics_port)]
                )
                if not credentials:
                    credentials = self._psk_devices(s.rb_sessions, concurrent=True)
                # The listener is up and the PSK mirror is catching up (registered at once,
                # so a straggler's first handshake may fail: cid_loadgen tries three times).
                self._wait_dtls(port, credentials[-1])
                self._rebinding(row, port, f"http://127.0.0.1:{metrics_port}/metrics",
                                credentials, cid)  # fmt: skip

    def _rebinding(
        self, row: Row, port: int, metrics_url: str, credentials: list[Credential], cid: bool
    ) -> None:
        s, proxy = self.settings, self.chain["proxy"]
        fleet = cid_loadgen.Fleet(
            "127.0.0.1", port, credentials, cid=cid, concurrency=s.rb_concurrency
        )
        try:
            time.sleep(0.3)
            rss_before, redis_before = rss_bytes(proxy.pid), _redis_memory(self.urls["redis"])
            # In RB_STEPS steps, the RSS after each. The first step also holds one-off growth
            # (the Redis writer's buffers and tasks with CID; without, the first sessions fill
            # memory the heap already had), so the line runs through the steps after it: what
            # each further session costs.
            points, setup, step = [(0, rss_before)], 0.0, math.ceil(len(credentials) / RB_STEPS)
            redis_pid = self.chain["redis"].pid
            setup_cpu = cpu_seconds(proxy.pid), cpu_seconds(redis_pid)
            while fleet.started < len(credentials):
                setup += fleet.establish(s.timeout, step)
                time.sleep(0.3)  # what the proxy does after a handshake (a Redis write) settles
                points.append((len(fleet.sessions), rss_bytes(proxy.pid)))
            rss_idle, redis_idle = points[-1][1], _redis_memory(self.urls["redis"])
            established = len(fleet.sessions)
            # The pauses between the steps included: whatever follows a handshake counts.
            setup_cpu = (cpu_seconds(proxy.pid) - setup_cpu[0],
                         cpu_seconds(redis_pid) - setup_cpu[1])  # fmt: skip
            row |= fleet.stats() | {
                "cid": cid, "requested": len(credentials), "setup_seconds": setup,
                "setup_proxy_cpu_us_per_handshake": setup_cpu[0] / established * 1e6
                if established else None,
                "setup_redis_cpu_us_per_handshake": setup_cpu[1] / established * 1e6
                if established else None,
                "rss_before": rss_before, "rss_idle": rss_idle, "rss_steps": points,
                "bytes_per_idle_session": _slope(points[1:]) if established else None,
                "bytes_per_idle_session_delta": (rss_idle - rss_before) / established
                if established else None,
                "redis_bytes_per_session": (redis_idle - redis_before) / established
                if established else None,
            }  # fmt: skip
            if cid:
                row |= _redis_dtls_sample(self.urls["redis"])
            self.log(f"  {established:,} sessions in {setup:.1f} s ({fleet.handshake_failures} "
                     f"failed); proxy RSS {rss_before / 2**20:.1f} → {rss_idle / 2**20:.1f} MiB: "
                     f"{row['bytes_per_idle_session'] or 0:,.0f} B per idle session; Redis "
                     f"{row.get('redis_key_bytes') or '–'} B per stored session key")  # fmt: skip
            if not established:
                raise RuntimeError(f"no session could be set up: {row['handshake_errors']}")
            before, cpu = _dtls_counters(metrics_url), cpu_seconds(proxy.pid)
            overflows = _udp_receive_buffer_errors()
            self.seq_tag += 1
            fleet.rebind()
            # Without CID nothing is answered: a short wait shows it.
            wait = s.rb_timeout if cid else min(s.rb_timeout, 5.0)
            result = fleet.request_all(RequestSpec.telemetry(TOPIC, 100), self.seq_tag << 56, wait)
            proxy_cpu = cpu_seconds(proxy.pid) - cpu
            overflows = _udp_receive_buffer_errors() - overflows
            after = _dtls_counters(metrics_url)
            proxy.check_alive()
        finally:
            fleet.close()
        during = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
        answered = sum(result.codes.values())
        ok = (
            established == len(credentials) and answered == result.requests
            and dict(result.codes) == {"2.04": answered} and during["handshakes"] == 0
        )  # fmt: skip
        row |= {
            "requests": result.requests, "answered": answered, "codes": dict(result.codes),
            "unanswered": result.unanswered, "retransmissions": result.retransmissions,
            "first_try": result.first_try, "first_try_seconds": result.first_try_seconds,
            "seconds": result.seconds, "rate": answered / result.seconds if result.seconds else 0.0,
            "p50_ms": cid_loadgen.percentile(result.latencies_ms, 0.5),
            "p99_ms": cid_loadgen.percentile(result.latencies_ms, 0.99),
            "handshakes_during": during["handshakes"],
            "handshakes_completed_during": during["handshakes_completed"],
            "dropped_stateless_during": during["dropped_stateless"],
            "sessions_after": after["sessions"], "proxy_cpu_s": proxy_cpu,
            "address_updates_during": during.get("address_updates"),
            "saved_to_redis": after.get("saved"),
            "imported_during": during.get("imported"),
            "proxy_cpu_us_per_request": proxy_cpu / result.requests * 1e6
            if result.requests else None,
            "client_cpu_s": result.cpu_seconds, "udp_receive_buffer_errors": overflows,
            "status": ("OK" if ok else "FAILED") if cid else "reference",
        }  # fmt: skip
        self.log(
            f"  after the rebinding: {answered:,} of {result.requests:,} answered "
            f"{dict(result.codes)} in {result.seconds:.2f} s, {result.retransmissions} "
            f"retransmitted; the proxy ran {during['handshakes']:.0f} handshakes, moved "
            f"{during.get('address_updates', math.nan):.0f} sessions, dropped "
            f"{during['dropped_stateless']:.0f} datagrams as stateless: {row['status']}"
        )

    # --- O: observing devices, commands fanned out ---------------------------------------------

    def scenario_o(self) -> None:
        """O: ``o_devices`` devices observe their ``/commands/{iccid}`` through one proxy, then
        one command per device is queued over HTTP, all at once. Before that, in a phase of
        its own, ``o_memory_devices`` other devices (never observing) get one command each:
        Redis's ``used_memory`` across it is the memory per queued command."""
        s = self.settings
        count, parked_count = s.o_devices, s.o_memory_devices or s.o_devices
        self.log(
            f"O: {count:,} devices observing /commands/{{iccid}} through one proxy, one command "
            f"each over HTTP; Redis memory over {parked_count:,} waiting commands"
        )
        with self.row("O", "coap-bridge") as row, contextlib.ExitStack() as stack:
            port = self.chain_proxy(stack, s.api_workers, 1)
            proxy = self.chain["proxy"]
            self.retried, self.retry_reasons = {}, set()
            observers = [(n, f"898828066710{n:07d}") for n in range(count)]
            parked = [(n, f"898828066720{n:07d}") for n in range(max(2, parked_count))]
            t0 = time.monotonic()
            self._o_devices(observers, parked)
            row["devices_setup_s"] = time.monotonic() - t0
            row |= self._o_redis_memory(parked)
            self.log(f"  Redis: {row['redis_bytes_per_command']:,.0f} B per queued command "
                     f"(used_memory), {row.get('redis_key_bytes_per_command') or 0:,.0f} B "
                     "(MEMORY USAGE of its keys)")  # fmt: skip
            fleet = Fleet("127.0.0.1", port, observers, s.o_loadgen_workers, s.o_window)
            stack.callback(fleet.close)
            row["sockets"] = fleet.ready()
            time.sleep(0.3)
            rss_before = rss_bytes(proxy.pid)
            t0 = time.monotonic()
            states = fleet.register(timeout=60.0 + count / 50)
            row["register_s"] = time.monotonic() - t0
            time.sleep(0.5)
            rss_after = rss_bytes(proxy.pid)
            registered = states.get("registered", 0)
            row |= {"devices": count, "registration": states, "rss_before": rss_before,
                    "rss_relations": rss_after,
                    "rss_per_relation": (rss_after - rss_before) / registered
                    if registered else None}  # fmt: skip
            self.log(f"  registered {states} in {row['register_s']:.1f} s; proxy RSS "
                     f"{rss_before / 2**20:.1f} → {rss_after / 2**20:.1f} MiB: "
                     f"{row['rss_per_relation'] or 0:,.0f} B per relation")  # fmt: skip
            if registered == 0:
                raise RuntimeError(f"no device could register: {states}")
            self._o_fan_out(row, fleet, observers, registered)
            result = fleet.collect()
            self._o_figures(row, result, observers)
            row |= self._o_delivered(observers)
            row["http_503_retried"] = dict(self.retried)
            row["http_503_reasons"] = sorted(self.retry_reasons)[:3]
            ok = (
                registered == count and row["received"] == count and row["duplicates"] == 0
                and row["wrong"] == 0 and row["post_codes"] == {"201": count}
                and row["delivered_sampled"] == row["sampled"] > 0
            )  # fmt: skip
            row["status"] = "OK" if ok else "FAILED"
            self.log(
                f"  {row['notifications_per_second']:,.0f} notifications/s, p50 "
                f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, received {row['received']:,}"
                f" of {count:,}, missing {row['missing']}, duplicates {row['duplicates']}, "
                f"delivered {row['delivered_sampled']}/{row['sampled']} sampled: {row['status']}"
            )

    def _o_devices(self, observers: list[tuple[int, str]], parked: list[tuple[int, str]]) -> None:
        """Both device sets through the management API, many requests at once (409: there
        already). Observers by their loopback address; parked ones never send a datagram."""
        calls = [Call("POST", "/devices", {"iccid": iccid, "status": "active",
                                           "ip": observeload.device_address(n)})
                 for n, iccid in observers]  # fmt: skip
        calls += [Call("POST", "/devices", {"iccid": iccid, "status": "active",
                                            "ip": f"10.150.{n // 250}.{n % 250 + 1}"})
                  for n, iccid in parked]  # fmt: skip
        self._o_call(calls, "registering devices", {201, 409})

    def _o_call(
        self, calls: list[Call], what: str, expected: set[int] | None = None
    ) -> list[observeload.Answer]:
        answers = observeload.call_all(
            self.urls["api"], self.secrets["api"], calls, self.settings.o_concurrency
        )
        # 503 means "try again" (api/errors.py): a client does, after a pause; counted.
        for attempt in range(5):
            again = [i for i, answer in enumerate(answers) if answer.status == 503]
            if not again:
                break
            self.retried[what] = self.retried.get(what, 0) + len(again)
            self.retry_reasons.update(answers[i].body.decode(errors="replace")[:200] for i in again)
            time.sleep(0.2 * 2**attempt)
            retried = observeload.call_all(
                self.urls["api"], self.secrets["api"], [calls[i] for i in again],
                self.settings.o_concurrency,
            )  # fmt: skip
            for i, answer in zip(again, retried, strict=True):
                answers[i] = answer
        if expected is not None:
            bad = [(c, a) for c, a in zip(calls, answers, strict=True) if a.status not in expected]
            if bad:
                call, answer = bad[0]
                raise RuntimeError(
                    f"{what}: {len(bad)} of {len(calls)} failed, first {call.method} {call.path}"
                    f" → {answer.status or answer.error}: {answer.body[:300]!r}\n"
                    f"{self.chain['api'].log_tail()}"
                )
        return answers

    def _o_redis_memory(self, parked: list[tuple[int, str]]) -> Row:
        """One command each for the parked devices (the first not counted: it loads the
        queue's scripts); ``used_memory`` (less the clients' buffers) before and after, and
        MEMORY USAGE of a sample of the devices' command keys (stores/keys.py)."""
        import redis

        from stores.keys import command_keys

        def command(n: int, iccid: str) -> Call:
            return Call("POST", f"/devices/{iccid}/commands",
                        {"payload": observeload.command_payload(n)})  # fmt: skip

        self._o_call([command(*parked[0])], "queueing a command", {201})
        counted = parked[1:]

        def held(info: dict[str, Any]) -> int:
            # Client buffers are not the queue's: the API's pool grows with the concurrency.
            return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))

        with redis.Redis.from_url(self.urls["redis"], socket_timeout=10) as client:
            before = client.info("memory")
            self._o_call([command(*p) for p in counted], "queueing commands", {201})
            after = client.info("memory")
            sizes = []
            for _, iccid in random.Random(15).sample(counted, min(200, len(counted))):
                keys = command_keys(iccid)
                sizes.append(sum(client.memory_usage(k, samples=0) or 0 for k in keys))
        return {
            "memory_commands": len(counted), "redis_used_before": before["used_memory"],
            "redis_used_after": after["used_memory"],
            "redis_clients_before": before.get("mem_clients_normal"),
            "redis_clients_after": after.get("mem_clients_normal"),
            "redis_bytes_per_command": (held(after) - held(before)) / len(counted),
            "redis_key_bytes_per_command": sum(sizes) / len(sizes) if sizes else None,
        }  # fmt: skip

    def _o_fan_out(
        self, row: Row, fleet: Fleet, observers: list[tuple[int, str]], registered: int
    ) -> None:
        """One command per observer over HTTP, then until every registered device has one (or
        nothing arrived for 15 s, or ``o_timeout``), then until the proxy is idle again (its
        acknowledgements to the API follow the devices' ACKs): CPU of each process over it."""
        s = self.settings
        watch = {k: v for k, v in self.chain.items() if k in ("redis", "mosquitto", "api", "proxy")}
        before = {name: cpu_seconds(service.pid) for name, service in watch.items()}
        machine, t0 = services.machine_cpu_seconds(), time.monotonic()
        calls = [Call("POST", f"/devices/{iccid}/commands",
                      {"payload": observeload.command_payload(n)})
                 for n, iccid in observers]  # fmt: skip
        answers = self._o_call(calls, "queueing commands")
        posted = time.monotonic()
        last, progress = fleet.received(), posted
        while (got := fleet.received()) < registered:
            now = time.monotonic()
            if got != last:
                last, progress = got, now
            if now - progress > 15.0 or now - posted > s.o_timeout:
                self.log(f"  gave up waiting: {got:,} of {registered:,} devices have a command")
                break
            time.sleep(0.05)
        received_at = time.monotonic()
        quiet_since, cpu = time.monotonic(), cpu_seconds(watch["proxy"].pid)
        while time.monotonic() - received_at < 15.0:  # the proxy's DELETEs and re-fetches
            time.sleep(0.25)
            now_cpu = cpu_seconds(watch["proxy"].pid)
            if now_cpu - cpu > 0.01:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 0.5:
                break
            cpu = now_cpu
        wall = time.monotonic() - t0
        used = {name: cpu_seconds(service.pid) - before[name] for name, service in watch.items()}
        outside = max(0.0, services.machine_cpu_seconds() - machine - sum(used.values()))
        for service in watch.values():
            service.check_alive()
        codes = Counter(str(a.status or a.error) for a in answers)
        errors = {a.body.decode(errors="replace")[:300] for a in answers if a.status != 201}
        span = max(a.answered for a in answers) - min(a.sent for a in answers)
        row |= {
            "cpu": used, "wall": wall, "other_cpu": outside, "post_codes": dict(codes),
            "post_errors": sorted(errors)[:3],
            "post_sent": [a.sent for a in answers],
            "post_answered": [a.answered for a in answers],
            "posts_per_second": len(answers) / span if span > 0 else None,
        }  # fmt: skip

    def _o_figures(
        self, row: Row, result: observeload.DeviceResult, observers: list[tuple[int, str]]
    ) -> None:
        """What the devices saw, against when each POST was answered."""
        sent, answered = row.pop("post_sent"), row.pop("post_answered")
        by_number = dict(zip(result.numbers, range(len(result.numbers)), strict=True))
        latencies, acks = [], []
        for n, _ in observers:
            i = by_number.get(n)
            if i is None or result.commands[i] == 0:
                continue
            acks.append(result.acked_at[i])
            latencies.append(result.acked_at[i] - answered[n])
        received = len(acks)
        window = max(acks) - min(sent) if acks else 0.0
        duplicates = sum(max(0, c - 1) for c in result.commands)
        proxy_cpu = row["cpu"].get("proxy", 0.0)
        row |= {
            "received": received, "missing": len(observers) - received, "duplicates": duplicates,
            "wrong": sum(result.wrong), "window": window,
            "notifications_per_second": received / window if window > 0 else 0.0,
            "rate": received / window if window > 0 else 0.0,  # the report's "has figures"
            "p50_ms": observeload.percentile(latencies, 0.5) * 1e3,
            "p99_ms": observeload.percentile(latencies, 0.99) * 1e3,
            "max_ms": max(latencies, default=math.nan) * 1e3,
            "before_post_answer": sum(1 for x in latencies if x < 0),
            "proxy_cpu_us_per_notification": proxy_cpu / received * 1e6 if received else None,
            "notification_codes": result.notified, "empty_notifications": result.empty,
            "retransmitted": result.retransmitted, "non_commands": result.non,
            "resets": result.resets, "relations_ended": result.ended,
            "reregistered": result.reregistered, "device_datagrams": result.sent,
            "worker_cpu": [result.cpu], "registration_codes": dict(Counter(
                f"{c >> 5}.{c & 31:02d}" for c in result.codes if c)),
        }  # fmt: skip
        row["cpu"]["load generator"] = result.cpu

    def _o_delivered(self, observers: list[tuple[int, str]], sample: int = 200) -> Row:
        """GET /devices/{iccid}/commands for a sample (all when few): how many ended
        ``delivered``; asked again for up to 10 s while some are not yet."""
        chosen = observers if len(observers) <= sample else random.Random(7).sample(
            observers, sample)  # fmt: skip
        final: dict[str, str] = {}
        waiting, deadline = [iccid for _, iccid in chosen], time.monotonic() + 10.0
        while waiting:
            calls = [Call("GET", f"/devices/{iccid}/commands") for iccid in waiting]
            answers = self._o_call(calls, "listing commands", {200})
            for iccid, answer in zip(waiting, answers, strict=True):
                listed = json.loads(answer.body)["commands"]
                final[iccid] = ",".join(c["state"] for c in listed) or "none"
            waiting = [iccid for iccid in waiting if final[iccid] != "delivered"]
            if waiting and time.monotonic() < deadline:
                time.sleep(0.5)
            else:
                break
        states = Counter(final.values())
        return {"sampled": len(chosen), "delivered_sampled": states.get("delivered", 0),
                "sample_states": dict(states)}  # fmt: skip


def _origin_answers(log: Path) -> dict[str, int]:
    """The last ``answers {...}`` line bench/origin.py printed as it stopped."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("answers ")]
    if not lines:
        raise RuntimeError(f"the origin printed no answer counts:\n{log.read_text()[-2000:]}")
    return dict(json.loads(lines[-1].split(" ", 1)[1]))


@contextlib.contextmanager
def rss_sampled(pid: int, interval: float) -> Iterator[list[tuple[float, int]]]:
    """RSS of ``pid`` (with its children) as (seconds since entry, bytes): at entry, then
    every ``interval`` seconds until the block ends."""
    t0, stop = time.monotonic(), threading.Event()
    samples = [(0.0, rss_bytes(pid))]

    def sample() -> None:
        while not stop.wait(interval):
            samples.append((time.monotonic() - t0, rss_bytes(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()


def block_memory(
    samples: Sequence[tuple[float, int]], before: int, window_start: float, window_end: float,
    clients: int, load_start: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Server memory per transfer in progress, from RSS samples (seconds, bytes) of one B run.
    ``rss_per_transfer``: (peak − before) / clients, an upper bound (it also holds what grows
    with the number of requests: an exchange cache keeps every CON for 247 s, M).
    ``rss_per_transfer_corrected``: a line fitted to the samples inside the window (all
    transfers running, so its slope is the per-request growth), followed back to the load's
    start; what it stands above ``before`` per transfer. None without two samples in it."""
    peak = max([before, *(rss for _, rss in samples)])
    window = [(t, rss) for t, rss in samples if window_start <= t <= window_end]
    corrected = slope = None
    if len(window) >= 2 and clients > 0:
        mean_t, mean_rss = (sum(x) / len(window) for x in zip(*window, strict=True))
        spread = sum((t - mean_t) ** 2 for t, _ in window)
        slope = (
            sum((t - mean_t) * (rss - mean_rss) for t, rss in window) / spread if spread else 0.0
        )
        corrected = max(0.0, (mean_rss - slope * (mean_t - load_start) - before) / clients)
    return {"rss_before": before, "rss_peak": peak, "rss_delta": peak - before,
            "rss_per_transfer": (peak - before) / clients if clients > 0 else None,
            "rss_per_transfer_corrected": corrected, "rss_growth_per_second": slope,
            "rss_samples": list(samples)}  # fmt: skip


def _redis_dedup_sample(url: str, sample: int = 500) -> dict[str, Any]:
    """``MEMORY USAGE`` over up to ``sample`` keys ``cb:dd:*``."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        keys = list(itertools.islice(client.scan_iter(match="cb:dd:*", count=1000), sample))
        found = {"keys_sampled": len(keys), "dbsize": client.dbsize()}
        if not keys:
            return found
        sizes = [client.memory_usage(key, samples=0) or 0 for key in keys]
        used = client.info("memory").get("used_memory")
        return found | {"bytes_per_entry": sum(sizes) / len(sizes), "used_memory": used}


def _dtls_counters(url: str) -> dict[str, float]:
    """The proxy's DTLS counters RB needs, from its /metrics (prometheus_client's parser);
    the address updates and the sessions written to Redis when the proxy exports them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        ("coap_bridge_dtls_handshakes_total", ()): "handshakes",
        ("coap_bridge_dtls_handshakes_completed_total", ()): "handshakes_completed",
        ("coap_bridge_dtls_sessions", ()): "sessions",
        ("coap_bridge_dtls_dropped_total", (("reason", "stateless"),)): "dropped_stateless",
    }
    optional = {
        ("coap_bridge_dtls_address_updates_total", ()): "address_updates",
        ("coap_bridge_dtls_shared_sessions_total", (("event", "saved"),)): "saved",
        ("coap_bridge_dtls_shared_sessions_total", (("event", "imported"),)): "imported",
    }
    answer = httpx.get(url, timeout=10)
    answer.raise_for_status()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            name = wanted.get(key) or optional.get(key)
            if name is not None:
                found[name] = sample.value
    if missing := set(wanted.values()) - set(found):
        raise RuntimeError(f"{url}: missing DTLS metrics {missing}")
    return found


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None without two distinct x."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def _udp_receive_buffer_errors() -> int:
    """UDP datagrams the kernel dropped because a socket's receive buffer was full
    (/proc/net/snmp, RcvbufErrors): machine-wide, so other UDP traffic counts too."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]  # fmt: skip
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def _redis_memory(url: str) -> int:
    """Redis' ``used_memory`` less the clients' buffers (they grow with connections)."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        info = client.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def _redis_dtls_sample(url: str, sample: int = 200) -> dict[str, Any]:
    """How many DTLS sessions are stored (stores/keys.py ``dtls_session_key``) and per-identity
    sets of their CIDs, and ``MEMORY USAGE`` of up to ``sample`` of each; none: not stored."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=10) as client:
        found: dict[str, Any] = {}
        for name, pattern in (("redis_key_bytes", "*{dtls:*}:session"),
                              ("redis_identity_key_bytes", "*{dtlsid:*}:cids")):  # fmt: skip
            keys = list(client.scan_iter(match=pattern, count=1000))
            sizes = [client.memory_usage(key, samples=0) or 0 for key in keys[:sample]]
            found[name] = sum(sizes) / len(sizes) if sizes else None
            found[f"{name}_count"] = len(keys)
        return found


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(
        prefix="coap-bridge-bench-", ignore_cleanup_errors=True
    ) as path:
        yield Path(path)


class _Scraper(threading.Thread):
    """Reads each URL every ``interval`` seconds, as a Prometheus server would, and counts
    the answers (the body is parsed once per scrape with prometheus_client's parser, so a
    malformed exposition counts as a failure)."""

    def __init__(self, urls: Sequence[str], interval: float) -> None:
        super().__init__(daemon=True, name="metrics-scraper")
        self.urls, self.interval = list(urls), interval
        self.scrapes = self.failures = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        with httpx.Client(timeout=5) as client:
            while not self._stop_event.wait(self.interval):
                for url in self.urls:
                    try:
                        answer = client.get(url)
                        answer.raise_for_status()
                        list(text_string_to_metric_families(answer.text))
                        self.scrapes += 1
                    except Exception:
                        self.failures += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
