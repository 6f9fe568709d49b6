"""DTLS sessions shared by the proxy's replicas, found by Connection ID (RFC 9146).

A session negotiated with a Connection ID is found by that CID, not by the peer's address, so a
record may reach any replica: after a NAT rebinding, a replica SIGKILLed, a rolling update or a
load balancer without affinity. With ``--redis-url`` the replica that completes a handshake
stores what the session needs (:class:`StoredSession`, exported from tinydtls) under its CID;
another replica that receives a record with a CID it does not know loads it from here and
continues the session without a handshake (docs/SCALING.md, "DTLS sessions").

Two rules keep that safe:

- **A sequence number range per replica.** AES-CCM must never see one nonce twice under one key
  (RFC 6655 §3: the nonce is the write IV and the record's epoch and sequence number). Every
  replica that sends on a session first *claims* a range of write sequence numbers with one
  atomic ``HINCRBY`` on the session's ``ceiling``: its range ends at the value returned and
  starts :data:`SPAN` below it, and no other replica can be handed an overlapping range. A
  replica that reaches the end of its range claims the next one; if the returned range does not
  follow its own, another replica has taken the session over, and this one lets it go.
- **Replay protection across replicas is bounded.** Each replica keeps tinydtls' own receive
  window (RFC 6347 §4.1.2.6). The highest authenticated sequence number is written back at most
  every :data:`TOUCH_INTERVAL` seconds and an importing replica refuses everything at or below
  it; a record replayed within that interval to another replica decrypts there, but the CoAP
  message in it is answered from the deduplication cache that every replica shares (RFC 7252
  §4.5; docs/SCALING.md), never processed twice.

A revoked or changed PSK ends the stored sessions too: :meth:`forget_identity` deletes them (every
replica calls it when the PSK mirror announces the change), and an importing replica refuses a
session whose ``key_check`` does not match the key it holds now, which also covers a session
written while the revocation was on its way.

The stored state includes the session's traffic keys. Redis already holds every device's PSK,
from which those keys derive, so this adds no new class of secret to protect; the key schema
below keeps them under the deployment's prefix and they expire with the session.

Cost: the writes every handshake and every active session cause go in batches
(:meth:`DtlsSessionStore.save_many`, :meth:`DtlsSessionStore.touch_many`; the transport collects
what is pending while the previous batch is in flight), one round trip per batch
(docs/SCALING.md, "DTLS sessions"; BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from stores.keys import DEFAULT_PREFIX, dtls_identity_key, dtls_session_key
from stores.redis import RedisConnection, connect
from stores.redis_url import parse_redis_url
from stores.resp import ScriptLink, address_of

# Write sequence numbers one replica may use before it claims more (2**48 exist per epoch). A
# device sending a message a minute uses ~1,500 a day, so a claim is rare; a replica that takes
# a session over skips at most this many numbers.
SPAN = 1 << 20

# The longest a replica waits before it writes back the highest sequence number it authenticated
# and refreshes the session's expiry: the bound of the cross-replica replay window.
TOUCH_INTERVAL = 1.0


def key_check(psk: bytes) -> bytes:
    """A fingerprint of the PSK a session was made with (not the key): an importing replica
    compares it with the key its mirror holds now, so a session of a changed key never
    resumes. HMAC with a fixed label, so it says nothing about the key beyond equality."""
    return hmac.new(psk, b"coap-bridge dtls session key check", hashlib.sha256).digest()[:16]


@dataclass(frozen=True, slots=True)
class StoredSession:
    cid: bytes  # the server's CID: what the client writes into every record it sends
    identity: str  # the PSK identity (never the key)
    check: bytes  # key_check(psk)
    state: bytes  # tinydtls' export of the connected peer (keys, epoch, CIDs)
    received: int  # highest authenticated receive sequence number written back so far


@dataclass(frozen=True, slots=True)
class Claim:
    session: StoredSession
    floor: int  # the first write sequence number this replica may use
    ceiling: int  # one past the last


class DtlsSessionStore(Protocol):
    @property
    def span(self) -> int:
        """How many write sequence numbers one claim covers."""
        ...

    async def save(self, session: StoredSession, ttl: float) -> Claim:
        """Store a session its handshake just made; the creator's claim starts at 0."""
        ...

    async def save_many(self, sessions: Sequence[StoredSession], ttl: float) -> None:
        """:meth:`save` for several sessions at once, in one round trip: what a replica
        writes when handshakes complete faster than one write takes (group commit)."""
        ...

    async def claim(self, cid: bytes, ttl: float) -> Claim | None:
        """The stored session of ``cid`` and a fresh range of write sequence numbers for the
        caller (None: unknown or expired)."""
        ...

    async def extend(self, cid: bytes, ttl: float) -> int | None:
        """The ceiling of a further range for the session's current holder (None: gone)."""
        ...

    async def touch(self, cid: bytes, received: int, ttl: float) -> None:
        """Write back the highest authenticated sequence number and refresh the expiry."""
        ...

    async def touch_many(self, touches: Sequence[tuple[bytes, int]], ttl: float) -> None:
        """:meth:`touch` for several ``(cid, received)`` at once, in one round trip."""
        ...

    async def forget(self, cid: bytes) -> None: ...

    async def forget_identity(self, identity: str) -> int:
        """Delete every stored session of ``identity``; returns how many."""
        ...

    async def close(self) -> None: ...


class MemoryDtlsSessionStore:
    """One process's dict: the same rules, for tests and for replicas sharing one process."""

    def __init__(self, *, span: int = SPAN) -> None:
        self._span = _checked_span(span)
        self._sessions: dict[bytes, tuple[StoredSession, int]] = {}

    @property
    def span(self) -> int:
        return self._span

    async def save(self, session: StoredSession, ttl: float) -> Claim:
        self._sessions[session.cid] = (session, self._span)
        return Claim(session, 0, self._span)

    async def save_many(self, sessions: Sequence[StoredSession], ttl: float) -> None:
        for session in sessions:
            await self.save(session, ttl)

    async def claim(self, cid: bytes, ttl: float) -> Claim | None:
        found = self._sessions.get(cid)
        if found is None:
            return None
        session, ceiling = found
        self._sessions[cid] = (session, ceiling + self._span)
        return Claim(session, ceiling, ceiling + self._span)

    async def extend(self, cid: bytes, ttl: float) -> int | None:
        found = self._sessions.get(cid)
        if found is None:
            return None
        session, ceiling = found
        self._sessions[cid] = (session, ceiling + self._span)
        return ceiling + self._span

    async def touch(self, cid: bytes, received: int, ttl: float) -> None:
        found = self._sessions.get(cid)
        if found is not None and received > found[0].received:
            session, ceiling = found
            self._sessions[cid] = (
                StoredSession(
                    session.cid, session.identity, session.check, session.state, received
                ),
                ceiling,
            )

    async def touch_many(self, touches: Sequence[tuple[bytes, int]], ttl: float) -> None:
        for cid, received in touches:
            await self.touch(cid, received, ttl)

    async def forget(self, cid: bytes) -> None:
        self._sessions.pop(cid, None)

    async def forget_identity(self, identity: str) -> int:
        gone = [cid for cid, (s, _) in self._sessions.items() if s.identity == identity]
        for cid in gone:
            del self._sessions[cid]
        return len(gone)

    async def close(self) -> None:
        pass


# KEYS[1] session hash. ARGV: identity, check, state, span, ttl ms, received.
_SAVE_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'identity', ARGV[1], 'check', ARGV[2], 'state', ARGV[3],
           'received', ARGV[6], 'ceiling', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# One server only (every key in one script): n sessions and their identities' indexes.
# KEYS: n session hashes, then the n index sets. ARGV: span, ttl ms, then per session
# identity, check, state, received, CID (hex).
_SAVE_MANY_LUA = """
local n = #KEYS / 2
for i = 1, n do
  local a = 2 + (i - 1) * 5
  redis.call('DEL', KEYS[i])
  redis.call('HSET', KEYS[i], 'identity', ARGV[a + 1], 'check', ARGV[a + 2],
             'state', ARGV[a + 3], 'received', ARGV[a + 4], 'ceiling', ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('SADD', KEYS[n + i], ARGV[a + 5])
  redis.call('PEXPIRE', KEYS[n + i], ARGV[2])
end
return n
"""

# KEYS: session hashes. ARGV: ttl ms, then one received per key. Never lowers 'received'.
_TOUCH_MANY_LUA = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local received = tonumber(redis.call('HGET', KEYS[i], 'received') or '0')
    if tonumber(ARGV[i + 1]) > received then
      redis.call('HSET', KEYS[i], 'received', ARGV[i + 1])
    end
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return #KEYS
"""

# KEYS[1] session hash. ARGV: span, ttl ms. The session and the new ceiling, in one step: two
# replicas claiming at once get two ranges.
_CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ceiling = redis.call('HINCRBY', KEYS[1], 'ceiling', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'identity', 'check', 'state', 'received')
return {f[1], f[2], f[3], f[4], ceiling}
"""

_EXTEND_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ceiling = redis.call('HINCRBY', KEYS[1], 'ceiling', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return ceiling
"""

# KEYS[1] session hash. ARGV: received, ttl ms. Never lowers 'received'.
_TOUCH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local received = tonumber(redis.call('HGET', KEYS[1], 'received') or '0')
if tonumber(ARGV[1]) > received then redis.call('HSET', KEYS[1], 'received', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def _checked_span(span: int) -> int:
    # At least 2, so that "half the range" (when a holder claims the next) is a real point.
    if not 2 <= span <= 1 << 47:
        raise ValueError(f"span {span} is not within 2 .. 2**47 write sequence numbers")
    return span


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RedisDtlsSessionStore:
    """Sessions in Redis (one server, Sentinel or Cluster): a hash per CID, with its own hash
    tag so sessions spread over a Cluster's slots, and a set per identity for revocation.

    The writes every handshake and every active session cause (:meth:`save_many`,
    :meth:`touch_many`) go in batches, one round trip per batch. On one server (Sentinel's
    master included) a batch is one script call holding every key, each session written
    together with its identity's index. With ``link`` (one server without TLS) every script
    call goes over the project's own RESP connection (docs/ARCHITECTURE.md, "Own wire clients
    on the hot path"), else through redis-py. A Cluster puts a session and its identity's
    index in different slots, so there a batch is one non-transactional pipeline of per-key
    commands, which redis-py sends to each node at once."""

    def __init__(
        self,
        connection: RedisConnection,
        *,
        prefix: str = DEFAULT_PREFIX,
        span: int = SPAN,
        link: ScriptLink | None = None,
    ) -> None:
        self._span = _checked_span(span)
        self._connection = connection
        self._prefix = prefix
        self._link = None if connection.cluster else link
        client: Any = connection.client
        self._client = client
        self._save = client.register_script(_SAVE_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._extend = client.register_script(_EXTEND_LUA)
        self._touch = client.register_script(_TOUCH_LUA)
        self._save_many = client.register_script(_SAVE_MANY_LUA)
        self._touch_many = client.register_script(_TOUCH_MANY_LUA)

    @property
    def span(self) -> int:
        return self._span

    def _key(self, cid: bytes) -> str:
        return dtls_session_key(cid.hex(), self._prefix)

    async def save(self, session: StoredSession, ttl: float) -> Claim:
        await self.save_many([session], ttl)
        return Claim(session, 0, self._span)

    async def save_many(self, sessions: Sequence[StoredSession], ttl: float) -> None:
        if not sessions:
            return
        ms = _ms(ttl)
        if not self._connection.cluster:
            keys = [self._key(s.cid) for s in sessions]
            keys += [dtls_identity_key(s.identity, self._prefix) for s in sessions]
            args: list[Any] = [self._span, ms]
            for s in sessions:
                args += [s.identity, s.check, s.state, s.received, s.cid.hex()]
            await self._run(self._save_many, keys, args)
            return
        # The identity's index lives on another slot than the session: its own commands in
        # the same pipeline. A session missing from it is still refused after a key change
        # (its key_check no longer matches).
        commands: list[tuple[Any, ...]] = []
        for s in sessions:
            index = dtls_identity_key(s.identity, self._prefix)
            commands.append(
                (_SCRIPT, self._save, self._key(s.cid),
                 s.identity, s.check, s.state, self._span, ms, s.received)
            )  # fmt: skip
            commands.append(("SADD", index, s.cid.hex()))
            commands.append(("PEXPIRE", index, ms))
        await self._pipeline(commands)

    async def touch_many(self, touches: Sequence[tuple[bytes, int]], ttl: float) -> None:
        if not touches:
            return
        ms = _ms(ttl)
        if not self._connection.cluster:
            keys = [self._key(cid) for cid, _ in touches]
            await self._run(self._touch_many, keys, [ms, *(r for _, r in touches)])
            return
        await self._pipeline(
            [(_SCRIPT, self._touch, self._key(cid), received, ms) for cid, received in touches]
        )

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """One script call: over the RESP link if there is one (claims and extensions too:
        a replica taking over a dead one's sessions claims them all at once)."""
        if self._link is not None:
            return await self._link.run(script.script, keys, args)
        return await script(keys=keys, args=args)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> None:
        """Commands (a single-key script call is ``(_SCRIPT, script, key, *args)``) in one
        non-transactional Cluster pipeline; a script a node does not know yet (a new or
        restarted node) is loaded there and the batch sent once more (all its writes may be
        repeated: they set values, they do not add to them). The first error is raised."""
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                if command[0] is _SCRIPT:
                    script, key, *args = command[1:]
                    # (redis-py blocks its evalsha method on a Cluster pipeline, but routes
                    # the command by its key like any other)
                    pipe.execute_command("EVALSHA", script.sha, 1, key, *args)
                else:
                    pipe.execute_command(*command)
            results = await pipe.execute(raise_on_error=False)
            errors = [r for r in results if isinstance(r, Exception)]
            if not errors:
                return
            if attempt == 0 and all(isinstance(e, NoScriptError) for e in errors):
                for script in {c[1] for c in commands if c[0] is _SCRIPT}:
                    await self._client.script_load(script.script)
                continue
            raise errors[0]

    async def claim(self, cid: bytes, ttl: float) -> Claim | None:
        raw = await self._run(self._claim, [self._key(cid)], [self._span, _ms(ttl)])
        if not raw or raw[0] is None or raw[2] is None:
            return None
        identity, check, state, received, ceiling = raw
        session = StoredSession(cid, _text(identity), bytes(check), bytes(state), int(received))
        return Claim(session, int(ceiling) - self._span, int(ceiling))

    async def extend(self, cid: bytes, ttl: float) -> int | None:
        raw = await self._run(self._extend, [self._key(cid)], [self._span, _ms(ttl)])
        return None if raw is None or raw is False else int(raw)

    async def touch(self, cid: bytes, received: int, ttl: float) -> None:
        await self._run(self._touch, [self._key(cid)], [received, _ms(ttl)])

    async def forget(self, cid: bytes) -> None:
        await self._client.delete(self._key(cid))

    async def forget_identity(self, identity: str) -> int:
        index = dtls_identity_key(identity, self._prefix)
        members = await self._client.smembers(index)
        gone = 0
        for member in members:
            gone += int(await self._client.delete(self._key(bytes.fromhex(_text(member)))))
        await self._client.delete(index)
        return gone

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
        await self._connection.aclose()


# Marks a single-key script call in a Cluster pipeline (RedisDtlsSessionStore._pipeline).
_SCRIPT = object()


def dtls_sessions_for(
    redis_url: str | None,
    prefix: str = DEFAULT_PREFIX,
    *,
    timeout: float = 1.0,
    span: int = SPAN,
) -> DtlsSessionStore:
    """The store a deployment's Redis URL names (None: this process's memory, which is what a
    single proxy without Redis has anyway). A short command timeout: a lookup holds one record
    of one device, and a slow Redis must not stall the transport's lookups for long."""
    if redis_url is None:
        return MemoryDtlsSessionStore(span=span)
    target = parse_redis_url(redis_url)
    address = address_of(target.url) if target.kind == "single" else None
    link = None if address is None else ScriptLink(address, wait_limit=timeout)
    return RedisDtlsSessionStore(
        connect(target, timeout=timeout, retries=1), prefix=prefix, span=span, link=link
    )
