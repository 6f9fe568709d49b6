"""Scenario O's devices: many observers of ``/commands/{iccid}`` (RFC 7641), each a UDP socket
bound to a loopback address of its own (plain CoAP names a device by its source address,
docs/CONTRACT.md §2; Linux routes all of 127.0.0.0/8 to ``lo``), in forked worker processes.

Split like the product (sans-IO): :class:`Devices` is the devices' protocol over a clock the
caller passes in: it says which datagram goes out of which socket and keeps what arrived, and is
tested without sockets. :func:`_worker` drives one share of them with ``epoll`` (tens of
thousands of sockets per process, no event loop per socket). :class:`Fleet` is the harness's
handle on the workers: start, register, count the commands received, collect.

Each device:

- registers with a CON GET ``/commands/{iccid}``, Observe=0 (RFC 7641 §3.1) and a token of its
  own, retransmitted as RFC 7252 §4.2 says until it is ACKed; an empty ACK means the answer
  follows as a separate response (§5.2.2). The answer carries Observe: registered; without it
  (an error, or a limit of the proxy, RFC 7641 §4.1): refused.
- ACKs every CON at once (separate responses and notifications) with an empty ACK of the same
  MID; a CON whose MID it has seen is a retransmission (its ACK was lost or late): ACKed again,
  not counted again.
- keeps, for each notification with a payload (a command), when its ACK left, and whether the
  payload was its own command (:func:`command_payload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import resource
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import run_loop
from proxy.coap import codec
from proxy.coap.codec import ACK, CON, NON, RST
from proxy.coap.codes import CONTENT, GET, code_text
from proxy.coap.options import OBSERVE, URI_PATH
from proxy.errors import ProxyError
from proxy.http1 import Http1Upstream

# RFC 7252 §4.8: the transmission parameters of the registration's retransmissions.
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
# A separate response to the registration (after an empty ACK) waits this long at most.
SEPARATE_TIMEOUT = 60.0

# Registration states.
IDLE, SENT, ACKED_EMPTY, REGISTERED, REFUSED, FAILED, WAITING = range(7)
STATE_NAMES = ("idle", "sent", "acked empty", "registered", "refused", "failed", "waiting")
# A relation the proxy ended with an error notification (RFC 7641 §4.2) is registered again,
# as a device would, after a pause of this many seconds (random within), at most this often.
REREGISTER_AFTER = (0.5, 1.5)
MAX_REREGISTER = 3


def device_address(n: int) -> str:
    """The loopback address of observing device ``n`` (0 ≤ n < 62,500 × 100): never 127.0.0.1
    (the bench's own clients), never an address ending in .0 or .255."""
    return f"127.{20 + n // 62_500}.{(n // 250) % 250}.{n % 250 + 1}"


def command_payload(n: int) -> dict[str, Any]:
    """The JSON command queued for device ``n`` (sent to it as compact UTF-8)."""
    return {"op": "bench", "n": n}


def is_command_of(payload: bytes, n: int) -> bool:
    try:
        return bool(json.loads(payload) == command_payload(n))
    except ValueError:
        return False


def registration(iccid: str, mid: int, token: bytes) -> bytes:
    options = [(OBSERVE, b""), (URI_PATH, b"commands"), (URI_PATH, iccid.encode())]
    return codec.encode_parts(CON, GET, mid, token, options, b"")


@dataclass
class DeviceResult:
    """What one worker saw, per device (lists indexed like the worker's devices) and counted."""

    numbers: list[int] = field(default_factory=list)  # the device numbers n
    states: list[int] = field(default_factory=list)  # registration states
    codes: list[int] = field(default_factory=list)  # the registration answer's code (0: none)
    commands: list[int] = field(default_factory=list)  # notifications with a payload, by MID
    wrong: list[int] = field(default_factory=list)  # of those, not the device's own command
    acked_at: list[float] = field(default_factory=list)  # first command ACKed (monotonic); nan
    empty: int = 0  # notifications without payload (after the registration answer)
    notified: dict[str, int] = field(default_factory=dict)  # notifications by code
    retransmitted: int = 0  # CONs seen again (same MID): ACKed again, not counted
    non: int = 0  # commands that came as NON (the route wants them confirmed)
    resets: int = 0  # RSTs from the proxy
    ended: int = 0  # relations the proxy ended with an error notification
    reregistered: int = 0  # registrations sent again after that
    sent: int = 0  # datagrams sent (registrations, their retransmissions, ACKs)
    cpu: float = 0.0  # the worker's CPU seconds
    sockets: int = 0

    def merge(self, other: DeviceResult) -> None:
        for name in ("numbers", "states", "codes", "commands", "wrong", "acked_at"):
            getattr(self, name).extend(getattr(other, name))
        for name in ("empty", "retransmitted", "non", "resets", "ended", "reregistered", "sent",
                     "cpu", "sockets"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for code, count in other.notified.items():
            self.notified[code] = self.notified.get(code, 0) + count


class Devices:
    """The protocol of a share of the devices (sans-IO). ``devices``: (number n, iccid).
    :meth:`start_registering`, then :meth:`poll` for registrations to (re)send and
    :meth:`received` for each datagram; both return [(device index, datagram)] to send."""

    def __init__(self, devices: Sequence[tuple[int, str]], window: int = 256) -> None:
        count = len(devices)
        self.devices = list(devices)
        self.window = window
        self.tokens = [n.to_bytes(4, "big") for n, _ in devices]
        self.mids = [random.randrange(0x10000) for _ in devices]  # the registration's MID
        self.state = [IDLE] * count
        self.code = [0] * count
        self.tries = [0] * count
        self.deadline = [math.inf] * count
        self.timeout = [0.0] * count
        self.seen: list[set[int]] = [set() for _ in devices]  # MIDs of CON/NON from the proxy
        self.commands = [0] * count
        self.wrong = [0] * count
        self.ended = [0] * count  # error notifications (relation ended, RFC 7641 §4.2)
        self.acked_at = [math.nan] * count
        self.result = DeviceResult()
        self.registering = False
        self.next_idle = 0  # devices before this have been sent their registration
        self.pending: set[int] = set()  # SENT, ACKED_EMPTY or WAITING
        self.commands_received = 0  # devices with at least one command
        self.waiting: set[int] = set()  # WAITING: to register again
        self.reregistered = [0] * count

    @property
    def done_registering(self) -> bool:
        return self.next_idle >= len(self.devices) and not (self.pending - self.waiting)

    def start_registering(self, now: float) -> list[tuple[int, bytes]]:
        self.registering = True
        return self.poll(now)

    def poll(self, now: float) -> list[tuple[int, bytes]]:
        """Retransmissions due, give-ups, and new registrations while the window has room."""
        out: list[tuple[int, bytes]] = []
        for index in [i for i in self.pending if self.deadline[i] <= now]:
            if self.state[index] == WAITING:
                self.waiting.discard(index)
                self.mids[index] = (self.mids[index] + 1) & 0xFFFF
                self._send_registration(index, now)
                out.append((index, self._registration(index)))
            elif self.state[index] == SENT and self.tries[index] < MAX_RETRANSMIT:
                self.tries[index] += 1
                self.timeout[index] *= 2
                self.deadline[index] = now + self.timeout[index]
                out.append((index, self._registration(index)))
            else:
                self._settle(index, FAILED)
        while self.registering and self.next_idle < len(self.devices):
            if len(self.pending) >= self.window:
                break
            index = self.next_idle
            self.next_idle += 1
            self._send_registration(index, now)
            out.append((index, self._registration(index)))
        return out

    def _send_registration(self, index: int, now: float) -> None:
        self.state[index], self.tries[index] = SENT, 0
        self.timeout[index] = ACK_TIMEOUT * random.uniform(1.0, ACK_RANDOM_FACTOR)
        self.deadline[index] = now + self.timeout[index]
        self.pending.add(index)

    def next_deadline(self) -> float:
        return min((self.deadline[i] for i in self.pending), default=math.inf)

    def _registration(self, index: int) -> bytes:
        return registration(self.devices[index][1], self.mids[index], self.tokens[index])

    def _settle(self, index: int, state: int, code: int = 0) -> None:
        self.state[index], self.code[index] = state, code
        self.deadline[index] = math.inf
        self.pending.discard(index)

    def received(self, index: int, data: bytes, now: float) -> list[tuple[int, bytes]]:
        """A datagram from the proxy on device ``index``'s socket."""
        try:
            message = codec.decode(data)
        except (codec.Unreadable, codec.FormatError):
            return []
        kind, out = message.mtype, []
        if kind == RST:
            self.result.resets += 1
            return []
        if kind == ACK:
            if message.mid != self.mids[index] or self.state[index] != SENT:
                return []  # a late ACK to a retransmission
            if message.code == 0:  # RFC 7252 §5.2.2: the answer follows separately
                self.state[index] = ACKED_EMPTY
                self.deadline[index] = now + SEPARATE_TIMEOUT
                return []
            self._answer(index, message, now)
            return []
        if message.code < 64 or message.token != self.tokens[index]:
            return [(index, codec.encode_empty(RST, message.mid))] if kind == CON else []
        if kind == CON:
            out.append((index, codec.encode_empty(ACK, message.mid)))
        if message.mid in self.seen[index]:
            self.result.retransmitted += 1
            return out
        self.seen[index].add(message.mid)
        if kind == NON and message.payload:
            self.result.non += 1
        self._answer(index, message, now)
        return out

    def _answer(self, index: int, message: codec.Message, now: float) -> None:
        """A response with the device's token: the registration answer (the first), then
        notifications. ``now``: when the datagram was read; its ACK leaves right after."""
        observed = any(number == OBSERVE for number, _ in message.options)
        if self.state[index] in (SENT, ACKED_EMPTY):
            ok = message.code == CONTENT and observed
            self._settle(index, REGISTERED if ok else REFUSED, message.code)
            if not ok and self.reregistered[index]:
                self._reregister(index, now)  # a registration again: keeps trying
        else:
            name = code_text(message.code)
            self.result.notified[name] = self.result.notified.get(name, 0) + 1
            if message.code != CONTENT or not observed:
                # An error (or an answer without Observe) ends the relation (RFC 7641 §3.2,
                # §4.2): not a command; the device registers again after a pause.
                self.ended[index] += 1
                self._reregister(index, now)
                return
            if not message.payload:
                self.result.empty += 1
        if not message.payload:
            return
        self.commands[index] += 1
        if self.commands[index] == 1:
            self.acked_at[index] = now
            self.commands_received += 1
        if not is_command_of(message.payload, self.devices[index][0]):
            self.wrong[index] += 1

    def _reregister(self, index: int, now: float) -> None:
        if self.reregistered[index] >= MAX_REREGISTER:
            return
        self.reregistered[index] += 1
        self.state[index] = WAITING
        self.deadline[index] = now + random.uniform(*REREGISTER_AFTER)
        self.pending.add(index)
        self.waiting.add(index)

    def collect(self) -> DeviceResult:
        result = self.result
        result.numbers = [n for n, _ in self.devices]
        result.states, result.codes = list(self.state), list(self.code)
        result.commands, result.wrong = list(self.commands), list(self.wrong)
        result.acked_at = list(self.acked_at)
        result.ended, result.reregistered = sum(self.ended), sum(self.reregistered)
        return result


# --- the driver: one forked process per share ------------------------------------------------


def raise_file_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def _worker(*args: Any) -> None:
    """:func:`_drive`; whatever it raises goes to the harness as the worker's error."""
    conn = args[4]
    try:
        _drive(*args)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


def _drive(
    host: str, port: int, devices: Sequence[tuple[int, str]], window: int, conn: Any,
    counter: Any, slot: int,
) -> None:  # fmt: skip
    """One share of the devices: its sockets, then commands from the harness over ``conn``
    (``register``, ``collect``); ``counter[slot]``: devices that got a command so far."""
    cpu0 = sum(os.times()[:2])
    limit = raise_file_limit(len(devices) + 64)
    if limit < len(devices) + 16:
        conn.send(("error", f"RLIMIT_NOFILE {limit} is too low for {len(devices)} sockets"))
        return
    state = Devices(devices, window)
    poller = select.epoll(len(devices) + 1)
    sockets: list[socket.socket] = []
    by_fd: dict[int, int] = {}
    try:
        for index, (n, _) in enumerate(devices):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind((device_address(n), 0))
            sock.connect((host, port))
            sockets.append(sock)
            by_fd[sock.fileno()] = index
            poller.register(sock.fileno(), select.EPOLLIN)
    except OSError as exc:
        conn.send(("error", f"opening socket {len(sockets) + 1}: {exc}"))
        return
    poller.register(conn.fileno(), select.EPOLLIN)
    conn.send(("ready", len(sockets)))
    result = state.result
    result.sockets = len(sockets)
    control = conn.fileno()
    reported_registered = False

    def send(out: list[tuple[int, bytes]]) -> None:
        for index, data in out:
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                sockets[index].send(data)
                result.sent += 1

    while True:
        wait = state.next_deadline() - time.monotonic()
        timeout = 0.05 if state.registering and not state.done_registering else 1.0
        events = poller.poll(max(0.0, min(timeout, wait)))
        for fd, _ in events:
            if fd == control:
                command = conn.recv()
                if command == "register":
                    send(state.start_registering(time.monotonic()))
                elif command == "collect":
                    collected = state.collect()
                    collected.cpu = sum(os.times()[:2]) - cpu0
                    conn.send(("result", collected))
                    for sock in sockets:
                        sock.close()
                    return
                continue
            index, sock = by_fd[fd], sockets[by_fd[fd]]
            while True:
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                send(state.received(index, data, time.monotonic()))
        counter[slot] = state.commands_received
        if state.registering:
            send(state.poll(time.monotonic()))
            if state.done_registering and not reported_registered:
                reported_registered = True
                conn.send(("registered", _states(state)))


def _states(state: Devices) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in state.state:
        counts[STATE_NAMES[value]] = counts.get(STATE_NAMES[value], 0) + 1
    return counts


class Fleet:
    """The harness's side: ``devices`` ((number, iccid)) split over ``workers`` forked
    processes, each with its sockets bound before :meth:`register` is called."""

    def __init__(
        self, host: str, port: int, devices: Sequence[tuple[int, str]], workers: int = 1,
        window: int = 256,
    ) -> None:  # fmt: skip
        workers = max(1, min(workers, len(devices)))
        context = multiprocessing.get_context("fork")
        self.counter = context.RawArray("q", workers)
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        self.total = len(devices)
        for slot in range(workers):
            mine, theirs = context.Pipe()
            share = list(devices[slot::workers])
            args = (host, port, share, window, theirs, self.counter, slot)
            process = context.Process(target=_worker, args=args, daemon=True)
            process.start()
            theirs.close()
            self.conns.append(mine)
            self.processes.append(process)

    def _expect(self, kind: str, timeout: float) -> list[Any]:
        answers = []
        deadline = time.monotonic() + timeout
        for conn, process in zip(self.conns, self.processes, strict=True):
            while not conn.poll(0.1):
                if not process.is_alive():
                    raise RuntimeError(f"device worker exited (status {process.exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"device workers: no {kind!r} after {timeout:g} s")
            got, value = conn.recv()
            if got == "error":
                raise RuntimeError(f"device worker: {value}")
            if got != kind:
                raise RuntimeError(f"device worker said {got!r}, expected {kind!r}")
            answers.append(value)
        return answers

    def ready(self, timeout: float = 60.0) -> int:
        """Sockets bound, all workers: their number."""
        return int(sum(self._expect("ready", timeout)))

    def register(self, timeout: float) -> dict[str, int]:
        """Every device registers (paced by the window); blocks until each is registered,
        refused or failed: their counts."""
        for conn in self.conns:
            conn.send("register")
        counts: dict[str, int] = {}
        for part in self._expect("registered", timeout):
            for name, count in part.items():
                counts[name] = counts.get(name, 0) + count
        return counts

    def received(self) -> int:
        """Devices that got a command so far (read from shared memory, no round trip)."""
        return int(sum(self.counter))

    def collect(self, timeout: float = 30.0) -> DeviceResult:
        for conn in self.conns:
            conn.send("collect")
        merged = DeviceResult()
        for part in self._expect("result", timeout):
            merged.merge(part)
        return merged

    def close(self) -> None:
        for process in self.processes:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank over ``values`` (sorted here); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# --- the HTTP side: many management API calls at once ----------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any = None  # JSON


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (the error says why)
    body: bytes
    sent: float  # monotonic
    answered: float
    error: str = ""


async def _calls(
    base: str, api_key: str, calls: Sequence[Call], concurrency: int, seconds: float
) -> list[Answer]:
    # The proxy's own keep-alive client (proxy/http1.py): far cheaper per request than a
    # general library, so the bench's side costs little CPU next to the API's.
    client = Http1Upstream(timeout=seconds, max_connections=concurrency)
    answers: list[Answer | None] = [None] * len(calls)
    position = 0

    async def run() -> None:
        nonlocal position
        while position < len(calls):
            index, call = position, calls[position]
            position += 1
            headers = {"Authorization": f"Bearer {api_key}"}
            content = b""
            if call.body is not None:
                headers["Content-Type"] = "application/json"
                content = json.dumps(call.body, separators=(",", ":")).encode()
            sent = time.monotonic()
            try:
                got = await client.request(call.method, base + call.path, headers, content)
                answers[index] = Answer(got.status, got.body, sent, time.monotonic())
            except ProxyError as exc:
                answers[index] = Answer(0, b"", sent, time.monotonic(), str(exc))

    try:
        await asyncio.gather(*(run() for _ in range(max(1, concurrency))))
    finally:
        await client.aclose()
    return [a for a in answers if a is not None]


def call_all(
    base: str, api_key: str, calls: Sequence[Call], concurrency: int = 64, timeout: float = 30.0
) -> list[Answer]:
    """``calls`` to the API at ``base``, ``concurrency`` at a time (blocking): the answers in
    the order of ``calls``, each with when it was sent and answered."""
    return run_loop(_calls(base, api_key, calls, concurrency, timeout))
