"""The scenarios, listed in :data:`SCENARIOS` (name → method, systems, description): start the
systems, drive them with :mod:`bench.loadgen` (B: :mod:`bench.blockload`, D and H:
:mod:`bench.dtls_loadgen`), stop them, and collect one row per system."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bench import blockload, dtls_loadgen, loadgen, services
from bench.blockload import BlockConfig, BlockResult
from bench.dtls_loadgen import Credential, DtlsLoadConfig, HandshakeResult
from bench.loadgen import LoadConfig, LoadResult, RequestSpec
from bench.services import (
    Service,
    cpu_seconds,
    free_port,
    machine_cpu_seconds,
    rss_bytes,
    start_mosquitto,
    start_redis,
    which,
)
from bench.subscriber import MosquittoSubscriber, Subscriber, check_delivery

DEVICE = {"iccid": "8988280666000000001", "ip": "127.0.0.1", "status": "active"}
TOPIC = "bench/x"
# "coap-bridge+redis": the production shape, the proxy started with --redis-url (a throwaway
# redis-server of its own) for the cross-replica claim (issue 13 §4).
REDIS_SYSTEM = "coap-bridge+redis"
SYSTEMS = ("coap-bridge", REDIS_SYSTEM, "libcoap", "aiocoap")
# B: libcoap's example server holds what was PUT to /example_data and serves it block-wise;
# the proxy serves the bench's HTTP origin (bench/origin.py, byte ranges) through a route.
B_SYSTEMS = ("libcoap", REDIS_SYSTEM)
B_PATHS = {"libcoap": "/example_data", REDIS_SYSTEM: "/blob"}
DTLS_SYSTEM = "coap-bridge over DTLS"
R_SYSTEM = "coap-bridge --workers N"
EXCHANGE_LIFETIME = 247.0
_R = TypeVar("_R")


@dataclass(frozen=True)
class Scenario:
    method: str  # the Bench method that runs it
    systems: tuple[str, ...]  # the rows it adds
    description: str


SCENARIOS = {
    "T": Scenario("scenario_t", SYSTEMS, "termination: CON GET /.well-known/core, closed loop"),
    "B": Scenario("scenario_b", B_SYSTEMS, "block-wise GET of a large resource, Block2"),
    "E": Scenario(
        "scenario_chain", ("aiocoap", "coap-bridge"),
        "telemetry end to end: CON POST through proxy, API, Redis, MQTT; aiocoap baseline",
    ),
    "L": Scenario("scenario_chain", ("coap-bridge",), "E in open loop at 50% of E's maximum"),
    "R": Scenario("scenario_chain", (R_SYSTEM,), "E through proxy --workers N (SO_REUSEPORT)"),
    "D": Scenario("scenario_chain", (DTLS_SYSTEM,), "E over DTLS, one PSK per client"),
    "H": Scenario("scenario_chain", ("coap-bridge",), "full DTLS handshakes per second"),
    "M": Scenario("scenario_m", ("coap-bridge",), "memory: proxy RSS over T, Redis per entry"),
}  # fmt: skip


@dataclass
class Settings:
    scenarios: list[str]
    t_systems: list[str]
    duration: float  # measured window of T, E, L
    e_duration: float
    l_duration: float
    warmup: float
    m_duration: float
    clients: int
    loadgen_workers: int
    proxy_workers: int
    api_workers: int
    timeout: float
    workdir: Path
    quick: bool = False
    subscriber: str = "mosquitto_sub"  # or "aiomqtt"
    # R: E through one proxy started with --workers (SO_REUSEPORT) and shared dedup in Redis.
    r_workers: int = 2
    r_api_workers: int = 2
    # D: E over DTLS; H: full DTLS handshakes with fresh sessions.
    dtls_clients: int = 64  # sessions, one PSK identity (device) each
    dtls_loadgen_workers: int = 1
    h_duration: float = 5.0
    h_workers: int = 1
    h_concurrency: int = 8  # handshakes in flight per worker
    # The proxy caps its dedup table (COAP_BRIDGE_DEDUP_MAX_ENTRIES); for M it must hold every
    # exchange, or bytes/exchange would be measured on evicted entries.
    m_dedup_max_entries: int = 100_000_000
    # B: a b_size-byte resource fetched block-wise (Block2, b_block_size) by b_clients at once.
    b_systems: list[str] = field(default_factory=lambda: list(B_SYSTEMS))
    b_clients: int = 32
    b_duration: float = 10.0
    b_size: int = 256 * 1024
    b_block_size: int = 1024
    b_loadgen_workers: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workdir"}


@dataclass
class Row:
    scenario: str
    system: str
    result: LoadResult | None = None
    handshakes: HandshakeResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as it goes into the results JSON (what the report renders)."""
        data: dict[str, Any] = {"scenario": self.scenario, "system": self.system}
        if self.result is not None:
            data |= {name: getattr(self.result, name) for name in LOAD_FIGURES}
        if self.handshakes is not None:
            h = self.handshakes
            data |= {name: getattr(h, attr) for name, attr in HANDSHAKE_FIGURES.items()}
        data |= self.extra
        if self.error is not None:
            data["error"] = self.error
        return data


LOAD_FIGURES = (
    "rate", "offered_rate", "sent", "completed", "in_window", "window", "p50_ms", "p99_ms",
    "p999_ms", "timeouts", "separate", "codes", "send_errors", "sockets", "worker_cpu",
    "handshake_failures",
)  # fmt: skip
HANDSHAKE_FIGURES = {
    "handshake_rate": "rate", "handshakes_completed": "completed",
    "handshakes_in_window": "in_window", "handshakes_failed": "failed", "window": "window",
    "p50_ms": "p50_ms", "p99_ms": "p99_ms", "worker_cpu": "worker_cpu",
    "concurrency": "concurrency", "workers": "workers",
}  # fmt: skip


class SourcePorts:
    """Disjoint blocks of client source ports, one per load run, so no (port, MID) pair repeats
    within a harness run, even between two runs against the same server (E then L)."""

    def __init__(self, block: int = 1000) -> None:
        try:
            ephemeral_low = int(
                Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
            )
        except (OSError, ValueError, IndexError):
            ephemeral_low = 32768
        # Below the kernel's ephemeral range, so no connect() elsewhere lands on them.
        self.next = 10000 + (os.getpid() % 8) * 100
        self.high = max(self.next + block, ephemeral_low)
        self.block = block

    def take(self, blocks: int = 1) -> tuple[int, int]:
        size = self.block * blocks
        low = self.next
        if low + size > self.high:
            low = 10000  # wrapped: only after many runs (minutes), and ports are skipped if busy
        self.next = low + size
        return low, low + size


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ports = SourcePorts()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.e_rate: float | None = None
        self.redis_dedup: dict[str, Any] | None = None
        self._seq_tag = 0
        self.last_cpu: dict[str, float] = {}
        self.last_wall = 0.0
        self.last_other = 0.0
        self.loadavg_start = os.getloadavg()
        self._chain: dict[str, Service] = {}
        self._mqtt_url = ""
        self._redis_url = ""
        self._api_port = 0
        self._api_workers = 0
        self._api_key = ""
        self._proxy_token = ""
        self._dtls_batch = 0

    # --- helpers -----------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    @contextlib.contextmanager
    def _row(self, scenario: str, system: str) -> Iterator[Row]:
        """A row, added to the results when the block ends; an exception in the block becomes
        the row's error (the other scenarios still run)."""
        row = Row(scenario, system)
        try:
            yield row
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            self._log(f"  ERROR {row.error}")
        self.rows.append(row)

    def _fail_rows(self, rows: list[tuple[str, str]], exc: Exception, what: str = "") -> None:
        error = f"{type(exc).__name__}: {exc}"
        self._log(f"  ERROR {what}{error}")
        self.rows += [Row(scenario, system, error=error) for scenario, system in rows]

    def _load(
        self,
        port: int,
        spec: RequestSpec,
        *,
        duration: float,
        warmup: float | None = None,
        mode: str = "closed",
        rate: float = 0.0,
        watch: dict[str, int] | None = None,
    ) -> LoadResult:
        """One load run, measured (:meth:`_measured`)."""
        self._seq_tag += 1
        s = self.settings
        config = LoadConfig(
            host="127.0.0.1",
            port=port,
            spec=spec,
            mode=mode,
            clients=s.clients,
            rate=rate,
            duration=duration,
            warmup=s.warmup if warmup is None else warmup,
            timeout=s.timeout,
            workers=s.loadgen_workers,
            port_range=self.ports.take(),
            seq_base=self._seq_tag << 56,
        )
        return self._measured(lambda: loadgen.run_load(config), watch)

    def _measured(self, run: Callable[[], _R], watch: dict[str, int] | None) -> _R:
        """``run()``; the CPU seconds each ``watch`` process (name → pid, with its children)
        and the load generator spent meanwhile land in ``self.last_cpu``, the wall-clock
        seconds in ``self.last_wall``."""
        watch = watch or {}
        before = {name: cpu_seconds(pid) for name, pid in watch.items()}
        own = os.times()
        machine = machine_cpu_seconds()
        t0 = time.monotonic()
        result = run()
        self.last_wall = time.monotonic() - t0
        machine = machine_cpu_seconds() - machine
        own_after = os.times()
        self.last_cpu = {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()}
        # The harness process and its joined children: the load generator's workers.
        self.last_cpu["load generator"] = sum(own_after[:4]) - sum(own[:4])
        # Whatever else ran on the machine meanwhile (other people's tests: noise).
        self.last_other = max(0.0, machine - sum(self.last_cpu.values()))
        self._log(f"  {result.summary()}")  # type: ignore[attr-defined]
        cpu = ", ".join(
            f"{name} {sec:.1f} ({100 * sec / self.last_wall:.0f}%)"
            for name, sec in self.last_cpu.items()
        )
        other = self.last_other
        self._log(
            f"  CPU seconds (% of one core) over {self.last_wall:.1f} s: {cpu}; processes "
            f"outside the bench {other:.1f} ({100 * other / max(self.last_wall, 1e-9):.0f}%)"
        )
        return result

    def _cpu_extra(self) -> dict[str, Any]:
        return {"cpu": self.last_cpu, "wall": self.last_wall, "other_cpu": self.last_other}

    def _server(
        self, stack: contextlib.ExitStack, system: str, **proxy: Any
    ) -> tuple[Service, int]:
        """``system`` answering CoAP, stopped when ``stack`` closes: (service, port)."""
        work = self.settings.workdir
        if system == "coap-bridge":
            proxy.setdefault("workers", self.settings.proxy_workers)
            service, port = services.start_proxy(work, **proxy)
        else:
            service, port = services.start_baseline(work, system)
        stack.callback(service.stop)
        return service, port

    # --- T -----------------------------------------------------------------------------------

    def scenario_t(self) -> None:
        for system in self.settings.t_systems:
            self._log(f"T: {system}, CON GET /.well-known/core, closed loop")
            with self._row("T", system) as row, contextlib.ExitStack() as stack:
                watched = []
                if system == REDIS_SYSTEM:
                    redis, redis_url = start_redis(self.settings.workdir / "redis-t")
                    stack.callback(redis.stop)
                    service, port = self._server(stack, "coap-bridge", redis_url=redis_url)
                    watched = [("coap-bridge", service), ("redis", redis)]
                else:
                    service, port = self._server(stack, system)
                    watched = [(system, service)]
                watch = {name: svc.pid for name, svc in watched}
                row.result = self._load(
                    port, RequestSpec.wkc(), duration=self.settings.duration, watch=watch
                )
                row.extra |= self._cpu_extra()
                for _, svc in watched:
                    svc.check_alive()

    # --- B -----------------------------------------------------------------------------------

    def scenario_b(self) -> None:
        s = self.settings
        for system in s.b_systems:
            self._log(
                f"B: {system}, {s.b_size // 1024} KiB fetched block-wise (Block2, "
                f"{s.b_block_size} B) by {s.b_clients} clients, closed loop"
            )
            with self._row("B", system) as row:
                with contextlib.ExitStack() as stack:
                    port, started = self._block_server(system, stack)
                    row.result, row.extra = self._block_run(system, port, started)
                if "origin" in started:
                    # Printed by the origin as it stopped: how the proxy fetched the blocks.
                    answers = _origin_answers(started["origin"].log_path)
                    blocks = row.result.completed + row.extra["blocks_per_transfer"]
                    row.extra["origin_answers"] = answers
                    row.extra["origin_requests_per_block"] = sum(answers.values()) / blocks
                    self._log(f"  origin answers {answers}, during the run and the check")

    def _block_server(
        self, system: str, stack: contextlib.ExitStack
    ) -> tuple[int, dict[str, Service]]:
        """Start ``system`` serving the B resource: (CoAP port, its processes by name, the
        one whose memory counts first)."""
        s = self.settings
        work = s.workdir / "b"
        work.mkdir(parents=True, exist_ok=True)
        path = B_PATHS.get(system)
        if system == "libcoap":
            service, port = self._server(stack, "libcoap")
            upload = work / "resource.bin"
            upload.write_bytes(blockload.resource_body(s.b_size))
            # The example server keeps what a PUT to /example_data carried and serves it
            # block-wise (its default block handling, -L 1).
            done = subprocess.run(
                [which("coap-client-notls"), "-m", "put", "-b", str(s.b_block_size), "-f",
                 str(upload), f"coap://127.0.0.1:{port}{path}"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"PUT to libcoap failed: {done.stdout}{done.stderr}")
            return port, {"libcoap": service}
        if system != REDIS_SYSTEM or path is None:
            raise ValueError(f"B: unknown system {system!r}")
        origin, origin_port = services.start_origin(s.workdir, path, s.b_size)
        stack.callback(origin.stop)
        redis, redis_url = start_redis(s.workdir / "redis-b")
        stack.callback(redis.stop)
        policy = work / "policy.toml"
        # A GET that is safe to repeat: no cross-replica claim needed (issue 13 §4).
        policy.write_text(
            f'[[route]]\npath = "{path}"\nmethods = ["GET"]\ntarget = "{path}"\nidempotent = true\n'
        )
        block_size = ["--block-size", str(s.b_block_size)]
        proxy, port = self._server(
            stack, "coap-bridge", upstream=f"http://127.0.0.1:{origin_port}", redis_url=redis_url,
            extra=["--policy", str(policy),
                   *(block_size if services.supports("proxy", "--block-size") else [])],
        )  # fmt: skip
        return port, {"proxy": proxy, "redis": redis, "origin": origin}

    def _block_run(
        self, system: str, port: int, started: dict[str, Service]
    ) -> tuple[BlockResult, dict[str, Any]]:
        s = self.settings
        path = B_PATHS[system]
        # One whole transfer first: the resource is there, every byte right, no datagram over
        # the block size; it also warms the server up before its memory is read.
        body, sizes, etag = blockload.fetch_once("127.0.0.1", port, path, s.b_block_size, 5.0)
        if body != blockload.resource_body(s.b_size):
            raise RuntimeError(f"{path}: {len(body)} bytes, not the {s.b_size} expected")
        if max(sizes) > s.b_block_size:
            raise RuntimeError(f"{path}: a block of {max(sizes)} B, over {s.b_block_size}")
        time.sleep(0.3)
        config = BlockConfig(
            host="127.0.0.1",
            port=port,
            path=path,
            size=s.b_size,
            block_size=s.b_block_size,
            clients=s.b_clients,
            duration=s.b_duration,
            warmup=s.warmup,
            timeout=s.timeout,
            workers=s.b_loadgen_workers,
            port_range=self.ports.take(),
        )
        watch = {name: service.pid for name, service in started.items()}
        server = next(iter(started.values()))
        with RssSampler(server.pid, interval=min(0.5, max(0.1, s.b_duration / 20))) as rss:
            result = self._measured(lambda: blockload.run_blocks(config), watch)
        for service in started.values():
            service.check_alive()
        # The load starts ~0.05 s after the sampler (0.5 s more with forked workers).
        begin = 0.05 + (0.5 + 0.05 * s.b_loadgen_workers if s.b_loadgen_workers > 1 else 0.0)
        memory = block_memory(
            rss.samples, rss.before, begin + s.warmup, begin + s.warmup + s.b_duration,
            s.b_clients, begin,
        )  # fmt: skip
        extra: dict[str, Any] = {
            **self._cpu_extra(),
            "clients": s.b_clients,
            "resource_bytes": s.b_size,
            "block_size": s.b_block_size,
            "blocks_per_transfer": len(sizes),
            "etag": etag.hex() if etag is not None else None,
            "blocks_in_window": result.blocks_in_window,
            "blocks_per_second": result.blocks_per_second,
            "transfers_in_window": result.transfers_in_window,
            "transfers_per_second": result.transfers_per_second,
            "transfers": result.transfers,
            "corrupt": result.corrupt,
            "etag_changes": result.etag_changes,
            "restarts": result.restarts,
            "block_sizes": result.block_sizes,
            **memory,
        }
        self._log(
            f"  RSS {memory['rss_before'] / 2**20:.1f} MiB → peak "
            f"{memory['rss_peak'] / 2**20:.1f} MiB; per transfer in progress "
            f"{(memory['rss_per_transfer'] or 0) / 1024:.1f} KiB (growth-corrected "
            f"{(memory['rss_per_transfer_corrected'] or 0) / 1024:.1f} KiB)"
        )
        return result, extra

    # --- E, L, R, D, H: the telemetry chain ----------------------------------------------------

    def scenario_chain(self) -> None:
        """E (aiocoap baseline, then the chain with one proxy worker) and L; D and H over DTLS
        (a proxy with a coaps port, devices with PSKs); R last (E through ``--workers``, with
        the API restarted when R asks for another worker count). Redis, Mosquitto and the API
        are started once; each scenario gets its own proxy, stopped when it is done."""
        s = self.settings
        chosen = s.scenarios
        spec = RequestSpec.telemetry(TOPIC, 100)
        with_e = "E" in chosen or "L" in chosen
        if with_e:
            self._log("E: aiocoap do-nothing POST server (baseline)")
            with self._row("E", "aiocoap") as row, contextlib.ExitStack() as stack:
                service, port = self._server(stack, "aiocoap")
                row.result = self._load(
                    port, spec, duration=s.e_duration, watch={"aiocoap": service.pid}
                )
                row.extra |= self._cpu_extra()

        with contextlib.ExitStack() as stack:
            try:
                self._backend(stack, s.api_workers)
            except Exception as exc:
                self._fail_rows(_chain_rows(chosen), exc, "starting Redis, Mosquitto, API: ")
                return
            if with_e:
                self._scenario_e_and_l(spec, with_l="L" in chosen)
            if "D" in chosen or "H" in chosen:
                self._scenarios_dtls(spec, chosen)
            if "R" in chosen:
                self._scenario_r(spec)

    def _scenario_e_and_l(self, spec: RequestSpec, with_l: bool) -> None:
        s = self.settings
        self._log("E: coap-bridge chain (proxy → API → Redis + Mosquitto)")
        with contextlib.ExitStack() as stack:
            with self._row("E", "coap-bridge") as row:
                port = self._chain_proxy(stack, s.proxy_workers)[1]
                self._telemetry_run(row, partial(self._load, port, spec, duration=s.e_duration))
                row.extra["proxy_workers"] = s.proxy_workers
                row.extra["api_workers"] = self._api_workers
                self.e_rate = row.result.rate if row.result is not None else None
            if with_l and (row.error is not None or not self.e_rate):
                self.rows.append(
                    Row("L", "coap-bridge", error="E failed: no maximum rate to take 50% of")
                )
            elif with_l:
                rate = max(1.0, 0.5 * (self.e_rate or 0.0))
                self._log(f"L: open loop at {rate:,.0f} req/s (50% of E)")
                with self._row("L", "coap-bridge") as lrow:
                    self._telemetry_run(
                        lrow, partial(self._load, port, spec, duration=s.l_duration, mode="open",
                                      rate=rate),
                    )  # fmt: skip
            with contextlib.suppress(Exception):
                self.redis_dedup = _redis_dedup_sample(_port_of(self._redis_url))

    def _scenario_r(self, spec: RequestSpec) -> None:
        s = self.settings
        if self._api_workers != s.r_api_workers:
            self._log(f"R: restarting the API with {s.r_api_workers} worker(s)")
        self._log(
            f"R: E through coap-bridge proxy --workers {s.r_workers} (SO_REUSEPORT, dedup "
            f"shared in Redis), API workers {s.r_api_workers}"
        )
        with self._row("E", R_SYSTEM) as row, contextlib.ExitStack() as stack:
            if self._api_workers != s.r_api_workers:
                self._restart_api(s.r_api_workers)
            port = self._chain_proxy(stack, s.r_workers)[1]
            self._telemetry_run(row, partial(self._load, port, spec, duration=s.e_duration))
            row.extra["proxy_workers"] = s.r_workers
            row.extra["api_workers"] = self._api_workers

    def _scenarios_dtls(self, spec: RequestSpec, chosen: Sequence[str]) -> None:
        s = self.settings
        with contextlib.ExitStack() as stack:
            try:
                self._log(f"D/H: registering {s.dtls_clients} devices, each with its own PSK")
                credentials = self._psk_devices(s.dtls_clients)
                proxy, _, coaps_port = self._chain_proxy(stack, 1, dtls=True)
                assert coaps_port is not None
                self._wait_dtls(proxy, coaps_port, credentials[0])
            except Exception as exc:
                self._fail_rows(_chain_rows([c for c in chosen if c in "DH"]), exc)
                return
            if "D" in chosen:
                self._log(
                    f"D: E over DTLS: {len(credentials)} sessions established first, one "
                    f"request in flight each, {s.dtls_loadgen_workers} load generator process(es)"
                )
                with self._row("E", DTLS_SYSTEM) as row:
                    self._telemetry_run(
                        row, partial(self._dtls_load, coaps_port, spec, credentials)
                    )
                    row.extra["proxy_workers"] = 1
                    row.extra["api_workers"] = self._api_workers
            if "H" in chosen:
                self._scenario_h(proxy, coaps_port, credentials)

    def _scenario_h(self, proxy: Service, coaps_port: int, credentials: list[Credential]) -> None:
        s = self.settings
        self._log(
            f"H: full DTLS handshakes, fresh session each, {s.h_workers} process(es) × "
            f"{s.h_concurrency} in flight, {s.h_duration:g} s"
        )
        with self._row("H", "coap-bridge") as row:
            config = DtlsLoadConfig(
                host="127.0.0.1",
                port=coaps_port,
                credentials=credentials,
                duration=s.h_duration,
                warmup=min(1.0, s.warmup),
                workers=s.h_workers,
                concurrency=s.h_concurrency,
                handshake_timeout=s.timeout,
                # Source ports in turn from a range, each back only after the others: see the
                # note in the report on what the kernel's own choice does to the proxy.
                port_range=self.ports.take(4),
            )
            result = self._measured(
                lambda: dtls_loadgen.run_handshakes(config), {"proxy": proxy.pid}
            )
            row.handshakes = result
            row.extra = self._cpu_extra()
            try:
                proxy.check_alive()
            except RuntimeError as exc:
                # The figures stand for the time before; the row still fails the run.
                first = str(exc).splitlines()[0]
                row.error = f"{first} during the run, after {result.completed:,} handshakes"

    # -- the chain's processes

    def _backend(self, stack: contextlib.ExitStack, api_workers: int) -> None:
        s = self.settings
        redis, self._redis_url = start_redis(s.workdir / "redis")
        stack.callback(redis.stop)
        mosquitto, self._mqtt_url = start_mosquitto(s.workdir / "mosquitto")
        stack.callback(mosquitto.stop)
        self._chain = {"redis": redis, "mosquitto": mosquitto}
        self._api_key = secrets.token_urlsafe(16)
        self._proxy_token = secrets.token_urlsafe(16)
        stack.callback(self._stop_api)
        self._restart_api(api_workers)
        _register_device(self._api_port, self._api_key, self._chain["api"], DEVICE)

    def _restart_api(self, workers: int) -> None:
        self._stop_api()
        self._chain["api"], self._api_port = services.start_api(
            self.settings.workdir, redis_url=self._redis_url, mqtt_url=self._mqtt_url,
            api_key=self._api_key, proxy_token=self._proxy_token, workers=workers,
        )  # fmt: skip
        self._api_workers = workers

    def _stop_api(self) -> None:
        api = self._chain.pop("api", None)
        if api is not None:
            api.stop()

    def _chain_proxy(
        self, stack: contextlib.ExitStack, workers: int, dtls: bool = False
    ) -> tuple[Service, int, int | None]:
        """A proxy in front of the running API, stopped when ``stack`` closes: (service, CoAP
        port, coaps port or None)."""
        coaps_port = free_port() if dtls else None
        proxy, port = self._server(
            stack, "coap-bridge", upstream=f"http://127.0.0.1:{self._api_port}",
            token=self._proxy_token, redis_url=self._redis_url, workers=workers,
            coaps_port=coaps_port,
        )  # fmt: skip
        self._chain["proxy"] = proxy
        return proxy, port, coaps_port

    def _psk_devices(self, count: int) -> list[Credential]:
        """``count`` devices registered through the API, each with its own PSK: the DTLS
        identity is the ICCID, and dedup keys on (identity, MID), so every load generator
        client needs an identity of its own."""
        import httpx

        self._dtls_batch += 1
        credentials: list[Credential] = []
        headers = {"Authorization": f"Bearer {self._api_key}"}
        base = f"http://127.0.0.1:{self._api_port}"
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            for n in range(count):
                number = self._dtls_batch * 10_000 + n
                iccid = f"898828066620{number:07d}"
                ip = f"10.{200 + self._dtls_batch}.{n // 250}.{n % 250 + 1}"
                psk = secrets.token_hex(8)  # 16 characters: tinydtls takes at most 16 bytes
                device = {"iccid": iccid, "ip": ip, "status": "active"}
                answer = client.post("/devices", json=device)
                if answer.status_code not in (200, 201):
                    raise RuntimeError(
                        f"POST /devices answered {answer.status_code}: {answer.text}"
                    )
                answer = client.put(f"/devices/{iccid}/psk", json={"psk": psk, "format": "plain"})
                if answer.status_code >= 300:
                    raise RuntimeError(
                        f"PUT /devices/{iccid}/psk answered {answer.status_code}: {answer.text}"
                    )
                credentials.append((iccid, psk.encode()))
        return credentials

    def _wait_dtls(self, proxy: Service, coaps_port: int, credential: Credential) -> None:
        """Until one handshake with ``credential`` completes: the DTLS listener is up and the
        proxy's PSK mirror holds the keys."""
        import asyncio

        async def handshake() -> bool:
            endpoint = dtls_loadgen.Endpoint(*credential)
            try:
                return await endpoint.connect("127.0.0.1", coaps_port, 1.0)
            finally:
                endpoint.close()

        proxy.wait_until(lambda: asyncio.run(handshake()), 30.0, "completing a DTLS handshake")

    # -- loads

    def _dtls_load(
        self,
        coaps_port: int,
        spec: RequestSpec,
        credentials: list[Credential],
        *,
        watch: dict[str, int],
    ) -> LoadResult:
        """One load over DTLS sessions, measured (:meth:`_measured`)."""
        s = self.settings
        self._seq_tag += 1
        config = DtlsLoadConfig(
            host="127.0.0.1", port=coaps_port, credentials=credentials, spec=spec,
            duration=s.e_duration, warmup=s.warmup, timeout=s.timeout,
            workers=s.dtls_loadgen_workers, seq_base=self._seq_tag << 56,
            handshake_timeout=s.timeout,
        )  # fmt: skip
        return self._measured(lambda: dtls_loadgen.run_sessions(config), watch)

    def _telemetry_run(self, row: Row, load: Callable[..., LoadResult]) -> None:
        """``load`` with an MQTT subscriber as witness: fills ``row`` with the result and what
        was lost or duplicated between the acknowledgements and MQTT."""
        witness: Subscriber | MosquittoSubscriber
        if self.settings.subscriber == "aiomqtt":
            witness = Subscriber(self._mqtt_url, TOPIC)
        else:
            witness = MosquittoSubscriber(
                self._mqtt_url, TOPIC, self.settings.workdir / "subscriber"
            )
        with witness as subscriber:
            watch = {name: svc.pid for name, svc in self._chain.items()}
            watch["subscriber"] = subscriber.pid
            result = load(watch=watch)
            cpu_extra = self._cpu_extra()
            subscriber.settle(result.sent, quiet=1.5, limit=15.0)
            received = subscriber.close()
        for service in self._chain.values():
            service.check_alive()
        mine = Counter(seq for seq in received if seq >> 56 == self._seq_tag)
        acked = result.acked()
        lost, duplicated = check_delivery(acked, mine)
        acked_set = set(acked)
        unacked = sum(1 for seq in mine if seq not in acked_set)
        row.result = result
        row.extra = {
            "acked": len(acked),
            "delivered": sum(mine.values()),
            "lost": lost,
            "duplicated": duplicated,
            "delivered_unacked": unacked,
            "foreign": len(received) - sum(mine.values()),
            "status": "OK" if lost == 0 and duplicated == 0 else "FAILED",
            **cpu_extra,
        }
        self._log(
            f"  MQTT: {len(acked)} acked, {sum(mine.values())} delivered, lost {lost}, "
            f"duplicated {duplicated}, delivered but not acked {unacked}"
        )

    # --- M -----------------------------------------------------------------------------------

    def scenario_m(self) -> None:
        s = self.settings
        self._log(f"M: proxy RSS before/after T at full rate for {s.m_duration:g} s")
        with self._row("M", "coap-bridge") as row:
            env = {"COAP_BRIDGE_DEDUP_MAX_ENTRIES": str(s.m_dedup_max_entries)}
            with contextlib.ExitStack() as stack:
                service, port = self._server(stack, "coap-bridge", env=env)
                time.sleep(0.5)
                with RssSampler(service.pid, max(1.0, s.m_duration / 6)) as rss:
                    result = self._load(
                        port, RequestSpec.wkc(), duration=s.m_duration, warmup=0.0,
                        watch={"coap-bridge": service.pid},
                    )  # fmt: skip
                service.check_alive()
                before, after = rss.before, rss_bytes(service.pid)
                samples = [(0.0, before), *rss.samples]
            held = result.sent
            if s.m_duration > EXCHANGE_LIFETIME:
                held = round(result.sent * EXCHANGE_LIFETIME / (s.m_duration + 0.0))
            if s.m_duration < EXCHANGE_LIFETIME:
                self.notes.append(
                    f"M ran {s.m_duration:g} s, less than the 247 s exchange lifetime: no entry "
                    "expired yet, so it shows growth per exchange, not the plateau "
                    "(run with --m-duration 300 to see RSS level off)."
                )
            if samples[-1][0] < result.window - 1:
                samples.append((result.window, after))
            row.result = result
            row.extra = {
                "rss_before": before,
                "rss_after": after,
                "rss_delta": after - before,
                "exchanges_held": held,
                "bytes_per_exchange": (after - before) / held if held else None,
                "rss_samples": samples,
            }
            self._log(
                f"  RSS {before / 2**20:.1f} MiB → {after / 2**20:.1f} MiB over {held} exchanges: "
                f"{row.extra['bytes_per_exchange'] or 0:.0f} B/exchange"
            )

    # --- all ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Each chosen scenario's method once, in the order of :data:`SCENARIOS` (E, L, R, D
        and H share one method: one Redis, Mosquitto and API for all of them)."""
        chosen = self.settings.scenarios
        methods = [SCENARIOS[name].method for name in SCENARIOS if name in chosen]
        for method in dict.fromkeys(methods):
            getattr(self, method)()

    def failed(self) -> bool:
        return any(
            row.error is not None or row.extra.get("status") == "FAILED" for row in self.rows
        )


def _chain_rows(chosen: Sequence[str]) -> list[tuple[str, str]]:
    """The rows the chosen chain scenarios add, to fail all at once when the chain is down."""
    rows = []
    if "E" in chosen or "L" in chosen:
        rows.append(("E", "coap-bridge"))
    if "L" in chosen:
        rows.append(("L", "coap-bridge"))
    if "D" in chosen:
        rows.append(("E", DTLS_SYSTEM))
    if "H" in chosen:
        rows.append(("H", "coap-bridge"))
    if "R" in chosen:
        rows.append(("E", R_SYSTEM))
    return rows


def _origin_answers(log: Path) -> dict[str, int]:
    """The last ``answers {...}`` line bench/origin.py printed as it stopped."""
    import json

    lines = [line for line in log.read_text().splitlines() if line.startswith("answers ")]
    if not lines:
        raise RuntimeError(f"the origin printed no answer counts:\n{log.read_text()[-2000:]}")
    answers: dict[str, int] = json.loads(lines[-1].split(" ", 1)[1])
    return answers


class RssSampler:
    """RSS of ``pid`` (with its children) every ``interval`` seconds in a thread: ``before``
    on entry, ``samples`` as (seconds since entry, bytes)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.before = 0
        self.started = 0.0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic() - self.started, rss_bytes(self.pid)))

    def __enter__(self) -> RssSampler:
        self.before = rss_bytes(self.pid)
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def block_memory(
    samples: Sequence[tuple[float, int]],
    before: int,
    window_start: float,
    window_end: float,
    clients: int,
    load_start: float = 0.0,
) -> dict[str, Any]:
    """Server memory per transfer in progress, from RSS samples (seconds, bytes) of one B run.

    ``rss_per_transfer``: (peak − before) / clients, an upper bound: it also holds what grows
    with the number of requests (a server's exchange cache keeps every CON for 247 s, M).
    ``rss_per_transfer_corrected``: a line fitted to the samples inside the measured window
    (all transfers running, so its slope is the per-request growth) and followed back to the
    start of the load; what it stands above ``before`` came with the transfers being in
    progress, divided by their number. None without two samples in the window."""
    peak = max([before, *(rss for _, rss in samples)])
    window = [(t, rss) for t, rss in samples if window_start <= t <= window_end]
    corrected: float | None = None
    slope: float | None = None
    if len(window) >= 2 and clients > 0:
        mean_t = sum(t for t, _ in window) / len(window)
        mean_rss = sum(rss for _, rss in window) / len(window)
        spread = sum((t - mean_t) ** 2 for t, _ in window)
        slope = (
            sum((t - mean_t) * (rss - mean_rss) for t, rss in window) / spread if spread else 0.0
        )
        at_start = mean_rss - slope * (mean_t - load_start)
        corrected = max(0.0, (at_start - before) / clients)
    return {
        "rss_before": before,
        "rss_peak": peak,
        "rss_delta": peak - before,
        "rss_per_transfer": (peak - before) / clients if clients > 0 else None,
        "rss_per_transfer_corrected": corrected,
        "rss_growth_per_second": slope,
        "rss_samples": list(samples),
    }


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _register_device(api_port: int, api_key: str, api: Service, device: dict[str, str]) -> None:
    import httpx

    response = httpx.post(
        f"http://127.0.0.1:{api_port}/devices",
        headers={"Authorization": f"Bearer {api_key}"},
        json=device,
        timeout=10,
    )
    if response.status_code not in (200, 201, 409):
        raise RuntimeError(
            f"POST /devices answered {response.status_code}: {response.text}\n{api.log_tail()}"
        )


def _redis_dedup_sample(port: int, sample: int = 500) -> dict[str, Any]:
    """``MEMORY USAGE`` over up to ``sample`` keys ``cb:dd:*``."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
    try:
        keys: list[bytes] = []
        for key in client.scan_iter(match="cb:dd:*", count=1000):
            keys.append(key)
            if len(keys) >= sample:
                break
        if not keys:
            return {"keys_sampled": 0, "dbsize": client.dbsize()}
        sizes = [client.memory_usage(key, samples=0) or 0 for key in keys]
        info = client.info("memory")
        return {
            "keys_sampled": len(keys),
            "dbsize": client.dbsize(),
            "bytes_per_entry": sum(sizes) / len(sizes),
            "used_memory": info.get("used_memory"),
        }
    finally:
        client.close()


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="coap-bridge-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
