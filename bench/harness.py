"""The scenarios T, E, L, M (see ``bench/__init__.py``): start the systems, drive them with
:mod:`bench.loadgen`, stop them, and collect one row per system."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import LoadConfig, LoadResult, RequestSpec
from bench.services import (
    Service,
    coap_ready,
    cpu_seconds,
    free_port,
    redis_command,
    rss_bytes,
    start_mosquitto,
    start_redis,
    tcp_ready,
    which,
)
from bench.subscriber import MosquittoSubscriber, Subscriber, check_delivery

DEVICE = {"iccid": "8988280666000000001", "ip": "127.0.0.1", "status": "active"}
TOPIC = "bench/x"
SYSTEMS = ("coap-bridge", "libcoap", "aiocoap")
EXCHANGE_LIFETIME = 247.0


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
    # The proxy caps its dedup table (COAP_BRIDGE_DEDUP_MAX_ENTRIES); for M it must hold every
    # exchange, or bytes/exchange would be measured on evicted entries.
    m_dedup_max_entries: int = 100_000_000


@dataclass
class Row:
    scenario: str
    system: str
    result: LoadResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"scenario": self.scenario, "system": self.system}
        if self.result is not None:
            r = self.result
            data |= {
                "rate": r.rate,
                "offered_rate": r.offered_rate,
                "sent": r.sent,
                "completed": r.completed,
                "in_window": r.in_window,
                "window": r.window,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "p999_ms": r.p999_ms,
                "timeouts": r.timeouts,
                "separate": r.separate,
                "codes": r.codes,
                "send_errors": r.send_errors,
                "sockets": r.sockets,
            }
        data |= self.extra
        if self.error is not None:
            data["error"] = self.error
        return data


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

    def take(self) -> tuple[int, int]:
        low = self.next
        if low + self.block > self.high:
            low = 10000  # wrapped: only after many runs (minutes), and ports are skipped if busy
        self.next = low + self.block
        return low, low + self.block


def _coap_bridge() -> str:
    local = Path(sys.executable).with_name("coap-bridge")
    return str(local) if local.exists() else which("coap-bridge")


def _clean_env() -> dict[str, str]:
    """Our processes get their settings from flags only, never from the caller's COAP_BRIDGE_*."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}


_HELP_CACHE: dict[str, str] = {}


def _supports(command: str, flag: str) -> bool:
    if command not in _HELP_CACHE:
        out = subprocess.run(
            [_coap_bridge(), command, "--help"], capture_output=True, text=True, timeout=60
        )
        _HELP_CACHE[command] = out.stdout + out.stderr
    return flag in _HELP_CACHE[command]


def _workers_flag(command: str, workers: int) -> list[str]:
    if workers <= 1:
        return []
    if not _supports(command, "--workers"):
        raise RuntimeError(f"coap-bridge {command} has no --workers flag yet")
    return ["--workers", str(workers)]


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
        self._chain_services: tuple[Service, ...] = ()
        self._chain_mqtt_url = ""

    # --- helpers -----------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

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
        """One load run; the CPU seconds the ``watch`` processes (name → pid) spent meanwhile
        (warm-up and drain included) land in ``self.last_cpu``."""
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
        watch = watch or {}
        before = {name: cpu_seconds(pid) for name, pid in watch.items()}
        own = os.times()
        result = loadgen.run_load(config)
        own_after = os.times()
        self.last_cpu = {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()}
        self.last_cpu["load generator"] = sum(own_after[:4]) - sum(own[:4])
        self._log(f"  {result.summary()}")
        cpu = ", ".join(f"{name} {sec:.1f}" for name, sec in self.last_cpu.items())
        self._log(f"  CPU seconds: {cpu}")
        return result

    def _service(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, self.settings.workdir / name)
        service.start(env=env if env is not None else _clean_env())
        return service

    def _coap_server(self, system: str, **proxy: Any) -> tuple[Service, int]:
        port = free_port()
        if system == "coap-bridge":
            service = self._proxy(port, **proxy)
        elif system == "libcoap":
            argv = [which("coap-server-notls"), "-A", "127.0.0.1", "-p", str(port), "-v", "0"]
            service = self._service("libcoap", argv)
        elif system == "aiocoap":
            script = str(Path(__file__).with_name("aiocoap_server.py"))
            argv = [sys.executable, script, "--host", "127.0.0.1", "--port", str(port)]
            service = self._service("aiocoap", argv)
        else:
            raise ValueError(f"unknown system {system!r}")
        try:
            service.wait_until(lambda: coap_ready(port), 30.0, "answering CoAP")
            if system == "coap-bridge" and self.settings.proxy_workers > 1:
                time.sleep(1.0)  # the other SO_REUSEPORT workers
        except BaseException:
            service.stop()
            raise
        return service, port

    def _proxy(
        self,
        port: int,
        upstream: str = "http://127.0.0.1:9",
        token: str = "bench",
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Service:
        argv = [
            _coap_bridge(), "proxy", "--coap-host", "127.0.0.1", "--coap-port", str(port),
            "--upstream", upstream, f"--proxy-token={token}", "--log-level", "warning",
        ]  # fmt: skip
        argv += _workers_flag("proxy", self.settings.proxy_workers)
        if redis_url is not None and _supports("proxy", "--redis-url"):
            argv.append(f"--redis-url={redis_url}")
        full_env = _clean_env() | (env or {})
        return self._service("coap-bridge-proxy", argv, env=full_env)

    # --- T -----------------------------------------------------------------------------------

    def scenario_t(self) -> None:
        for system in self.settings.t_systems:
            self._log(f"T: {system}, CON GET /.well-known/core, closed loop")
            row = Row("T", system)
            try:
                service, port = self._coap_server(system)
                try:
                    row.result = self._load(
                        port, RequestSpec.wkc(), duration=self.settings.duration,
                        watch={system: service.pid},
                    )  # fmt: skip
                    row.extra["cpu"] = self.last_cpu
                    service.check_alive()
                finally:
                    service.stop()
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                self._log(f"  ERROR {row.error}")
            self.rows.append(row)

    # --- E and L -----------------------------------------------------------------------------

    def scenario_e(self, with_l: bool, with_e_rows: bool = True) -> None:
        s = self.settings
        spec = RequestSpec.telemetry(TOPIC, 100)
        if with_e_rows:
            self._log("E: aiocoap do-nothing POST server (baseline)")
            row = Row("E", "aiocoap")
            try:
                service, port = self._coap_server("aiocoap")
                try:
                    row.result = self._load(
                        port, spec, duration=s.e_duration, watch={"aiocoap": service.pid}
                    )
                    row.extra["cpu"] = self.last_cpu
                finally:
                    service.stop()
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                self._log(f"  ERROR {row.error}")
            self.rows.append(row)

        self._log("E: coap-bridge chain (proxy → API → Redis + Mosquitto)")
        row = Row("E", "coap-bridge")
        with contextlib.ExitStack() as stack:
            try:
                port, redis_port = self._chain(stack)
                row = self._telemetry_run(
                    "E", port, spec, mode="closed", rate=0.0, duration=s.e_duration
                )
                if row.result is not None:
                    self.e_rate = row.result.rate
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                self._log(f"  ERROR {row.error}")
                redis_port = None
            self.rows.append(row)
            if with_l:
                lrow = Row("L", "coap-bridge")
                if row.error is None and self.e_rate:
                    rate = max(1.0, 0.5 * self.e_rate)
                    self._log(f"L: open loop at {rate:,.0f} req/s (50% of E)")
                    try:
                        lrow = self._telemetry_run(
                            "L", port, spec, mode="open", rate=rate, duration=s.l_duration
                        )
                    except Exception as exc:
                        lrow.error = f"{type(exc).__name__}: {exc}"
                        self._log(f"  ERROR {lrow.error}")
                else:
                    lrow.error = "E failed: no maximum rate to take 50% of"
                self.rows.append(lrow)
            if redis_port is not None:
                self.redis_dedup = _redis_dedup_sample(redis_port)

    def _chain(self, stack: contextlib.ExitStack) -> tuple[int, int]:
        s = self.settings
        redis, redis_url = start_redis(s.workdir / "redis")
        stack.callback(redis.stop)
        mosquitto, mqtt_url = start_mosquitto(s.workdir / "mosquitto")
        stack.callback(mosquitto.stop)
        api_port = free_port()
        api_key = secrets.token_urlsafe(16)
        token = secrets.token_urlsafe(16)
        argv = [
            _coap_bridge(), "api", "--api-host", "127.0.0.1", "--api-port", str(api_port),
            f"--redis-url={redis_url}", f"--mqtt-url={mqtt_url}", f"--api-key={api_key}",
            f"--proxy-token={token}", "--log-level", "warning",
        ]  # fmt: skip
        argv += _workers_flag("api", s.api_workers)
        api = self._service("coap-bridge-api", argv)
        stack.callback(api.stop)
        api.wait_until(lambda: tcp_ready(api_port), 30.0, "accepting HTTP")
        _register_device(api_port, api_key, api)
        port = free_port()
        proxy = self._proxy(port, f"http://127.0.0.1:{api_port}", token, redis_url)
        stack.callback(proxy.stop)
        proxy.wait_until(lambda: coap_ready(port), 30.0, "answering CoAP")
        if s.proxy_workers > 1:
            time.sleep(1.0)
        self._chain_services = (redis, mosquitto, api, proxy)
        self._chain_mqtt_url = mqtt_url
        return port, _port_of(redis_url)

    def _telemetry_run(
        self,
        scenario: str,
        port: int,
        spec: RequestSpec,
        *,
        mode: str,
        rate: float,
        duration: float,
    ) -> Row:
        row = Row(scenario, "coap-bridge")
        mqtt_url = self._mqtt_url()
        witness: Subscriber | MosquittoSubscriber
        if self.settings.subscriber == "aiomqtt":
            witness = Subscriber(mqtt_url, TOPIC)
        else:
            witness = MosquittoSubscriber(mqtt_url, TOPIC, self.settings.workdir / "subscriber")
        with witness as subscriber:
            names = ("redis", "mosquitto", "api", "proxy")
            watch = {n: svc.pid for n, svc in zip(names, self._chain_services, strict=True)}
            watch["subscriber"] = subscriber.pid
            result = self._load(port, spec, duration=duration, mode=mode, rate=rate, watch=watch)
            cpu = self.last_cpu
            subscriber.settle(result.sent, quiet=1.5, limit=15.0)
            received = subscriber.close()
        for service in self._chain_services:
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
            "cpu": cpu,
        }
        self._log(
            f"  MQTT: {len(acked)} acked, {sum(mine.values())} delivered, lost {lost}, "
            f"duplicated {duplicated}, delivered but not acked {unacked}"
        )
        return row

    def _mqtt_url(self) -> str:
        return self._chain_mqtt_url

    # --- M -----------------------------------------------------------------------------------

    def scenario_m(self) -> None:
        s = self.settings
        self._log(f"M: proxy RSS before/after T at full rate for {s.m_duration:g} s")
        row = Row("M", "coap-bridge")
        try:
            env = {"COAP_BRIDGE_DEDUP_MAX_ENTRIES": str(s.m_dedup_max_entries)}
            service, port = self._coap_server("coap-bridge", env=env)
            try:
                time.sleep(0.5)
                before = rss_bytes(service.pid)
                samples: list[tuple[float, int]] = [(0.0, before)]
                stop = threading.Event()

                def sample() -> None:
                    t0 = time.monotonic()
                    while not stop.wait(max(1.0, s.m_duration / 6)):
                        samples.append((time.monotonic() - t0, rss_bytes(service.pid)))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    result = self._load(
                        port,
                        RequestSpec.wkc(),
                        duration=s.m_duration,
                        warmup=0.0,
                        watch={"coap-bridge": service.pid},
                    )
                finally:
                    stop.set()
                    sampler.join()
                service.check_alive()
                after = rss_bytes(service.pid)
            finally:
                service.stop()
            held = result.sent
            if s.m_duration > EXCHANGE_LIFETIME:
                held = round(result.sent * EXCHANGE_LIFETIME / (s.m_duration + 0.0))
            if s.m_duration < EXCHANGE_LIFETIME:
                self.notes.append(
                    f"M ran {s.m_duration:g} s, less than the 247 s exchange lifetime: no entry "
                    "expired yet, so it shows growth per exchange, not the plateau "
                    "(run with --m-duration 300 to see RSS level off)."
                )
            row.result = result
            row.extra = {
                "rss_before": before,
                "rss_after": after,
                "rss_delta": after - before,
                "exchanges_held": held,
                "bytes_per_exchange": (after - before) / held if held else None,
                "rss_samples": samples
                if samples[-1][0] >= result.window - 1
                else [*samples, (result.window, after)],
            }
            self._log(
                f"  RSS {before / 2**20:.1f} MiB → {after / 2**20:.1f} MiB over {held} exchanges: "
                f"{row.extra['bytes_per_exchange'] or 0:.0f} B/exchange"
            )
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            self._log(f"  ERROR {row.error}")
        self.rows.append(row)

    # --- all ---------------------------------------------------------------------------------

    def run(self) -> None:
        chosen = self.settings.scenarios
        if "T" in chosen:
            self.scenario_t()
        if "E" in chosen or "L" in chosen:
            self.scenario_e(with_l="L" in chosen, with_e_rows=True)
        if "M" in chosen:
            self.scenario_m()

    def failed(self) -> bool:
        return any(
            row.error is not None or row.extra.get("status") == "FAILED" for row in self.rows
        )


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _register_device(api_port: int, api_key: str, api: Service) -> None:
    import httpx

    response = httpx.post(
        f"http://127.0.0.1:{api_port}/devices",
        headers={"Authorization": f"Bearer {api_key}"},
        json=DEVICE,
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


__all__ = ["Bench", "Row", "Settings", "redis_command", "workdir"]
