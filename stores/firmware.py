"""Firmware images served block-wise to devices (issue 16; docs/API.md, "Firmware").

A device downloads an image with CoAP Block2 (RFC 7959 §2.4); the proxy asks the API for each
block as an HTTP byte range (docs/ARCHITECTURE.md, coap/blockwise.py), from any replica. So the
store answers ranges, and a range costs the chunks it covers, never the whole image: a 1 MiB
image read in 1 KiB blocks is 1,024 reads of 1 KiB, not 1,024 reads of 1 MiB.

Backends, chosen by :func:`firmware_store_for` from the Redis URL (stores/redis_url.py):

- no URL: :class:`MemoryFirmwareStore`, one process;
- any Redis URL: :class:`RedisFirmwareStore`. An image is cut into :data:`CHUNK_SIZE` strings
  named by the version and a **generation** (random, new on every upload), under the version's
  hash tag ``{fw:<version>}`` (stores/keys.py), with a metadata hash naming the current
  generation. A range is one ``HMGET`` of the metadata and one pipelined ``GETRANGE`` per
  chunk it covers.

Consistency without locks: a generation's chunks are written (with an expiry, so an upload that
dies leaves nothing behind) before the metadata names them, and never change afterwards. The
switch is one script call (:data:`COMMIT_LUA`) that checks every chunk is there, points the
metadata at the new generation, makes its chunks permanent and deletes the old generation's:
a reader sees the old image or the new one, never a mix. A reader that opened the old
generation and finds its chunks gone (shorter than asked) gets :class:`FirmwareChanged` and
opens the version again; the new image has another ETag (the sha256 differs), so a client
assembling blocks notices the change (RFC 7959 §2.4).

The version index (for listing) is a set outside the versions' hash tags; it only serves
listings, which skip a name whose metadata is gone.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from stores.keys import (
    DEFAULT_PREFIX,
    firmware_chunk_key,
    firmware_index_key,
    firmware_meta_key,
)
from stores.redis import REDIS_ERRORS, RedisConnection, connect

CHUNK_SIZE = 64 * 1024
"""Bytes per stored chunk: a 1 KiB block reads one 64 KiB string's slice (GETRANGE), and a
16 MiB image is 256 keys."""
UPLOAD_TTL_MS = 600_000
"""An upload's chunks expire unless committed within this time (a dead uploader's leftovers)."""
_WRITE_BATCH = 16
"""Chunks written per pipeline during an upload (1 MiB per round trip)."""
_COMMIT_ATTEMPTS = 5

VERSION_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
"""A version name: 1-64 of ``[A-Za-z0-9._-]``, no leading dot (no ``.`` or ``..`` path
segment, nothing that needs escaping in a URL, a Redis key or a hash tag)."""
_VERSION = re.compile(VERSION_PATTERN)


def valid_version(version: str) -> bool:
    return _VERSION.fullmatch(version) is not None


@dataclass(frozen=True, slots=True)
class Firmware:
    """One stored image's metadata. ``generation`` names the stored copy (new on every
    upload); reads go to that copy."""

    version: str
    size: int
    sha256: str
    created_at: float
    generation: str = ""
    chunk_size: int = CHUNK_SIZE


class FirmwareUnavailable(Exception):
    """The shared store cannot be reached; nothing was changed, the caller may retry."""


class FirmwareChanged(Exception):
    """The copy a reader opened was replaced or deleted meanwhile: open the version again."""


class FirmwareStore(Protocol):
    kind: str

    async def put(self, version: str, data: bytes, *, now: float) -> tuple[Firmware, bool]:
        """Store ``data`` as ``version`` (replacing any image of that name, atomically);
        the metadata and whether an image was replaced."""
        ...

    async def get(self, version: str) -> Firmware | None:
        """The current image's metadata (None: no such version)."""
        ...

    async def read(self, firmware: Firmware, first: int, last: int) -> bytes:
        """Bytes ``first..last`` (inclusive, ``0 <= first <= last < size``) of the copy
        ``firmware`` names; :class:`FirmwareChanged` when that copy is gone."""
        ...

    async def list(self) -> list[Firmware]:
        """Every stored image's metadata, by version name."""
        ...

    async def delete(self, version: str) -> bool:
        """Remove ``version``; False when there was none."""
        ...

    async def close(self) -> None: ...


def _check(firmware: Firmware, first: int, last: int) -> None:
    if not 0 <= first <= last < firmware.size:
        raise ValueError(f"range {first}-{last} outside an image of {firmware.size} bytes")


# --- memory ---------------------------------------------------------------------------------


class MemoryFirmwareStore:
    """One process's memory: an upload replaces the (immutable) bytes object in one step."""

    kind = "memory"

    def __init__(self) -> None:
        self._images: dict[str, tuple[Firmware, bytes]] = {}

    async def put(self, version: str, data: bytes, *, now: float) -> tuple[Firmware, bool]:
        firmware = Firmware(
            version, len(data), hashlib.sha256(data).hexdigest(), now, secrets.token_hex(8)
        )
        replaced = version in self._images
        self._images[version] = (firmware, bytes(data))
        return firmware, replaced

    async def get(self, version: str) -> Firmware | None:
        entry = self._images.get(version)
        return entry[0] if entry is not None else None

    async def read(self, firmware: Firmware, first: int, last: int) -> bytes:
        _check(firmware, first, last)
        entry = self._images.get(firmware.version)
        if entry is None or entry[0].generation != firmware.generation:
            raise FirmwareChanged(firmware.version)
        return entry[1][first : last + 1]

    async def list(self) -> list[Firmware]:
        return [self._images[version][0] for version in sorted(self._images)]

    async def delete(self, version: str) -> bool:
        return self._images.pop(version, None) is not None

    async def close(self) -> None:
        self._images.clear()


# --- Redis ----------------------------------------------------------------------------------

# KEYS: the metadata hash, the new generation's chunks (ARGV[7] of them), then the old
# generation's. ARGV: the generation the caller saw ('' for none), the new generation, size,
# sha256, created_at (ms), chunk size, number of new chunks. Reply: {1, old generation} done;
# {0, current} someone else switched meanwhile (the caller retries with the right old keys);
# {-1, index} a new chunk expired before the switch (nothing changed).
COMMIT_LUA = """
local meta, n = KEYS[1], tonumber(ARGV[7])
local current = redis.call('HGET', meta, 'gen') or ''
if current ~= ARGV[1] then return {0, current} end
for i = 2, n + 1 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1, tostring(i - 2)} end
end
for i = 2, n + 1 do redis.call('PERSIST', KEYS[i]) end
redis.call('HSET', meta, 'gen', ARGV[2], 'size', ARGV[3], 'sha256', ARGV[4],
           'created', ARGV[5], 'chunk', ARGV[6])
for i = n + 2, #KEYS do redis.call('DEL', KEYS[i]) end
return {1, current}
"""

# KEYS: the metadata hash, then the chunks of the generation ARGV[1]. Reply: 1 deleted,
# 0 no such version, -1 another generation is current (the caller retries).
DELETE_LUA = """
local current = redis.call('HGET', KEYS[1], 'gen')
if not current then return 0 end
if current ~= ARGV[1] then return -1 end
redis.call('DEL', unpack(KEYS))
return 1
"""

_FIELDS = ("gen", "size", "sha256", "created", "chunk")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisFirmwareStore:
    """Every replica's images in one Redis (module docstring)."""

    kind = "redis"

    def __init__(self, connection: RedisConnection, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._connection = connection
        self._prefix = prefix
        client: Any = connection.client
        self._client = client
        self._commit = client.register_script(COMMIT_LUA)
        self._delete = client.register_script(DELETE_LUA)

    @property
    def cluster(self) -> bool:
        return self._connection.cluster

    def _chunks(self, version: str, generation: str, count: int) -> list[str]:
        return [firmware_chunk_key(version, generation, i, self._prefix) for i in range(count)]

    async def _meta(self, version: str) -> Firmware | None:
        values = await self._client.hmget(firmware_meta_key(version, self._prefix), _FIELDS)
        if values[0] is None:
            return None
        generation, size, sha256, created, chunk = (_text(v) for v in values)
        return Firmware(version, int(size), sha256, int(created) / 1000, generation, int(chunk))

    def _stored(self, firmware: Firmware) -> list[str]:
        count = -(-firmware.size // firmware.chunk_size)
        return self._chunks(firmware.version, firmware.generation, count)

    async def put(self, version: str, data: bytes, *, now: float) -> tuple[Firmware, bool]:
        generation = secrets.token_hex(8)
        firmware = Firmware(version, len(data), hashlib.sha256(data).hexdigest(), now, generation)
        count = -(-len(data) // CHUNK_SIZE)
        keys = self._chunks(version, generation, count)
        try:
            for start in range(0, count, _WRITE_BATCH):
                async with self._client.pipeline(transaction=False) as pipe:
                    for i in range(start, min(start + _WRITE_BATCH, count)):
                        piece = data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
                        pipe.set(keys[i], piece, px=UPLOAD_TTL_MS)
                    await pipe.execute()
            for _ in range(_COMMIT_ATTEMPTS):
                seen = await self._meta(version)
                old = self._stored(seen) if seen is not None else []
                status, detail = await self._commit(
                    keys=[firmware_meta_key(version, self._prefix), *keys, *old],
                    args=[
                        seen.generation if seen is not None else "",
                        generation,
                        firmware.size,
                        firmware.sha256,
                        round(now * 1000),
                        CHUNK_SIZE,
                        count,
                    ],
                )
                if status == 1:
                    await self._client.sadd(firmware_index_key(self._prefix), version)
                    return firmware, seen is not None
                if status == -1:
                    raise FirmwareUnavailable(
                        f"chunk {_text(detail)} of the upload expired before it was stored"
                    )
            raise FirmwareUnavailable(f"firmware {version} kept changing during the upload")
        except REDIS_ERRORS as exc:
            raise FirmwareUnavailable(f"firmware store unavailable: {exc}") from exc

    async def get(self, version: str) -> Firmware | None:
        try:
            return await self._meta(version)
        except REDIS_ERRORS as exc:
            raise FirmwareUnavailable(f"firmware store unavailable: {exc}") from exc

    async def read(self, firmware: Firmware, first: int, last: int) -> bytes:
        _check(firmware, first, last)
        chunk = firmware.chunk_size
        first_chunk, last_chunk = first // chunk, last // chunk
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for i in range(first_chunk, last_chunk + 1):
                    start = first - i * chunk if i == first_chunk else 0
                    end = last - i * chunk if i == last_chunk else chunk - 1
                    key = firmware_chunk_key(firmware.version, firmware.generation, i, self._prefix)
                    pipe.getrange(key, start, end)
                pieces: list[bytes] = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise FirmwareUnavailable(f"firmware store unavailable: {exc}") from exc
        data = b"".join(pieces)
        if len(data) != last - first + 1:
            # The generation's chunks are gone: replaced or deleted since it was opened.
            raise FirmwareChanged(firmware.version)
        return data

    async def list(self) -> list[Firmware]:
        try:
            names = sorted(
                _text(v) for v in await self._client.smembers(firmware_index_key(self._prefix))
            )
            found = [await self._meta(name) for name in names]
        except REDIS_ERRORS as exc:
            raise FirmwareUnavailable(f"firmware store unavailable: {exc}") from exc
        return [firmware for firmware in found if firmware is not None]

    async def delete(self, version: str) -> bool:
        meta = firmware_meta_key(version, self._prefix)
        try:
            for _ in range(_COMMIT_ATTEMPTS):
                seen = await self._meta(version)
                if seen is None:
                    await self._client.srem(firmware_index_key(self._prefix), version)
                    return False
                keys = self._stored(seen)
                status = await self._delete(keys=[meta, *keys], args=[seen.generation])
                if status == 1:
                    await self._client.srem(firmware_index_key(self._prefix), version)
                    return True
                if status == 0:
                    return False
            raise FirmwareUnavailable(f"firmware {version} kept changing during the delete")
        except REDIS_ERRORS as exc:
            raise FirmwareUnavailable(f"firmware store unavailable: {exc}") from exc

    async def close(self) -> None:
        await self._connection.aclose()


def firmware_store_for(
    url: str | None, *, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0
) -> FirmwareStore:
    """The store a deployment's Redis URL names (None: this process's memory)."""
    if url is None:
        return MemoryFirmwareStore()
    connection = connect(
        url,
        timeout=timeout,
        connect_timeout=min(timeout, 2.0),
        # One immediate retry heals a pooled connection a Redis restart closed (as the
        # command queue does, stores/queue.py).
        retries=1,
    )
    return RedisFirmwareStore(connection, prefix=prefix)
