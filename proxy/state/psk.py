"""Pre-shared keys for the DTLS handshake, mirrored into memory (docs/CONTRACT.md §6).

The DTLS transport asks for a key from inside tinydtls' C callback, in the middle of a
handshake: that lookup must be a dict read, never network I/O. So every proxy keeps the PSKs in
memory and Redis pub/sub keeps that copy fresh:

- :class:`RedisPskMirror` loads every device's ``psk`` at start (SMEMBERS of the device set,
  then one pipelined HGET per device), subscribes to :func:`stores.keys.psk_channel` and,
  for each ICCID announced there, re-reads that device's ``psk``. The API publishes inside the
  same MULTI/EXEC that writes the hash, so the re-read always sees the new value; a change
  reaches every replica in one round trip. After a Redis outage it reconnects and reloads
  everything (announcements sent while it was away are lost with the connection).
- :class:`MemoryPskStore` is a plain dict, for tests and for ``coap-bridge up`` without Redis.

Both call their subscribers with the identity whenever its key changed or disappeared; the DTLS
transport then closes that identity's open sessions. Redis exceptions stay in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from policies.psk import PskError, psk_bytes
from stores.keys import DEFAULT_PREFIX, device_key, device_set_key, psk_channel
from stores.redis import REDIS_ERRORS, RedisConnection, connect
from stores.redis_url import parse_redis_url

log = logging.getLogger(__name__)

PskListener = Callable[[str], None]


class PskStore(Protocol):
    """Where the DTLS transport finds the key of a PSK identity (= ICCID)."""

    def lookup(self, identity: str) -> bytes | None:
        """The key bytes, or None; synchronous and never blocking (called from C)."""
        ...

    def subscribe(self, listener: PskListener) -> Callable[[], None]:
        """Call ``listener(identity)`` after that identity's key changed or disappeared;
        returns a function that unsubscribes."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class _Listeners:
    def __init__(self) -> None:
        self._listeners: list[PskListener] = []

    def subscribe(self, listener: PskListener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self, identity: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(identity)
            except Exception:
                log.exception(
                    "PSK change listener failed for identity %s",
                    identity,
                    extra={"device": identity},
                )


def _replace(keys: dict[str, bytes], identity: str, key: bytes | None) -> bool:
    """Set (or with None, drop) ``identity``'s key; True when a key it had changed or went,
    which is what sessions established with the old key must hear about."""
    old = keys.get(identity)
    if key is None:
        keys.pop(identity, None)
    else:
        keys[identity] = key
    return old is not None and old != key


def _key_of(identity: str, psk: str | bytes | None) -> bytes | None:
    """The stored string form (policies.psk) → key bytes; an unusable value counts as none."""
    if psk is None:
        return None
    text = psk.decode() if isinstance(psk, bytes) else psk
    try:
        key = psk_bytes(text)
    except (PskError, UnicodeDecodeError):
        log.warning(
            "unusable PSK stored for identity %s: ignored", identity, extra={"device": identity}
        )
        return None
    return key or None


class MemoryPskStore:
    """A dict of identity → key; writers call :meth:`set` / :meth:`delete`."""

    def __init__(self, psks: dict[str, str] | None = None) -> None:
        self._keys: dict[str, bytes] = {}
        self._listeners = _Listeners()
        for identity, psk in (psks or {}).items():
            self.set(identity, psk)

    def lookup(self, identity: str) -> bytes | None:
        return self._keys.get(identity)

    def subscribe(self, listener: PskListener) -> Callable[[], None]:
        return self._listeners.subscribe(listener)

    def set(self, identity: str, psk: str | None) -> None:
        """Set (``psk`` in the stored string form, see policies.psk) or, with None, revoke."""
        if _replace(self._keys, identity, _key_of(identity, psk)):
            self._listeners.notify(identity)

    def delete(self, identity: str) -> None:
        self.set(identity, None)

    def __len__(self) -> int:
        return len(self._keys)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisPskMirror:
    """Every device's PSK from Redis, in memory, kept fresh by pub/sub."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 2.0,
        reconnect_delay: float = 0.5,
        health_check_interval: float = 5.0,
    ) -> None:
        parse_redis_url(url)  # a malformed URL fails here, not in the background task
        self._url = url
        self._prefix = prefix
        self._timeout = timeout
        self._reconnect_delay = reconnect_delay
        self._health_check_interval = health_check_interval
        self._keys: dict[str, bytes] = {}
        self._listeners = _Listeners()
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self.connected = False
        self.reloads = 0  # full loads so far (start + one per reconnect)

    # -- PskStore -------------------------------------------------------------------------

    def lookup(self, identity: str) -> bytes | None:
        return self._keys.get(identity)

    def subscribe(self, listener: PskListener) -> Callable[[], None]:
        return self._listeners.subscribe(listener)

    def __len__(self) -> int:
        return len(self._keys)

    async def start(self, wait: float | None = None) -> None:
        """Start mirroring; waits up to ``wait`` seconds (default: the timeout) for the first
        full load. If Redis is down the proxy still starts and keeps trying: DTLS handshakes
        fail until the keys are loaded, plain CoAP is unaffected."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="psk-mirror")
        try:
            await asyncio.wait_for(self._synced.wait(), self._timeout if wait is None else wait)
        except TimeoutError:
            log.warning(
                "PSKs not loaded from Redis yet (%s); retrying in the background", self._url
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- mirroring ------------------------------------------------------------------------

    def _connect(self) -> RedisConnection:
        # Any URL the ledger takes (stores.redis_url): one server, Sentinel or Cluster.
        # Every device key carries the {dev} hash tag, so on a Cluster the SMEMBERS and the
        # HGET pipeline all go to the one node that owns that slot; the announcements are
        # classic pub/sub, which a Cluster broadcasts to every node, so the subscription may
        # sit on any of them (redis-py picks the node that owns the channel's slot).
        return connect(
            self._url,
            timeout=self._timeout,
            retries=None,  # redis-py's default schedule, as before
            health_check_interval=self._health_check_interval,
            decode_responses=False,
        )

    async def _run(self) -> None:
        outage_logged = False
        while True:
            connection = self._connect()
            client: Any = connection.client
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                # A Cluster client learns the slot map here: its pub/sub picks a node from it
                # (and fails with a KeyError on an empty map). A no-op for the other clients.
                await client.initialize()
                # Subscribe before loading: a change made while the load runs is then seen
                # twice at worst, never missed.
                await pubsub.subscribe(psk_channel(self._prefix))
                await self._load_all(client)
                if outage_logged:
                    log.warning("PSK mirror reconnected to Redis; %d keys reloaded", len(self))
                outage_logged = False
                self.connected = True
                self._synced.set()
                await self._follow(client, pubsub)
            except REDIS_ERRORS as exc:
                self.connected = False
                if not outage_logged:
                    log.warning(
                        "PSK mirror lost Redis (%s); serving the %d keys it holds until it is back",
                        exc,
                        len(self),
                    )
                    outage_logged = True
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
                with contextlib.suppress(*REDIS_ERRORS):
                    await connection.aclose()
            await asyncio.sleep(self._reconnect_delay)

    async def _load_all(self, client: Any) -> None:
        members = await client.smembers(device_set_key(self._prefix))
        identities = sorted(m.decode() for m in members)
        fresh: dict[str, bytes] = {}
        for start in range(0, len(identities), 1000):
            chunk = identities[start : start + 1000]
            async with client.pipeline(transaction=False) as pipe:
                for identity in chunk:
                    pipe.hget(device_key(identity, self._prefix), "psk")
                values = await pipe.execute()
            for identity, value in zip(chunk, values, strict=True):
                key = _key_of(identity, value)
                if key is not None:
                    fresh[identity] = key
        old, self._keys = self._keys, fresh
        self.reloads += 1
        self._announce(i for i in old if old[i] != fresh.get(i))

    async def _follow(self, client: Any, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if loop.time() - checked > self._health_check_interval:
                # A hung server keeps the subscription's socket open and silent: a PING with
                # the client's timeout notices, and the reconnect reloads everything.
                await client.ping()
                checked = loop.time()
            if message is None or message.get("type") != "message":
                continue
            data = message["data"]
            identity = data.decode() if isinstance(data, bytes) else str(data)
            value = await client.hget(device_key(identity, self._prefix), "psk")
            self._update(identity, _key_of(identity, value))

    def _update(self, identity: str, key: bytes | None) -> None:
        if _replace(self._keys, identity, key):
            self._announce((identity,))

    def _announce(self, identities: Iterable[str]) -> None:
        for identity in identities:
            self._listeners.notify(identity)
