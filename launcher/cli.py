"""``coap-bridge up | proxy | api``.

Every flag is also an environment variable ``COAP_BRIDGE_<FLAG>`` (``--coap-port`` is
``COAP_BRIDGE_COAP_PORT``); a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import ipaddress
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.app import create_app, create_app_from_env
from api.settings import ApiSettings
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from launcher import check, client, logs
from launcher.broker import EmbeddedBroker
from launcher.heap import freeze_startup_heap
from launcher.listeners import bind_tcp, describe
from policies.profiles import (
    DEFAULT_PROFILES,
    FLAG_VALUES,
    UnknownProfile,
    known_names,
    profile_names,
)
from policies.routes import PolicyError
from proxy.metrics import worker_metrics
from proxy.server import ListenerError, RunningProxy, start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore
from stores.relations import MemoryRelationRecords

log = logging.getLogger("coap_bridge")

DEMO_ICCID = "8988280666000000001"
DEMO_IP = "127.0.0.1"
# The default profile as a user would name it on the command line.
DEFAULT_FLAG = next(value for value, name in FLAG_VALUES.items() if name == DEFAULT_PROFILES[0])


class LauncherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COAP_BRIDGE_", extra="ignore")

    mqtt_port: int = 1883
    mqtt_host: str = "127.0.0.1"
    """Where the embedded broker listens: loopback unless asked (it allows anonymous clients);
    a container passes 0.0.0.0 so that a published port reaches it (Dockerfile)."""
    demo_ip: str = DEMO_IP
    """The source address the demo device of ``up`` is registered for, or ``gateway``: the
    default route's gateway, where datagrams from a container's host arrive from (the bridge
    network's gateway, through Docker's port publishing)."""
    log_level: str = "info"
    log_format: logs.LogFormat = "text"
    """``text`` (the classic line) or ``json`` (one object per line): launcher/logs.py."""
    workers: int = Field(default=1, ge=1, le=64)
    drain_timeout: float = Field(default=10.0, ge=0)
    """Seconds a SIGTERM/SIGINT leaves for what is in flight: the proxy answers it and
    retransmits separate responses until ACKed (RFC 7252 §4.2), the API finishes its requests
    (publishes included); then the process exits. Under ``up`` one deadline covers both."""


_FLAGS: list[tuple[str, type, str, tuple[str, ...]]] = [
    # flag, type, help, subcommands
    ("--coap-host", str, "CoAP UDP bind address (default 0.0.0.0)", ("up", "proxy")),
    ("--coap-port", int, "CoAP UDP port (default 5683)", ("up", "proxy")),
    ("--coaps-host", str, "CoAP-over-DTLS bind address (default: --coap-host)", ("up", "proxy")),
    ("--coaps-port", str, "CoAP-over-DTLS port (default 5684; 'off': no DTLS)", ("up", "proxy")),
    (
        "--metrics-port",
        str,
        "proxy: HTTP port of /metrics, /healthz, /readyz (default off; worker i: port + i)",
        ("up", "proxy"),
    ),
    ("--metrics-host", str, "proxy: metrics listener address (default 127.0.0.1)", ("up", "proxy")),
    (
        "--require-dtls",
        bool,
        "plain CoAP serves only the routes marked plain, such as /bootstrap (production)",
        ("up", "proxy"),
    ),
    (
        "--udp-receive-buffer",
        int,
        "bytes of receive buffer for each UDP socket (default 4 MiB; 0: the kernel's default)",
        ("up", "proxy"),
    ),
    (
        "--dtls-connection-id",
        str,
        "on (default) or off: DTLS Connection ID (RFC 9146) for clients that offer it",
        ("up", "proxy"),
    ),
    ("--api-host", str, "HTTP API bind address (default 127.0.0.1)", ("up", "api")),
    ("--api-port", int, "HTTP API port (default 8080)", ("up", "api")),
    ("--redis-url", str, "Redis URL for shared state (unset: in memory)", ("up", "proxy", "api")),
    ("--mqtt-url", str, "MQTT broker URL (unset under 'up': embedded broker)", ("up", "api")),
    ("--mqtt-port", int, "port of the embedded MQTT broker (default 1883)", ("up",)),
    (
        "--mqtt-host",
        str,
        "bind address of the embedded MQTT broker (default 127.0.0.1; 0.0.0.0: reachable from "
        "outside, anonymous clients included)",
        ("up",),
    ),
    (
        "--demo-ip",
        str,
        "source address of the demo device of 'up' without Redis (default 127.0.0.1; "
        "'gateway': the default gateway's, as in a container)",
        ("up",),
    ),
    ("--mqtt-protocol", str, "MQTT version to the broker: 5 (default) or 3.1.1", ("up", "api")),
    ("--mqtt-ca", str, "mqtts://: PEM CA bundle (default: system trust store)", ("up", "api")),
    ("--mqtt-cert", str, "mqtts://: PEM client certificate", ("up", "api")),
    ("--mqtt-key", str, "mqtts://: PEM key of --mqtt-cert (if not in that file)", ("up", "api")),
    ("--mqtt-username", str, "MQTT user name (overrides the URL's)", ("up", "api")),
    (
        "--mqtt-password",
        str,
        "MQTT password (overrides the URL's; prefer env COAP_BRIDGE_MQTT_PASSWORD)",
        ("up", "api"),
    ),
    ("--mqtt-client-id", str, "MQTT client id (default coap-bridge-<random>)", ("up", "api")),
    ("--upstream", str, "proxy: base URL of the HTTP backend", ("up", "proxy")),
    ("--upstream-ca", str, "PEM CA bundle for an https upstream", ("up", "proxy")),
    (
        "--policy",
        str,
        "route policy file (TOML): replaces the profiles' route tables (they still pick the "
        "API resources)",
        ("up", "proxy"),
    ),
    ("--api-key", str, "Bearer key of the management API (generated by 'up')", ("up", "api")),
    ("--proxy-token", str, "secret the proxy presents to the backend", ("up", "proxy", "api")),
    ("--log-level", str, "debug, info, warning, error (default info)", ("up", "proxy", "api")),
    (
        "--log-format",
        str,
        "text, or json: one JSON object per line, uvicorn's lines included (default text)",
        ("up", "proxy", "api"),
    ),
    (
        "--log-interval",
        float,
        "seconds between the request log's summary lines at info level (default 10)",
        ("up", "proxy", "api"),
    ),
    ("--block-size", int, "largest CoAP payload sent; more goes block-wise", ("up", "proxy")),
    (
        "--max-observers-per-device",
        int,
        "Observe relations per device (default 4); beyond: answered without Observe",
        ("up", "proxy"),
    ),
    ("--max-observers", int, "Observe relations per process (default 100000)", ("up", "proxy")),
    ("--workers", int, "processes (proxy: SO_REUSEPORT; api: uvicorn workers)", ("proxy", "api")),
    (
        "--drain-timeout",
        float,
        "seconds to finish what is in flight on SIGTERM/SIGINT (default 10)",
        ("up", "proxy", "api"),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-bridge",
        description="CoAP → HTTP → MQTT protocol-translating reverse proxy.",
        epilog="Every flag can also be set as COAP_BRIDGE_<NAME> in the environment.",
    )
    parser.add_argument("--version", action="version", version=f"coap-bridge {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "up": "proxy + API (+ embedded MQTT broker) in one process",
        "proxy": "the CoAP front end only",
        "api": "the HTTP backend only",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        for flag, kind, flag_help, where in _FLAGS:
            if name not in where:
                continue
            if kind is bool:
                sub.add_argument(
                    flag, action="store_const", const=True, default=None, help=flag_help
                )
            else:
                sub.add_argument(flag, type=kind, default=None, help=flag_help)
        sub.add_argument(
            "--profile",
            dest="profiles",
            action="append",
            type=_profile_flag,
            default=None,
            metavar="NAME[,NAME]",
            help=f"device profile, repeatable or a comma list (default {DEFAULT_FLAG}); "
            f"env COAP_BRIDGE_PROFILES; known: {known_names()}",
        )
    # The management API's client and the policy check (launcher/client.py, launcher/check.py).
    client.add_parsers(commands)
    check.add_parser(commands, _profile_flag)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("coap-bridge")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that was not installed
        return "unknown (not installed)"


def _profile_flag(value: str) -> str:
    """One ``--profile`` value, checked at parse time (argparse reports a bad one with the
    usage line); the settings turn it into code names (policies/profiles)."""
    try:
        profile_names(value)
    except UnknownProfile as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: value for key, value in vars(args).items() if value is not None and key != "command"
    }


def _connect_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher owns shutdown of every part."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind_api(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound here rather than by uvicorn: a port in use is then one
    line naming the setting (ListenerError), before the app starts, instead of uvicorn's log
    and exit. Listening at once: under ``up`` the proxy may forward before uvicorn serves, and
    its connections wait in the backlog instead of being refused."""
    try:
        sock = bind_tcp(host, port)
    except OSError as exc:
        raise ListenerError(
            "HTTP API", host, port, exc, host_setting="api_host", port_setting="api_port"
        ) from exc
    sock.listen(2048)
    return sock


async def _start_api(
    app: Any, sock: socket.socket, log_level: str, drain_timeout: float
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    # proxy_headers=False: the client address is never rewritten from X-Forwarded-For here;
    # the onboarding endpoint decides itself which proxies it trusts (trusted_proxy_networks).
    # timeout_graceful_shutdown: on should_exit uvicorn stops accepting, lets the requests in
    # flight finish (a publish waits for its PUBACK inside its request) for that long, then
    # cancels what is left and runs the lifespan shutdown.
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=logs.uvicorn_log_config(),
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=_whole_seconds(drain_timeout),
    )
    server = _EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise SystemExit(f"HTTP API could not start on {host}:{port}")
        await asyncio.sleep(0.02)
    return server, task


def _whole_seconds(grace: float) -> int:
    """uvicorn takes its graceful-shutdown timeout in whole seconds: round up, never below 0."""
    return max(math.ceil(grace), 0)


async def _stop_api(server: uvicorn.Server, task: asyncio.Task[None], grace: float) -> None:
    server.config.timeout_graceful_shutdown = _whole_seconds(grace)
    server.should_exit = True
    await task


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_up(given: dict[str, Any]) -> None:
    launcher = LauncherSettings(**given)
    api_settings = ApiSettings(**given)
    updates: dict[str, Any] = {}
    if api_settings.proxy_token is None:
        updates["proxy_token"] = secrets.token_urlsafe(32)
    if api_settings.api_key is None:
        updates["api_key"] = secrets.token_urlsafe(24)
    proxy_given = dict(given)
    proxy_given["proxy_token"] = updates.get("proxy_token", api_settings.proxy_token)
    proxy_settings = ProxySettings(**proxy_given)
    if "upstream" not in proxy_settings.model_fields_set:
        proxy_settings = proxy_settings.model_copy(
            update={
                "upstream": f"http://{_connect_host(api_settings.api_host)}:{api_settings.api_port}"
            }
        )
    stop = _stop_event()
    broker: EmbeddedBroker | None = None
    api_socket: socket.socket | None = None
    proxy: RunningProxy | None = None
    try:
        if "mqtt_url" not in api_settings.model_fields_set:
            broker = EmbeddedBroker(launcher.mqtt_host, launcher.mqtt_port)
            await broker.start()
            updates["mqtt_url"] = f"mqtt://{_connect_host(launcher.mqtt_host)}:{broker.port}"
            updates["mqtt_protocol"] = "3.1.1"
            updates["command_share_group"] = None  # the embedded broker has no $share
            log.info("embedded MQTT broker (MQTT 3.1.1) listening on %s", broker.url)
        api_socket = _bind_api(api_settings.api_host, api_settings.api_port)
        store = None
        psk_store = None
        if api_settings.redis_url is None:
            store = MemoryDeviceStore()
            psk_store = _mirror_psks(store)
            demo_ip = demo_address(launcher.demo_ip)
            await store.create(Device(id=DEMO_ICCID, iccid=DEMO_ICCID, ip=demo_ip, status="active"))
            log.info(
                "in-memory state: demo device %s registered for source address %s",
                DEMO_ICCID,
                demo_ip,
            )
        else:
            log.info("shared state in Redis at %s", api_settings.redis_url)
        # The proxy before the API: /bootstrap hands out the coaps URL the proxy actually
        # serves (the port it bound, none with --coaps-port off) unless coaps_url is set. Its
        # first forwards wait in the API socket's backlog until uvicorn serves.
        # Without Redis the API learns who observes from the proxy's memory, in this process.
        relations = MemoryRelationRecords() if api_settings.redis_url is None else None
        proxy = await start_proxy(proxy_settings, psk_store=psk_store, relations=relations)
        served = proxy.dtls_address
        updates["coaps_port"] = served[1] if served is not None else "off"
        api_settings = api_settings.model_copy(update=updates)
        if "api_key" in updates:
            log.info("management API key (generated): %s", api_settings.api_key)
        server, api_task = await _start_api(
            create_app(api_settings, store=store, relations=relations),
            api_socket,
            launcher.log_level,
            launcher.drain_timeout,
        )
    except BaseException:
        # A part that could not start (a port in use): stop the ones already running.
        if proxy is not None:
            await proxy.close()
        if api_socket is not None:
            api_socket.close()
        if broker is not None:
            await broker.stop()
        raise
    log.info(
        "HTTP API on http://%s:%s (docs at /docs)", api_settings.api_host, api_settings.api_port
    )
    log.info(
        'coap-bridge is up: try  coap-client-notls -m post -e hello "coap://127.0.0.1:%s/?t=demo"',
        proxy.address[1],
    )
    freeze_startup_heap()
    try:
        await _wait(stop, api_task)
    finally:
        # One deadline for both: the proxy drains first (what it has in flight needs the API),
        # then the API gets what is left for its own requests (management, onboarding).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + launcher.drain_timeout
        await proxy.close(launcher.drain_timeout)
        await _stop_api(server, api_task, deadline - loop.time())
        if broker is not None:
            await broker.stop()
        log.info("coap-bridge stopped")


def demo_address(value: str, routes: str = "/proc/net/route") -> str:
    """``--demo-ip``: an address as given, or ``gateway``: the IPv4 default route's gateway
    (Linux's routing table, little-endian hex; what ``ip route`` shows as ``default via``)."""
    if value.strip().lower() != "gateway":
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise SettingError(
                f"demo_ip: {value!r} is neither an IP address nor 'gateway'"
            ) from None
    try:
        with open(routes, encoding="ascii") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                # Iface Destination Gateway Flags ...: the default route has destination 0.
                if len(fields) > 2 and fields[1] == "00000000" and fields[2] != "00000000":
                    return str(ipaddress.IPv4Address(bytes.fromhex(fields[2])[::-1]))
    except (OSError, ValueError) as exc:
        raise SettingError(f"demo_ip gateway: cannot read {routes}: {exc}") from exc
    raise SettingError("demo_ip gateway: this machine has no IPv4 default route")


class SettingError(ValueError):
    """A launcher setting that cannot be used; the message names it."""


def _mirror_psks(devices: MemoryDeviceStore) -> MemoryPskStore:
    """Without Redis the API and the proxy share this process: the device store's PSK change
    hook keeps the proxy's in-memory PSK store current (what pub/sub does with Redis)."""
    psks = MemoryPskStore()
    pending: set[asyncio.Task[None]] = set()

    async def refresh(iccid: str) -> None:
        device = await devices.get(iccid)
        psks.set(iccid, device.psk if device is not None else None)

    def changed(iccid: str) -> None:
        task = asyncio.get_running_loop().create_task(refresh(iccid))
        pending.add(task)
        task.add_done_callback(pending.discard)

    devices.add_psk_listener(changed)
    return psks


async def _wait(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for task in done:
        if task is not waiter:
            task.result()


async def run_proxy(given: dict[str, Any], reuse_port: bool = False) -> None:
    settings = ProxySettings(**given)
    drain_timeout = LauncherSettings(**given).drain_timeout
    stop = _stop_event()
    proxy = await start_proxy(settings, reuse_port=reuse_port)
    freeze_startup_heap()
    try:
        await stop.wait()
    finally:
        await proxy.close(drain_timeout)


class WorkersFailed(Exception):
    """Workers that could not run; ``lines`` are what they reported, once each."""

    def __init__(self, lines: list[str], code: int) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines
        self.code = code


def _proxy_worker(given: dict[str, Any], reports: Any) -> None:
    try:
        _run(run_proxy(given, reuse_port=True))
    except Exception as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        # Every worker fails the same way (a port in use): the parent prints it once.
        reports.put(failure[0])
        sys.exit(failure[1])


def run_proxy_workers(given: dict[str, Any], workers: int) -> None:
    """N processes, each a whole proxy on the same UDP port (SO_REUSEPORT). Forked before any
    event loop exists; the parent forwards SIGTERM/SIGINT and supervises. On SIGTERM each
    worker drains what it has in flight (``--drain-timeout``) before it exits.

    A worker killed by a signal is started again: a crash (tinydtls 0.8.6 can be made to
    divide by zero by a client churning handshakes, see BENCHMARKS.md) then costs a restart
    of about a second, not the service; exchanges already answered stay deduplicated through
    Redis. A worker that exits with an error (a bad setting, a port in use) is not restarted.
    """
    context = multiprocessing.get_context("fork")
    reports = context.SimpleQueue()

    def spawn(n: int) -> multiprocessing.process.BaseProcess:
        child = context.Process(
            target=_proxy_worker,
            args=(worker_metrics(given, n), reports),
            name=f"proxy-worker-{n}",
        )
        child.start()
        return child

    children = {n: spawn(n) for n in range(workers)}
    log.info("proxy: %d workers sharing the port (SO_REUSEPORT)", workers)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed: list[str] = []
    codes: set[int] = set()
    while children:
        multiprocessing.connection.wait([child.sentinel for child in children.values()])
        for n, child in list(children.items()):
            if child.is_alive():
                continue
            child.join()
            del children[n]
            code = child.exitcode
            if stopping or code == 0:
                continue
            if code is not None and code < 0 and code != -signal.SIGTERM:
                log.error("proxy worker %d killed by signal %d; starting it again", n, -code)
                children[n] = spawn(n)
            elif code != -signal.SIGTERM:
                failed.append(f"{child.name} (exit {code})")
                codes.add(code or 1)
    if failed:
        lines: list[str] = []
        while not reports.empty():
            line = reports.get()
            if line not in lines:
                lines.append(line)
        raise WorkersFailed(
            lines or [f"proxy workers failed: {', '.join(failed)}"], max(codes, default=1)
        )


def run_api_workers(given: dict[str, Any], workers: int) -> None:
    """uvicorn's own multi-process mode: each worker builds the app from ``COAP_BRIDGE_*``."""
    launcher = LauncherSettings(**given)
    settings = ApiSettings(**given)  # validate in the parent, so a bad flag fails once
    if settings.mqtt_client_id is not None:
        # A broker keeps one connection per client id (MQTT 5 §3.1.4): the workers would take
        # it from each other in turn, forever.
        raise SettingError(
            f"mqtt_client_id: {workers} API workers cannot share one MQTT client id; "
            "leave it unset (each worker draws its own) or run one worker per replica"
        )
    # uvicorn binds the port in this process and reports a taken one with a log line and
    # exit 3; trying it first, bound the same way, makes that the one-line error of the rest.
    _bind_api(settings.api_host, settings.api_port).close()
    os.environ.update(api_environment(settings))
    uvicorn.run(
        "launcher.cli:api_worker_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=workers,
        log_level=launcher.log_level,
        log_config=logs.uvicorn_log_config(),
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=_whole_seconds(launcher.drain_timeout),
    )


def api_environment(settings: ApiSettings) -> dict[str, str]:
    """``settings`` as the ``COAP_BRIDGE_*`` variables each API worker reads them back from."""
    variables = {}
    for name in ApiSettings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, list):
            # What list fields read from the environment: a JSON list (str() of one is not).
            variables[f"COAP_BRIDGE_{name.upper()}"] = json.dumps(value)
        elif value is not None:
            variables[f"COAP_BRIDGE_{name.upper()}"] = str(value)
    return variables


def api_worker_app() -> Any:
    """uvicorn's factory in each API worker: the app from ``COAP_BRIDGE_*``, with the heap
    frozen once it is built (uvicorn has imported everything by then; see launcher/heap.py)."""
    app = create_app_from_env()
    freeze_startup_heap()
    return app


async def run_api(given: dict[str, Any]) -> None:
    launcher = LauncherSettings(**given)
    settings = ApiSettings(**given)
    stop = _stop_event()
    sock = _bind_api(settings.api_host, settings.api_port)
    server, task = await _start_api(
        create_app(settings), sock, launcher.log_level, launcher.drain_timeout
    )
    log.info("HTTP API on http://%s:%s (docs at /docs)", settings.api_host, settings.api_port)
    freeze_startup_heap()
    try:
        await _wait(stop, task)
    finally:
        await _stop_api(server, task, launcher.drain_timeout)


_RUNNERS = {"up": run_up, "proxy": run_proxy, "api": run_api}


def _run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def failure_of(exc: BaseException) -> tuple[str, int] | None:
    """The one line (without the ``coap-bridge:`` prefix) and the exit code a failure to start
    is reported with, or None for anything else (a bug: its traceback is wanted)."""
    if isinstance(exc, ValidationError):
        return f"invalid setting: {exc}", 2
    if isinstance(exc, PolicyError | SettingError):
        return str(exc), 2
    if isinstance(exc, ListenerError):
        return describe(exc), 2
    if isinstance(exc, OSError):
        return str(exc), 1
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in client.CLIENT_COMMANDS:
        return client.run(args)
    if args.command == "check":
        return check.run(args)
    given = _given(args)
    try:
        # One format for every logger of the process, uvicorn's included (launcher/logs.py).
        launcher = LauncherSettings(**given)
        logs.configure(launcher.log_format, launcher.log_level)
    except ValueError as exc:  # pydantic's ValidationError is one
        print(f"coap-bridge: invalid setting: {exc}", file=sys.stderr)
        return 2
    try:
        workers = LauncherSettings(**given).workers
        given.pop("workers", None)
        if workers > 1 and args.command == "proxy":
            run_proxy_workers(given, workers)
        elif workers > 1 and args.command == "api":
            run_api_workers(given, workers)
        else:
            _run(_RUNNERS[args.command](given))
    except WorkersFailed as exc:
        for line in exc.lines:
            logs.report(f"coap-bridge: {line}")
        return exc.code
    except Exception as exc:
        failure = failure_of(exc)
        if failure is None:
            raise
        logs.report(f"coap-bridge: {failure[0]}")
        return failure[1]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
