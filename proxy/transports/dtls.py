"""CoAP over DTLS 1.2 with pre-shared keys (RFC 7252 §9.1), on tinydtls through DTLSSocket.

:class:`DtlsTransport` sits between one UDP socket and the ordinary CoAP driver
(:class:`~proxy.coap.driver.CoapDriver`): records in are handed to tinydtls, decrypted
application data goes to ``protocol.datagram_received(plaintext, addr)``, and the driver's
``sendto(data, addr)`` is encrypted for that peer's session. To the driver it is an asyncio
datagram transport like any other, so dedup, forwarding and retransmission are the same code as
for plain UDP; ``identity_of(addr)`` gives the messaging layer the authenticated PSK identity.

What this module adds to tinydtls (docs/CONTRACT.md §6; docs/ARCHITECTURE.md, "DTLS"):

- **Stateless until the cookie.** tinydtls 0.8.6 answers an epoch-0 ClientHello without a
  valid cookie with a HelloVerifyRequest from an ephemeral peer and creates state only for a
  ClientHello that returns the cookie (RFC 6347 §4.2.1). Datagrams from an address without
  state that are not a ClientHello are dropped here before reaching C at all.
- **A cap on peers** (handshakes and sessions together). A new peer beyond the cap evicts the
  longest-silent handshake, or when none is left the longest-silent session; idle sessions and
  stalled handshakes are evicted by a sweep. tinydtls itself has no limit (it mallocs a peer per
  verified ClientHello).
- **PSK lookups are dict reads** from a :class:`~proxy.state.psk.PskStore` mirror, called from
  tinydtls' C callback; nothing waits on the network during a handshake.
- **No identity oracle.** An unknown identity gets a dummy key derived from a per-process
  secret, so its handshake fails exactly like one with a wrong key: the client's Finished does
  not decrypt, tinydtls drops it, and the client hears nothing more (RFC 4279 §2 allows either
  answer; the point is that both cases give the same one). A key longer than tinydtls'
  ``DTLS_PSK_MAX_KEY_LEN`` (64 bytes in our build) is treated the same way: it cannot be used,
  and published DTLSSocket would copy it past the end of tinydtls' stack buffer.
- **Identity bound at the end of the handshake.** The identity whose key was looked up becomes
  the session's identity only when tinydtls reports the handshake complete, so a second,
  unfinished handshake from the same address cannot relabel an established session.
- **Revocation.** When the store reports a changed or removed key, every session and handshake
  of that identity is closed (close_notify) at once.
- **Connection ID (RFC 9146).** A client that offers the connection_id extension gets an 8-byte
  CID of ours (scripts/patches/dtlssocket-0.2.3-connection-id.patch); its protected records
  are tls12_cid records carrying it at a fixed offset. Such a record is routed by that CID,
  not by the address, and handed to tinydtls under the session's current address; only when
  it authenticated and is the newest record seen does the session move to the record's source
  address (RFC 9146 §6: an unauthenticated or replayed record from a new address never gets an
  answer, so the CID cannot be used to reflect traffic at a victim). An unknown CID is dropped
  (or looked up in the session store), also when it comes from an address that has another
  session. If a NAT gave the new address to this device while another device's CID session
  still sits there, that session is *parked* (moved to an address in RFC 6666's discard-only
  prefix, to which nothing is ever sent) until its own device's next record moves it on; a
  session without CID found there is evicted silently.
- **Session export.** :meth:`DtlsTransport.export_session` / :meth:`import_session` carry a
  connected session's record state (keys, epoch, sequence numbers, receive window, CIDs) to
  another transport, e.g. another replica; an imported session sends with sequence numbers at
  or above a floor the caller chooses, so a CCM nonce is never reused under one key.
- **Sessions shared through a store** (``session_store``, with ``--redis-url``;
  stores/dtls_sessions.py, docs/SCALING.md "DTLS sessions"). A CID session is exported and
  written when its handshake completes; a record with a CID this replica does not know is
  looked up there (bounded lookups, records held meanwhile, a short negative cache), refused if
  the identity's key changed, else imported at a parking address with the write range this
  replica claimed and the receive number written back, moved to the record's address like any
  CID session once that record authenticates, and dropped again if it does not (so a forged or
  replayed record displaces nothing). Writes are group-committed: the sessions that completed
  while the previous write was in flight go in one round trip, and so do write-backs.
  A stored session only sends within its claimed range (the next one is claimed at half; a
  range that does not follow means another replica took it over: let go silently); the highest
  authenticated receive number is written back every ``TOUCH_INTERVAL``. Stored sessions are
  let go without close_notify when this replica stops or evicts them, so they live on.

DTLSSocket's errors and callbacks stay inside this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import importlib.metadata
import ipaddress
import logging
import secrets
import socket
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.state.psk import PskStore
from stores.dtls_sessions import TOUCH_INTERVAL, DtlsSessionStore, StoredSession, key_check

log = logging.getLogger(__name__)

# DTLS record layer (RFC 6347 §4.1) and handshake header (§4.2.2) offsets.
_CT_ALERT = 21
_CT_HANDSHAKE = 22
_CT_TLS12_CID = 25  # RFC 9146 §4
_RECORD_HEADER = 13
# Our CIDs are 8 bytes (the patch's DTLS_CID_LENGTH); in a tls12_cid record the CID follows
# the sequence number: type(1) version(2) epoch(2) sequence_number(6) cid(8) length(2).
CID_LENGTH = 8
_CID_AT = 11
_CID_RECORD_HEADER = _RECORD_HEADER + CID_LENGTH
_HANDSHAKE_HEADER = 12
_HT_CLIENT_HELLO = 1
_HT_SERVER_HELLO = 2
_SEQ_MASK = (1 << 48) - 1  # RFC 6347 §4.1: the sequence number part of epoch << 48 | seq

# Sessions shared through a DtlsSessionStore (docs/SCALING.md, "DTLS sessions"): bounds on
# the work one replica puts on Redis, whatever the devices (or anyone) send.
_MAX_PENDING_SAVES = 256  # handshakes whose session is being written; beyond: not stored
# Saves and write-backs are group-committed: what is pending when the previous batch returns
# goes in one round trip (stores/dtls_sessions.py, save_many / touch_many), at most this many.
_SAVE_BATCH = 128
_MAX_LOOKUPS = 64  # unknown CIDs being looked up at once; beyond: their records are dropped
_MAX_QUEUED = 8  # records of one CID held while its lookup runs
_NEGATIVE_TTL = 2.0  # seconds a CID Redis did not give us is not asked for again
_NEGATIVE_MAX = 10_000
_TOUCH_BATCH = 256  # sessions written back in one round trip
_EXTEND_RETRY = 1.0  # seconds before a failed claim of the next range is tried again
_FAILURE_LOG_INTERVAL = 10.0

# tinydtls (alert.h): handshake finished.
_EVENT_CONNECTED = 0x01DE
_ALERT_LEVEL_FATAL = 2
_ALERT_CLOSE_NOTIFY = 0

# DTLS_PSK_MAX_KEY_LEN of our build (scripts/patches/dtlssocket-0.2.3-psk-64-bytes.patch; the
# published tinydtls 0.8.6 has 16): room for the 64 ASCII bytes a managed-PSK device presents
# (docs/API.md, "Credentials"). The patched DTLSSocket refuses a longer key itself; checking
# here as well makes such a key fail exactly like a wrong one and says why in the log.
# policies.psk.MAX_PSK_BYTES, which the API enforces, is the same number.
MAX_KEY_BYTES = 64

Address = tuple[Any, ...]
_Key = tuple[str, int]

# Where a CID session waits while it has no address of its own (docs/SCALING.md, "DTLS
# sessions"): RFC 6666's discard-only prefix, which no peer can send from, numbered by a
# counter. A session is parked there when a NAT hands its address to another device's session
# (_move), and an imported session sits there until its first record authenticates (_resume).
# Nothing is ever sent to a parked address; the session's next authenticated record moves it to
# wherever that record came from.
_PARKING = ipaddress.IPv6Network("100::/64")
_PARKING_PORT = 9  # the discard port (RFC 863)


def _parked(key: tuple[Any, ...]) -> bool:
    host = key[0]
    # Cheap first: no IPv4 address and almost no IPv6 address begins so.
    return (
        isinstance(host, str)
        and host.startswith("100:")
        and ipaddress.IPv6Address(host.split("%", 1)[0]) in _PARKING
    )


def _address(key: _Key) -> str:
    """A peer's address for a log line (the device, when no identity is known yet)."""
    return f"[{key[0]}]:{key[1]}" if ":" in key[0] else f"{key[0]}:{key[1]}"


class DtlsError(OSError):
    """The DTLS listener cannot run (DTLSSocket missing or the socket cannot be bound); an
    OSError so that callers report it like any other failure to bind a port."""


# RFC 6655 TLS_PSK_WITH_AES_128_CCM_8: the one suite offered (docs/CONTRACT.md §6).
TLS_PSK_WITH_AES_128_CCM_8 = 0xC0A8


class _UserParameters(ctypes.Structure):
    """tinydtls 0.8.6 ``dtls_user_parameters_t`` (crypto.h)."""

    _fields_ = [
        ("cipher_suites", ctypes.c_int * 5),  # DTLS_MAX_CIPHER_SUITES + 1, 0-terminated
        ("force_extended_master_secret", ctypes.c_uint, 1),
        ("force_renegotiation_info", ctypes.c_uint, 1),
        # our build (scripts/patches/dtlssocket-0.2.3-connection-id.patch)
        ("support_connection_id", ctypes.c_uint, 1),
    ]


_GetUserParameters = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_UserParameters)
)


def _install_user_parameters(context: Any, callback: Any) -> bool:
    """Set tinydtls' ``get_user_parameters`` handler, which DTLSSocket leaves NULL.

    Without it tinydtls 0.8.6 insists on the extended_master_secret (RFC 7627) and
    renegotiation_info (RFC 5746) extensions and fails every other ClientHello with a fatal
    handshake_failure. node-dtls-client (the vendor sample's client) sends neither, which is
    why its handshake never completed against aiocoap's tinydtls server. The handler struct
    lives inside DTLSSocket's ``DTLS`` object; its layout is checked word by word against what
    is known (the Python attributes after it, the callbacks DTLSSocket sets, the NULLs it does
    not) before anything is written, and nothing is written if it does not match."""
    head = object.__basicsize__
    pointer = ctypes.sizeof(ctypes.c_void_p)
    words = [
        ctypes.c_void_p.from_address(id(context) + head + pointer * i).value for i in range(11)
    ]
    # ctx, write, read, event, get_user_parameters, get_psk_info, get_ecdsa_key,
    # verify_ecdsa_key, pycb, pskId, pskStore
    expected = (
        type(context).__basicsize__ == head + 11 * pointer
        and all(words[i] for i in (0, 1, 2, 3, 5))
        and not any(words[i] for i in (4, 6, 7))
        and words[8] == id(context.pycb)
        and words[10] == id(context.pskStore)
    )
    if not expected:
        return False
    address = ctypes.cast(callback, ctypes.c_void_p).value
    ctypes.c_void_p.from_address(id(context) + head + pointer * 4).value = address
    return True


# The DTLSSocket build scripts/install-dtlssocket.sh makes: tinydtls 0.8.6 with the alert
# double-delete fixed and room for 64-byte PSKs (scripts/patches/). The published 0.2.3 removes
# a peer from its hash table twice on close_notify or a fatal alert; a client running a few
# handshakes at once and closing them then crashes the whole process (SIGFPE in uthash).
# Measured here: the published build died after ~10,000 handshakes at 8 in flight; the patched
# one ran 180,000 at 8 and 32. Build 1 had the fix but 16-byte keys (MAX_KEY_BYTES).
PATCHED_BUILD = "0.2.3+coapbridge.3"
_INSTALL_HINT = (
    "build it with scripts/install-dtlssocket.sh PYTHON (make install does; it needs the "
    "Debian packages autoconf automake libtool), or turn coaps off with --coaps-port off"
)


def _load_tinydtls() -> Any:
    try:
        from DTLSSocket import dtls
    except ImportError as exc:  # pragma: no cover - DTLSSocket is a dependency
        raise DtlsError(f"DTLS needs the DTLSSocket package: {_INSTALL_HINT}") from exc
    check_build(installed_build())
    return dtls


def installed_build() -> str | None:
    try:
        return importlib.metadata.version("DTLSSocket")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_build(version: str | None) -> None:
    """Refuse a DTLSSocket build other than the patched one: the published tinydtls 0.8.6 can
    be crashed remotely by any client (see :data:`PATCHED_BUILD`)."""
    if version != PATCHED_BUILD:
        raise DtlsError(
            f"DTLSSocket {version or '(not installed)'} is not the patched build "
            f"{PATCHED_BUILD}: the published tinydtls 0.8.6 corrupts its peer table when a "
            f"client sends close_notify, and a client can crash the proxy; it also takes no PSK "
            f"over 16 bytes; {_INSTALL_HINT}"
        )


@dataclass(slots=True)
class DtlsStats:
    datagrams: int = 0
    dropped_stateless: int = 0  # no peer and not a ClientHello: never handed to tinydtls
    handshakes: int = 0  # peers created by tinydtls (cookie verified)
    connected: int = 0  # handshakes completed
    unknown_identity: int = 0  # answered with a dummy key
    evicted_idle: int = 0
    evicted_handshake: int = 0  # handshakes that stalled past the handshake timeout
    evicted_cap: int = 0
    closed_by_peer: int = 0
    closed_psk_change: int = 0
    unsent: int = 0  # responses for a peer without a session
    refused_stopping: int = 0  # ClientHellos dropped after stop_accepting
    cid_sessions: int = 0  # handshakes completed with a Connection ID (RFC 9146)
    dropped_unknown_cid: int = 0  # tls12_cid records whose CID no session has
    address_updates: int = 0  # sessions moved to a new address by an authenticated record
    cid_not_moved: int = 0  # CID records from a new address that were not authentic and newest
    imported: int = 0  # sessions created by import_session
    parked: int = 0  # CID sessions whose address a NAT gave to another session: kept by CID
    unsent_parked: int = 0  # datagrams for a parked session: never sent (no address to send to)
    # Shared sessions (a session store, i.e. --redis-url): docs/SCALING.md, "DTLS sessions"
    saved: int = 0  # CID sessions written to the store at handshake completion
    save_failed: int = 0  # not written (store error, or too many writes pending)
    lookups: int = 0  # unknown CIDs asked of the store
    lookup_dropped: int = 0  # records of an unknown CID dropped: too many lookups or queued
    import_refused: int = 0  # stored sessions refused: the identity's key changed or is gone
    import_unauthenticated: int = 0  # imported, but the first record did not authenticate
    taken_over: int = 0  # dropped here: another replica claimed the session's next range
    seq_exhausted: int = 0  # dropped here: the write range ran out before it was extended
    touches: int = 0  # receive sequence numbers written back


class _Peer:
    __slots__ = (
        "ceiling",
        "check",
        "cid",
        "extend_at",
        "extending",
        "identity",
        "last",
        "pending",
        "session",
        "touched",
    )

    def __init__(self, session: Any, now: float) -> None:
        self.session = session  # DTLSSocket Session: tinydtls' session_t for this address
        self.last = now
        self.identity: str | None = None  # authenticated: set when the handshake completes
        self.pending: str | None = None  # identity whose key the running handshake uses
        self.cid: bytes | None = None  # our Connection ID for this session, if negotiated
        # A session in the session store: one past the last write sequence number this
        # replica may use (None: not stored, no limit of ours), whether the next range is
        # being claimed and when to try again after a failure, the key check of the key the
        # handshake used, and the receive sequence number last written back.
        self.ceiling: int | None = None
        self.extending = False
        self.extend_at = 0.0
        self.check: bytes | None = None
        self.touched = 0


class _KeyLookup:
    """The ``pskStore`` DTLSSocket consults from tinydtls' get_psk_info callback.

    DTLSSocket does ``if identity in store.keys(): copy(store[identity])``; answering "yes" to
    every identity and a dummy key for unknown ones removes the identity oracle."""

    def __init__(self, transport: DtlsTransport) -> None:
        # Weak: see _Callback.
        self._transport = weakref.ref(transport)
        # DTLSSocket takes a char* into the returned bytes: keep the object alive meanwhile.
        # It also asks twice in a row (length, then bytes): answer the second from here.
        self._asked: bytes | None = None
        self._held = b""

    def forget(self) -> None:
        self._asked = None
        self._held = b""

    def keys(self) -> _KeyLookup:
        return self

    def __contains__(self, identity: object) -> bool:
        return True

    def __getitem__(self, identity: bytes) -> bytes:
        if identity == self._asked:
            return self._held
        transport = self._transport()
        try:
            if transport is None:
                raise LookupError("transport gone")
            key = transport._key_for(identity)
        except Exception:
            device = identity.decode("utf-8", "replace")
            log.exception("PSK lookup failed for device %s", device, extra={"device": device})
            key = secrets.token_bytes(MAX_KEY_BYTES)
        self._asked, self._held = identity, key
        return key


class _Callback:
    """A tinydtls callback that does not keep the transport alive.

    DTLSSocket's ``DTLS`` object holds its callbacks; if they held the transport, the two
    would form a reference cycle, and the garbage collector may clear the callbacks before it
    frees the tinydtls context — whose teardown calls them (close_notify to every peer): a
    crash. With weak callbacks the transport owns the context outright; a callback that
    arrives after the transport is gone does nothing."""

    __slots__ = ("_method",)

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = weakref.WeakMethod(method)

    def __call__(self, *args: Any) -> Any:
        method = self._method()
        if method is None:
            data = args[-1]
            return len(data) if isinstance(data, bytes) else 0
        return method(*args)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DtlsTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self._owner._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DTLS socket error: %s", exc)


class DtlsTransport(asyncio.DatagramTransport):
    """A DTLS server endpoint that looks like a datagram transport to a CoAP protocol."""

    def __init__(
        self,
        psk_store: PskStore,
        *,
        max_sessions: int = 10_000,
        max_handshakes: int = 1_000,
        idle_timeout: float = 300.0,
        handshake_timeout: float = 30.0,
        require_extended_master_secret: bool = False,
        connection_id: bool = True,
        session_store: DtlsSessionStore | None = None,
    ) -> None:
        """``max_sessions`` caps peers (handshakes and sessions together); ``max_handshakes``
        caps handshakes in progress on their own, because tinydtls keeps their retransmission
        timers in one sorted linked list: its cost per handshake message grows with the
        number of open handshakes (10,000 half-open handshakes stalled the loop for seconds).

        ``require_extended_master_secret``: refuse clients that do not send the
        extended_master_secret (RFC 7627) and renegotiation_info (RFC 5746) extensions, as
        tinydtls does by default. Off by default because device firmware (and the vendor
        sample's node-dtls-client) often sends neither; tinydtls supports neither session
        resumption nor renegotiation, which is what those extensions protect.

        ``connection_id``: answer a client's connection_id extension (RFC 9146); off, such a
        client gets a ServerHello without it and runs without CID, as before.

        ``session_store``: CID sessions are written there when their handshake completes, and
        a record with a CID this transport does not know is looked up there and continued
        without a handshake (another replica's session; docs/SCALING.md, "DTLS sessions").
        The caller owns the store (and closes it)."""
        super().__init__()
        self._tinydtls = _load_tinydtls()
        self._psks = psk_store
        self._max_peers = max_sessions
        self._max_handshakes = max(1, min(max_handshakes, max_sessions))
        self._idle_timeout = idle_timeout
        self._handshake_timeout = handshake_timeout
        self._dummy_secret = secrets.token_bytes(32)
        self._lookup = _KeyLookup(self)
        self._dtls = self._tinydtls.DTLS(
            read=_Callback(self._on_read),
            write=_Callback(self._on_write),
            event=_Callback(self._on_event),
            pskId=b"",
            pskStore=self._lookup,
        )
        self._require_ems = require_extended_master_secret
        self._connection_id = connection_id
        # Kept referenced for as long as tinydtls may call it.
        self._user_parameters_cb = _GetUserParameters(self._user_parameters)
        if not _install_user_parameters(self._dtls, self._user_parameters_cb):
            log.warning(
                "DTLSSocket's layout is not the one expected: tinydtls runs with its defaults "
                "(clients without the extended_master_secret extension cannot connect)"
            )
        self._udp: asyncio.DatagramTransport | None = None
        self._protocol: asyncio.DatagramProtocol | None = None
        self._v4 = True
        self._loop = asyncio.get_running_loop()
        # Handshakes and sessions, each in order of last activity (oldest first).
        self._handshaking: OrderedDict[_Key, _Peer] = OrderedDict()
        self._sessions: OrderedDict[_Key, _Peer] = OrderedDict()
        self._by_identity: dict[str, set[_Key]] = {}
        # Our CID of each session that negotiated one → the session's current address.
        self._by_cid: dict[bytes, _Key] = {}
        # While tinydtls handles one datagram: its peer key, and what the callbacks saw.
        self._current: _Key | None = None
        self._current_c: tuple[str, int] | None = None  # the same, as tinydtls names it
        self._hello_sent = False
        self._alert_sent = False
        self._closed_by_peer = False
        self._plaintext: list[bytes] = []
        self._ticker: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closing = False
        self._accepting = True
        self._cap_warned_at = -1e9
        self.stats = DtlsStats()
        self._store = session_store
        self._to_save: list[_Key] = []  # CID sessions connected while in tinydtls
        self._saves = 0  # writes pending (queued or in the batch being written)
        self._save_queue: list[StoredSession] = []
        self._saver: asyncio.Task[None] | None = None
        self._lookups: dict[bytes, list[tuple[bytes, Address]]] = {}
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._touching: asyncio.Task[None] | None = None
        self._next_touch = 0.0
        self._failures_logged: dict[str, float] = {}
        self._parking = 0  # the last parking address handed out (_PARKING)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(
        self,
        protocol: asyncio.DatagramProtocol,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
    ) -> None:
        """Bind ``host:port`` (the any-address included) and start serving ``protocol``."""
        # A failure to bind stays a plain OSError (not DtlsError): the caller names the
        # listener and the setting that moves it (proxy.server.ListenerError).
        udp, _ = await self._loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self),
            local_addr=(host, port),
            reuse_port=reuse_port or None,
        )
        self._udp = udp
        self._v4 = udp.get_extra_info("socket").family == socket.AF_INET
        self._protocol = protocol
        self._unsubscribe = self._psks.subscribe(self.close_identity)
        self._ticker = self._loop.create_task(self._tick_loop(), name="dtls-ticker")
        protocol.connection_made(self)

    # -- asyncio.DatagramTransport --------------------------------------------------------

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if addr is None:
            return
        key: _Key = (addr[0], addr[1])
        peer = self._sessions.get(key)
        if peer is None:
            self.stats.unsent += 1
            return
        if _parked(key):
            self.stats.unsent_parked += 1
            return
        if peer.ceiling is not None and not self._may_write(key, peer):
            self.stats.unsent += 1
            return
        self._dtls.write(peer.session, bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "dtls":
            return True
        if self._udp is None:
            return default
        return self._udp.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop: close_notify to every peer, except sessions in the session store, which are
        let go silently so that the device's next record continues them on another replica
        (a rolling update ends no stored session)."""
        self._shut(notify=True)

    def _shut(self, *, notify: bool) -> None:
        if self._closing:
            return
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._lookups.clear()
        # close_notify to every peer, then release tinydtls' state.
        for peers in (self._handshaking, self._sessions):
            for peer in list(peers.values()):
                if notify and peer.ceiling is None:
                    self._reset(peer)
                else:
                    self._dtls.dropPeer(peer.session)
        self._handshaking.clear()
        self._sessions.clear()
        self._by_identity.clear()
        self._by_cid.clear()
        # No peers left: freeing the context now calls no callback.
        self._dtls = None
        if self._udp is not None:
            self._udp.close()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        """Stop at once, as a crash would: nothing is sent to any peer."""
        self._shut(notify=False)

    def stop_accepting(self) -> None:
        """A graceful shutdown began: no new handshake is started (ClientHellos are dropped,
        so the client's retransmissions find a process that serves), while established
        sessions keep working until :meth:`close`, so that answers in flight and the ACKs
        of separate responses still get through."""
        self._accepting = False

    # -- what the messaging layer and operators ask -----------------------------------------

    def identity_of(self, addr: Address) -> str | None:
        """The authenticated PSK identity of the session at ``addr``."""
        peer = self._sessions.get((addr[0], addr[1]))
        return peer.identity if peer is not None else None

    @property
    def peer_count(self) -> int:
        """Peers tinydtls holds state for (handshakes + sessions); never above the cap."""
        return len(self._handshaking) + len(self._sessions)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def cid_session_count(self) -> int:
        """Sessions reachable by Connection ID; never more than :attr:`session_count`."""
        return len(self._by_cid)

    @property
    def max_sessions(self) -> int:
        return self._max_peers

    def close_identity(self, identity: str) -> None:
        """Close every session and handshake of ``identity`` (its PSK changed or was revoked)."""
        keys = set(self._by_identity.pop(identity, ()))
        keys.update(k for k, p in self._handshaking.items() if p.pending == identity)
        for key in keys:
            peer = self._sessions.get(key) or self._handshaking.get(key)
            if peer is not None:
                self.stats.closed_psk_change += 1
                self._evict(key, peer)
        if keys:
            log.info("closed %d DTLS session(s) of identity %s: PSK changed", len(keys), identity)
        if self._store is not None and not self._closing:
            # Every replica does this (each hears the announcement); deleting twice is fine.
            self._spawn(self._forget_identity(identity), "dtls-forget-identity")

    def cid_of(self, addr: Address) -> bytes | None:
        """Our Connection ID of the session at ``addr`` (None: no session, or no CID)."""
        peer = self._sessions.get((addr[0], addr[1]))
        return peer.cid if peer is not None else None

    def export_session(self, addr: Address) -> tuple[str, bytes] | None:
        """The identity and record state (tinydtls' versioned blob: cipher, epoch, key block,
        sequence numbers, receive window, both CIDs) of the session at ``addr``, for
        :meth:`import_session` on another transport; None when no session is there. The blob
        holds the session's keys: store it like a PSK."""
        peer = self._sessions.get((addr[0], addr[1]))
        if peer is None or peer.identity is None or self._dtls is None:
            return None
        blob = self._dtls.exportPeer(peer.session)
        return None if blob is None else (peer.identity, bytes(blob))

    def sequence_numbers(self, addr: Address) -> tuple[int, int] | None:
        """(the highest record number received, the number of the next record sent) of the
        session at ``addr``, each ``epoch << 48 | sequence_number``; None when no session is
        there. What a holder of the session writes back, and how close it is to the end of
        the write sequence numbers it may use."""
        peer = self._sessions.get((addr[0], addr[1]))
        if peer is None or self._dtls is None:
            return None
        received = self._dtls.peerReadSequence(peer.session)
        sent = self._dtls.peerWriteSequence(peer.session)
        return None if received is None or sent is None else (received, sent)

    def import_session(
        self,
        addr: Address,
        identity: str,
        blob: bytes,
        *,
        write_seq_floor: int,
        read_seq_floor: int = 0,
    ) -> None:
        """Create a connected session at ``addr`` from :meth:`export_session`'s output.

        ``write_seq_floor``: the sequence number our next record to it starts at, at least.
        Whoever held the session before may have sent records after the export; a floor
        above anything it can have sent keeps the CCM nonce (epoch and sequence number)
        from repeating under the same key (RFC 6655 §3, RFC 5116 §3).
        ``read_seq_floor`` (``epoch << 48 | sequence_number``, as :meth:`sequence_numbers`
        gives it): records numbered at or below it are refused as replays (RFC 6347
        §4.1.2.6), for what another holder received after the export. A session or
        handshake already at ``addr`` is replaced. Raises ValueError for a blob this build
        cannot read.

        Whatever this transport held at ``addr``, or under the same CID elsewhere, is
        dropped without a close_notify: it may be this very session, and a close_notify
        under its keys would end it for the client."""
        if self._closing or self._dtls is None:
            raise ValueError("the DTLS transport is closed")
        if not 0 <= write_seq_floor < 1 << 48:
            # RFC 6347 §4.1: a record's sequence number has 48 bits
            raise ValueError(f"write_seq_floor {write_seq_floor} is not within 0 .. 2**48 - 1")
        if not 0 <= read_seq_floor < 1 << 64:
            raise ValueError(f"read_seq_floor {read_seq_floor} is not within 0 .. 2**64 - 1")
        self._import((addr[0], addr[1]), identity, blob, write_seq_floor, read_seq_floor)

    def _import(
        self, key: _Key, identity: str, blob: bytes, write_seq_floor: int, read_seq_floor: int
    ) -> _Peer:
        session = self._session_at(key)
        self._drop(key)
        self._dtls.importPeer(session, bytes(blob), write_seq_floor, read_seq_floor)
        peer = _Peer(session, self._loop.time())
        peer.identity = identity
        self._sessions[key] = peer
        self._by_identity.setdefault(identity, set()).add(key)
        cid = self._dtls.peerCid(session)
        if cid:
            peer.cid = bytes(cid)
            stale = self._by_cid.get(peer.cid)
            if stale is not None and stale != key:
                self._drop(stale)  # an older copy of the same session
            self._by_cid[peer.cid] = key
        self.stats.imported += 1
        self._enforce_cap(key)
        return peer

    # -- receiving --------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: Address) -> None:
        if self._closing:
            return
        self.stats.datagrams += 1
        if not self._v4 and _parked(addr):
            # RFC 6666: nothing real sends from there; a spoofed source must not reach a
            # parked session under its parking address.
            self.stats.dropped_stateless += 1
            return
        self._handle(data, addr)

    def _handle(self, data: bytes, addr: Address) -> None:
        """One datagram: as it arrives, or held while its CID was looked up (_resume)."""
        key: _Key = (addr[0], addr[1])
        # An epoch-0 ClientHello: tinydtls answers it statelessly and touches no peer, unless
        # its cookie verifies, and then it starts a fresh handshake for this address.
        hello = (
            len(data) >= _RECORD_HEADER + _HANDSHAKE_HEADER
            and data[0] == _CT_HANDSHAKE
            and data[3] == 0
            and data[4] == 0
            and data[_RECORD_HEADER] == _HT_CLIENT_HELLO
        )
        if hello and not self._accepting:
            self.stats.refused_stopping += 1
            return
        # A tls12_cid record names its session by our CID (RFC 9146 §4), wherever it comes
        # from; tinydtls still finds peers by address, so it is handled under the address the
        # session has now (``at``), and moved to ``key`` only if it proves itself (_move).
        at = key
        cid: bytes | None = None
        if data[0] == _CT_TLS12_CID and len(data) >= _CID_RECORD_HEADER:
            cid = data[_CID_AT : _CID_AT + CID_LENGTH]
            at = self._by_cid.get(cid, key)
        peer = self._sessions.get(at)
        if peer is None and at != key:  # (the index and the table agree; defensively)
            at = key
            peer = self._sessions.get(key)
        if peer is not None and cid is not None and peer.cid != cid:
            # A CID no session here has, from an address that has a session: not that
            # session's record (it would only be dropped there), but a device that moved to
            # an address a NAT had given to another one before. Looked up like any unknown
            # CID; it displaces the session here only once it authenticated (_resume, _move).
            peer = None
        if peer is not None:
            self._sessions.move_to_end(at)
        else:
            # a handshake's own address only: its Finished is the first CID record
            peer = self._handshaking.get(key)
            if peer is not None:
                self._handshaking.move_to_end(key)
            elif not hello:
                # tinydtls would drop it too (no peer); spare the trip into C.
                if cid is not None:
                    if not self._look_up(cid, data, addr):
                        self.stats.dropped_unknown_cid += 1
                else:
                    self.stats.dropped_stateless += 1
                return
        self._current, self._current_c = at, self._c_key(at)
        self._hello_sent = self._alert_sent = self._closed_by_peer = False
        before: int | None = None
        try:
            if peer is not None:
                if at != key:
                    before = self._dtls.peerReadSequence(peer.session)
                peer.last = self._loop.time()
                self._dtls.handleMessage(peer.session, data)
            else:
                self._dtls.handleMessageAddr(self._current_c[0], key[1], data)
        except Exception:
            device = peer.identity if peer is not None and peer.identity else _address(key)
            log.exception(
                "tinydtls failed on a datagram from %s:%s (device %s)",
                key[0],
                key[1],
                device,
                extra={"device": device},
            )
        finally:
            self._current = self._current_c = None
            self._lookup.forget()
        if at != key and peer is not None:
            if self._move(at, key, peer, before):
                at = key
            else:
                addr = at  # whatever it says is answered at the session's address
        self._settle(at, addr, peer, hello)

    def _move(self, old: _Key, new: _Key, peer: _Peer, before: int | None) -> bool:
        """RFC 9146 §6: a CID record from a new address moves the session there only if it
        authenticated (tinydtls delivered its plaintext and raised no alert) and is the newest
        record of the session: tinydtls raises its highest received record number (epoch,
        sequence number) only for a record that authenticated and is newer than all before
        it. A replayed, reordered or forged record moves nothing and is answered, if at all,
        at the old address."""
        after = self._dtls.peerReadSequence(peer.session) if self._dtls is not None else None
        authentic = bool(self._plaintext) and not (self._alert_sent or self._closed_by_peer)
        newest = after is not None and before is not None and after > before
        if not (authentic and newest):
            self.stats.cid_not_moved += 1
            return False
        # Another peer at the address the device now uses: a NAT gave that device's port to
        # this one. A CID session there is parked (its device has moved on too, and its next
        # record finds it by CID); anything else is stale and goes, as it is found by that
        # address only: silently, as the address is another device's now (a close_notify
        # would reach that device, under keys it does not have).
        occupant = self._sessions.get(new) or self._handshaking.get(new)
        parkable = occupant is not None and occupant.cid is not None and new in self._sessions
        if occupant is not None and not (parkable and self._park(new, occupant)):
            self._evict(new, occupant, notify=False)
        if not self._rekey(old, new, peer):
            self.stats.cid_not_moved += 1
            return False
        self.stats.address_updates += 1
        log.debug(
            "DTLS session of device %s moved from %s to %s (Connection ID)",
            peer.identity,
            _address(old),
            _address(new),
            extra={"device": peer.identity or _address(new)},
        )
        return True

    def _rekey(self, old: _Key, new: _Key, peer: _Peer) -> bool:
        """Move a session from ``old`` to ``new`` in tinydtls and in the tables (False:
        tinydtls refused, nothing changed). Its place in the order of activity is now."""
        session = self._session_at(new)
        if not self._dtls.rebind(peer.session, session):
            return False
        self._forget(old, peer)
        peer.session = session
        self._sessions[new] = peer
        if peer.identity is not None:
            self._by_identity.setdefault(peer.identity, set()).add(new)
        if peer.cid is not None:
            self._by_cid[peer.cid] = new
        return True

    def _parking_key(self) -> _Key:
        self._parking += 1
        return (str(_PARKING.network_address + self._parking), _PARKING_PORT)

    def _park(self, key: _Key, peer: _Peer) -> bool:
        """Move the CID session at ``key`` to a fresh parking address (see :data:`_PARKING`).
        Its idle time starts again: the table is ordered by activity, and the parked session
        goes to its end (it still counts against the cap and is swept when idle)."""
        parking = self._parking_key()
        if not self._rekey(key, parking, peer):
            return False
        peer.last = self._loop.time()
        self.stats.parked += 1
        log.debug(
            "DTLS session of device %s parked: a NAT gave its address %s to another session",
            peer.identity,
            _address(key),
            extra={"device": peer.identity or _address(key)},
        )
        return True

    def _settle(self, key: _Key, addr: Address, peer: _Peer | None, hello: bool) -> None:
        """Bring the peer tables in line with what tinydtls just did, then deliver plaintext
        (outside the C callback, so the protocol may send without re-entering tinydtls)."""
        if self._to_save:
            connected, self._to_save = self._to_save, []
            for done in connected:
                self._save(done)
        if hello:
            if self._hello_sent:
                # The cookie verified: tinydtls created a fresh peer, replacing any old one at
                # this address (RFC 6347 §4.2.8).
                if peer is not None:
                    self._forget(key, peer)
                peer = _Peer(
                    self._tinydtls.Session(self._c_host(key[0]), key[1]), self._loop.time()
                )
                self._handshaking[key] = peer
                self.stats.handshakes += 1
                self._enforce_cap(key)
            # Otherwise a HelloVerifyRequest or a stateless alert went out and any existing
            # peer is untouched: an alert here must not end a session (anyone can send a
            # ClientHello from a spoofed address).
        elif peer is not None and (self._closed_by_peer or self._alert_sent):
            # A fatal alert either way, or close_notify: tinydtls dropped or is closing it.
            self.stats.closed_by_peer += self._closed_by_peer
            if self._closed_by_peer and peer.ceiling is not None and peer.cid is not None:
                # The client ended the session: no replica may continue it.
                self._spawn(self._unstore(peer.cid), "dtls-forget")
            self._evict(key, peer)
            peer = None
        plaintext, self._plaintext = self._plaintext, []
        if plaintext and self._protocol is not None:
            # Only an authenticated session's data goes up: without an identity the messaging
            # layer would treat it as plain CoAP, attributed by address (tinydtls delivers
            # application data only after the handshake, so this is a safety net).
            session = self._sessions.get(key)
            if session is None or session.identity is None:
                return
            if _parked(addr):
                # Authenticated but not the newest record of a parked session: there is no
                # address to answer at (the device retransmits; the next record moves it).
                self.stats.unsent_parked += len(plaintext)
                return
            for data in plaintext:
                self._protocol.datagram_received(data, addr)

    # -- tinydtls callbacks (never raise: an exception would be left pending in C) ---------

    def _on_write(self, c_addr: tuple[str, int], data: bytes) -> int:
        try:
            if c_addr == self._current_c:
                if (
                    data[0] == _CT_HANDSHAKE
                    and data[3] == 0
                    and data[4] == 0
                    and len(data) > _RECORD_HEADER
                    and data[_RECORD_HEADER] == _HT_SERVER_HELLO
                ):
                    self._hello_sent = True
                elif data[0] == _CT_ALERT:
                    self._alert_sent = True
            if _parked(c_addr):
                self.stats.unsent_parked += 1  # never to a parking address (_PARKING)
            elif self._udp is not None and not self._udp.is_closing():
                self._udp.sendto(data, (self._app_host(c_addr[0]), c_addr[1]))
        except Exception:
            device = _address((self._app_host(c_addr[0]), c_addr[1]))
            log.exception("DTLS write to device %s failed", device, extra={"device": device})
        return len(data)

    def _on_read(self, c_addr: tuple[str, int], data: bytes) -> int:
        # Only ever called while handling a datagram from that very peer.
        self._plaintext.append(data)
        return len(data)

    def _on_event(self, level: int, code: int) -> None:
        try:
            key = self._current
            if key is None:
                return
            if code == _EVENT_CONNECTED:
                peer = self._handshaking.pop(key, None) or self._sessions.get(key)
                if peer is None:
                    return
                self._unindex(key, peer)
                peer.identity, peer.pending = peer.pending, None
                self._sessions[key] = peer
                self._sessions.move_to_end(key)
                if peer.identity is not None:
                    self._by_identity.setdefault(peer.identity, set()).add(key)
                cid = self._dtls.peerCid(peer.session)
                peer.cid = cid or None
                if peer.cid is not None:
                    self._by_cid[peer.cid] = key
                    self.stats.cid_sessions += 1
                    if self._store is not None and peer.identity is not None:
                        # Exported and written once tinydtls has returned (_settle). The
                        # creator's claim is the store's first range: its handshake records
                        # already used the first numbers of it.
                        peer.ceiling = self._store.span
                        self._to_save.append(key)
                self.stats.connected += 1
            elif level == _ALERT_LEVEL_FATAL or code == _ALERT_CLOSE_NOTIFY:
                self._closed_by_peer = True
        except Exception:
            device = _address(self._current) if self._current is not None else "-"
            log.exception(
                "DTLS event handling failed (device %s)", device, extra={"device": device}
            )

    def _key_for(self, raw_identity: bytes) -> bytes:
        """get_psk_info(DTLS_PSK_KEY): runs inside tinydtls, so a dict read and nothing more."""
        identity: str | None
        try:
            identity = raw_identity.decode()
        except UnicodeDecodeError:
            identity = None
        key = self._psks.lookup(identity) if identity is not None else None
        if key is not None and len(key) > MAX_KEY_BYTES:
            log.warning(
                "PSK of identity %s is %d bytes; tinydtls takes at most %d: handshake refused",
                identity,
                len(key),
                MAX_KEY_BYTES,
            )
            key = None
        current = self._current
        if current is not None:
            peer = self._handshaking.get(current) or self._sessions.get(current)
            if peer is not None:
                peer.pending = identity if key is not None else None
                if self._store is not None:
                    peer.check = key_check(key) if key is not None else None
        if key is None:
            self.stats.unknown_identity += 1
            key = hmac.new(self._dummy_secret, raw_identity, hashlib.sha256).digest()
            key = key[:MAX_KEY_BYTES]
        return key

    def _user_parameters(self, _ctx: Any, _session: Any, parameters: Any) -> None:
        """tinydtls' get_user_parameters, once per ClientHello: offer only
        TLS_PSK_WITH_AES_128_CCM_8 and apply the extension policy."""
        params = parameters.contents
        params.cipher_suites[0] = TLS_PSK_WITH_AES_128_CCM_8
        for i in range(1, len(params.cipher_suites)):
            params.cipher_suites[i] = 0
        params.force_extended_master_secret = int(self._require_ems)
        params.force_renegotiation_info = int(self._require_ems)
        params.support_connection_id = int(self._connection_id)

    # -- peer tables --------------------------------------------------------------------------

    def _c_key(self, key: _Key) -> tuple[str, int]:
        """A peer key as tinydtls names it (a parking address as it is)."""
        return key if _parked(key) else (self._c_host(key[0]), key[1])

    def _session_at(self, key: _Key) -> Any:
        return self._tinydtls.Session(*self._c_key(key))

    def _c_host(self, host: str) -> str:
        """tinydtls keys sessions on IPv6 socket addresses: IPv4 as v4-mapped."""
        host = host.split("%", 1)[0]
        return "::ffff:" + host if self._v4 else host

    def _app_host(self, c_host: str) -> str:
        return c_host[7:] if self._v4 and c_host.startswith("::ffff:") else c_host

    def _unindex(self, key: _Key, peer: _Peer) -> None:
        if peer.cid is not None and self._by_cid.get(peer.cid) == key:
            del self._by_cid[peer.cid]
        if peer.identity is not None:
            keys = self._by_identity.get(peer.identity)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_identity[peer.identity]

    def _forget(self, key: _Key, peer: _Peer) -> None:
        """Drop our record of a peer (tinydtls' state is handled by the caller)."""
        if self._sessions.pop(key, None) is None:
            self._handshaking.pop(key, None)
        self._unindex(key, peer)

    def _reset(self, peer: _Peer) -> None:
        """Free tinydtls' state of a peer; it sends close_notify if the peer was not closed
        (not for a stored session whose write range is used up: that record would need a
        sequence number this replica has not claimed)."""
        try:
            if peer.ceiling is not None and not self._below_ceiling(peer):
                self._dtls.dropPeer(peer.session)
                return
            self._dtls.resetPeer(peer.session)
        except Exception:
            device = peer.identity or "-"
            log.exception(
                "tinydtls could not reset the session of device %s",
                device,
                extra={"device": device},
            )

    def _drop(self, key: _Key) -> None:
        """Forget the peer at ``key`` here and in tinydtls without sending anything."""
        peer = self._sessions.get(key) or self._handshaking.get(key)
        if peer is not None:
            self._forget(key, peer)
            self._dtls.dropPeer(peer.session)

    def _evict(self, key: _Key, peer: _Peer, *, notify: bool = True) -> None:
        self._forget(key, peer)
        if notify:
            self._reset(peer)
        else:
            self._dtls.dropPeer(peer.session)

    def _enforce_cap(self, newest: _Key) -> None:
        """Called after ``newest`` started a handshake. Handshakes beyond their own cap go
        first (oldest first), then, beyond the total cap, the longest-silent peers, handshakes
        before sessions. The newest is never the victim."""
        full = False
        while len(self._handshaking) > self._max_handshakes or self.peer_count > self._max_peers:
            full = True
            victims = self._handshaking
            if len(self._handshaking) <= self._max_handshakes and (
                len(self._handshaking) <= 1 or not self._sessions
            ):
                victims = self._sessions
            if not victims:
                break
            key, peer = next(iter(victims.items()))
            if key == newest:
                break
            self.stats.evicted_cap += 1
            # A stored session is let go without close_notify: it stays in the store, and
            # the device's next record resumes it here or on another replica.
            self._evict(key, peer, notify=peer.ceiling is None)
        now = self._loop.time()
        if full and now - self._cap_warned_at > 60:
            self._cap_warned_at = now
            log.warning(
                "DTLS cap reached (%d handshakes, %d peers): evicting the longest-silent",
                self._max_handshakes,
                self._max_peers,
            )

    def _sweep(self) -> None:
        now = self._loop.time()
        for table, timeout, counter in (
            (self._handshaking, self._handshake_timeout, "evicted_handshake"),
            (self._sessions, self._idle_timeout, "evicted_idle"),
        ):
            cutoff = now - timeout
            while table:
                key, peer = next(iter(table.items()))
                if peer.last > cutoff:
                    break
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
                # Silent for a stored session: another replica may be serving it now, at
                # an address this one still has for it.
                self._evict(key, peer, notify=peer.ceiling is None)

    async def _tick_loop(self) -> None:
        while True:
            # Handshake flights are retransmitted by tinydtls' timer queue (initially 1 s,
            # doubling); a quarter second is fine enough for that.
            pause = 0.25 if self._handshaking else 1.0
            if self._store is not None:
                pause = min(pause, max(0.05, self._next_touch - self._loop.time()))
            await asyncio.sleep(pause)
            try:
                self._dtls.checkRetransmit()
                self._sweep()
                if self._store is not None and self._loop.time() >= self._next_touch:
                    self._next_touch = self._loop.time() + TOUCH_INTERVAL
                    self._write_back()
            except Exception:
                log.exception("DTLS housekeeping failed")

    # -- shared sessions (docs/SCALING.md, "DTLS sessions"; stores/dtls_sessions.py) -------

    def _spawn(self, work: Any, name: str) -> asyncio.Task[Any]:
        task = self._loop.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _failed(self, what: str, exc: BaseException) -> None:
        """A store operation failed: logged once per interval and kind, never raised (the
        session goes on here; only its life beyond this replica is at stake)."""
        now = self._loop.time()
        if now - self._failures_logged.get(what, -1e9) >= _FAILURE_LOG_INTERVAL:
            self._failures_logged[what] = now
            log.warning(
                "DTLS session store: %s failed (%s: %s); further failures of this kind are not "
                "logged for %g s",
                what,
                type(exc).__name__,
                exc,
                _FAILURE_LOG_INTERVAL,
            )

    def _save(self, key: _Key) -> None:
        """Export a CID session whose handshake just completed and write it to the store."""
        peer = self._sessions.get(key)
        store = self._store
        if store is None or peer is None or peer.cid is None or peer.identity is None:
            return
        if peer.check is None or self._saves >= _MAX_PENDING_SAVES:
            self.stats.save_failed += 1
            self._failed("save", RuntimeError(f"{self._saves} writes pending"))
            return
        blob = self._dtls.exportPeer(peer.session)
        if blob is None:
            return
        # Stored with what it has received so far (its Finished): nothing to write back until
        # a newer record arrives.
        peer.touched = self._dtls.peerReadSequence(peer.session) or 0
        stored = StoredSession(peer.cid, peer.identity, peer.check, bytes(blob), peer.touched)
        self._saves += 1
        self._save_queue.append(stored)
        if self._saver is None or self._saver.done():
            self._saver = self._spawn(self._write(store), "dtls-save")

    async def _write(self, store: DtlsSessionStore) -> None:
        """Group commit: every session queued meanwhile goes in the next batch, one round trip
        each, until the queue is empty (docs/SCALING.md, "DTLS sessions")."""
        while self._save_queue:
            batch = self._save_queue[:_SAVE_BATCH]
            del self._save_queue[:_SAVE_BATCH]
            try:
                await store.save_many(batch, self._idle_timeout)
                self.stats.saved += len(batch)
            except Exception as exc:
                self.stats.save_failed += len(batch)
                self._failed("save", exc)
            finally:
                self._saves -= len(batch)

    async def _unstore(self, cid: bytes) -> None:
        assert self._store is not None
        try:
            await self._store.forget(cid)
        except Exception as exc:
            self._failed("forget", exc)

    async def _forget_identity(self, identity: str) -> None:
        assert self._store is not None
        try:
            gone = await self._store.forget_identity(identity)
        except Exception as exc:
            self._failed("forget_identity", exc)
            return
        if gone:
            log.info(
                "deleted %d stored DTLS session(s) of identity %s: PSK changed", gone, identity
            )

    def _below_ceiling(self, peer: _Peer) -> bool:
        sent = self._dtls.peerWriteSequence(peer.session) if self._dtls is not None else None
        return sent is not None and peer.ceiling is not None and sent & _SEQ_MASK < peer.ceiling

    def _may_write(self, key: _Key, peer: _Peer) -> bool:
        """Whether the next record of a stored session may be sent: its sequence number must
        lie in a range this replica claimed (a number used by two replicas would repeat a CCM
        nonce under one key, RFC 6655 §3). At half the current range the next is claimed."""
        store = self._store
        assert store is not None
        assert peer.ceiling is not None
        sent = self._dtls.peerWriteSequence(peer.session)
        if sent is None or sent & _SEQ_MASK >= peer.ceiling:
            self.stats.seq_exhausted += 1
            log.warning(
                "DTLS session of device %s used up its write sequence range before another "
                "was claimed: dropped here",
                peer.identity,
                extra={"device": peer.identity or _address(key)},
            )
            self._evict(key, peer, notify=False)
            return False
        if (
            not peer.extending
            and sent & _SEQ_MASK >= peer.ceiling - store.span // 2
            and self._loop.time() >= peer.extend_at
        ):
            peer.extending = True
            self._spawn(self._extend(store, peer), "dtls-extend")
        return True

    async def _extend(self, store: DtlsSessionStore, peer: _Peer) -> None:
        assert peer.cid is not None
        assert peer.ceiling is not None
        contiguous = peer.ceiling + store.span
        try:
            ceiling = await store.extend(peer.cid, self._idle_timeout)
        except Exception as exc:
            peer.extending = False
            peer.extend_at = self._loop.time() + _EXTEND_RETRY
            self._failed("extend", exc)
            return
        peer.extending = False
        key = self._by_cid.get(peer.cid)
        if key is None or self._sessions.get(key) is not peer:
            return  # ended here meanwhile
        if ceiling == contiguous:
            peer.ceiling = ceiling
            return
        # Another replica claimed a range after ours: the device's records go there now (or
        # the session is gone from the store: expired, or its key changed). Let it go,
        # without close_notify, which would end the session for the device.
        self.stats.taken_over += 1
        log.info(
            "DTLS session of device %s %s: dropped here",
            peer.identity,
            "is gone from the store" if ceiling is None else "was taken over by another replica",
            extra={"device": peer.identity or _address(key)},
        )
        self._evict(key, peer, notify=False)

    def _write_back(self) -> None:
        """One pass: the highest authenticated receive sequence number of every stored
        session that received something since the last pass (which also refreshes its
        expiry). At most one pass in flight."""
        if self._touching is not None and not self._touching.done():
            return
        changed: list[tuple[bytes, int]] = []
        for peer in self._sessions.values():
            if peer.ceiling is None or peer.cid is None:
                continue
            received = self._dtls.peerReadSequence(peer.session)
            if received is not None and received > peer.touched:
                peer.touched = received
                changed.append((peer.cid, received))
        if changed:
            self._touching = self._spawn(self._touch(changed), "dtls-touch")

    async def _touch(self, changed: list[tuple[bytes, int]]) -> None:
        store = self._store
        assert store is not None
        ttl = self._idle_timeout
        for at in range(0, len(changed), _TOUCH_BATCH):
            batch = changed[at : at + _TOUCH_BATCH]
            try:
                await store.touch_many(batch, ttl)
                self.stats.touches += len(batch)
            except Exception as exc:
                self._failed("touch", exc)

    def _look_up(self, cid: bytes, data: bytes, addr: Address) -> bool:
        """A record with a CID no session here has: ask the store (False: drop it)."""
        if self._store is None:
            return False
        queued = self._lookups.get(cid)
        if queued is not None:
            if len(queued) < _MAX_QUEUED:
                queued.append((data, addr))
            else:
                self.stats.lookup_dropped += 1
            return True
        expiry = self._negative.get(cid)
        if expiry is not None:
            if expiry > self._loop.time():
                return False
            del self._negative[cid]
        if len(self._lookups) >= _MAX_LOOKUPS:
            self.stats.lookup_dropped += 1
            return True
        self._lookups[cid] = [(data, addr)]
        self._spawn(self._resume(self._store, cid), "dtls-resume")
        return True

    def _unknown(self, cid: bytes) -> None:
        self._negative[cid] = self._loop.time() + _NEGATIVE_TTL
        self._negative.move_to_end(cid)
        while len(self._negative) > _NEGATIVE_MAX:
            self._negative.popitem(last=False)

    async def _resume(self, store: DtlsSessionStore, cid: bytes) -> None:
        """Claim a stored session and continue it here with the records that named it."""
        try:
            claim = await store.claim(cid, self._idle_timeout)
        except Exception as exc:
            self._failed("claim", exc)
            claim = None
        self.stats.lookups += 1
        queued = self._lookups.pop(cid, [])
        if self._closing or self._dtls is None:
            return
        if claim is None:
            self._unknown(cid)
            self.stats.dropped_unknown_cid += len(queued)
            return
        stored = claim.session
        key = self._psks.lookup(stored.identity)
        if key is None or not hmac.compare_digest(key_check(key), stored.check):
            # Made with a key that has changed or been revoked since: never resumed.
            self.stats.import_refused += 1
            self._unknown(cid)
            self.stats.dropped_unknown_cid += len(queued)
            log.info(
                "stored DTLS session of device %s refused: its PSK changed",
                stored.identity,
                extra={"device": stored.identity},
            )
            await self._unstore(cid)
            return
        if cid in self._by_cid:  # a session of this CID is here after all
            for data, addr in queued:
                self._handle(data, addr)
            return
        data, addr = queued[0]
        # Imported at a parking address, not at the record's source: until the record
        # authenticates, nothing there may be displaced (RFC 9146 §6; a replayed or forged
        # record spoofed from another device's address would end that device's session).
        # The record then takes the ordinary way (_handle, _move): authentic and newest, the
        # session moves to its source address; otherwise it stays parked, and goes.
        at = self._parking_key()
        try:
            peer = self._import(at, stored.identity, stored.state, claim.floor, stored.received)
        except ValueError as exc:
            self._failed("import", exc)
            self._unknown(cid)
            return
        peer.ceiling, peer.check = claim.ceiling, stored.check
        peer.touched = self._dtls.peerReadSequence(peer.session) or 0
        self._handle(data, addr)
        if self._dtls is not None and self._sessions.get(at) is peer:
            # Not moved: the record did not authenticate, or is not newer than what was
            # written back (a replay). Nothing answered it; the imported copy goes, silently.
            self.stats.import_unauthenticated += 1
            self._evict(at, peer, notify=False)
            self._unknown(cid)
            return
        for data, addr in queued[1:]:
            self._handle(data, addr)


async def create_dtls_endpoint(
    protocol_factory: Callable[[DtlsTransport], asyncio.DatagramProtocol],
    *,
    psk_store: PskStore,
    host: str,
    port: int,
    max_sessions: int = 10_000,
    max_handshakes: int = 1_000,
    idle_timeout: float = 300.0,
    handshake_timeout: float = 30.0,
    require_extended_master_secret: bool = False,
    connection_id: bool = True,
    reuse_port: bool = False,
    session_store: DtlsSessionStore | None = None,
) -> tuple[DtlsTransport, asyncio.DatagramProtocol]:
    """Like ``loop.create_datagram_endpoint``; the factory gets the transport so the protocol
    can be given ``identity_of=transport.identity_of``."""
    transport = DtlsTransport(
        psk_store,
        max_sessions=max_sessions,
        max_handshakes=max_handshakes,
        idle_timeout=idle_timeout,
        handshake_timeout=handshake_timeout,
        require_extended_master_secret=require_extended_master_secret,
        connection_id=connection_id,
        session_store=session_store,
    )
    protocol = protocol_factory(transport)
    try:
        await transport.start(protocol, host, port, reuse_port=reuse_port)
    except BaseException:
        with contextlib.suppress(Exception):
            transport.close()
        raise
    return transport, protocol
