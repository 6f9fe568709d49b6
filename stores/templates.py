"""Payload templates (issue 17; docs/API.md, "Payload templates"): this process's memory, or
Redis shared by every replica.

A record is the template's JSON text as uploaded, an optional name and when it was created,
under an id the API chose. Records never change: a changed template is uploaded as a new id, so
a replica may keep what it compiled from a record for as long as it likes (api/routes/
templates.py keeps a bounded cache) and no replica ever needs to hear of a change. Only a
delete removes one, and the API refuses it while a device uses the template.

Redis layout (stores/keys.py ``templates_key``): one hash, id → the record as JSON. One key
under the ``{tpl}`` hash tag, so every call is one command on one Cluster slot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from stores.keys import DEFAULT_PREFIX, templates_key
from stores.redis import REDIS_ERRORS, RedisConnection, connect


@dataclass(frozen=True)
class StoredTemplate:
    id: str
    text: str
    """The template's JSON text, as the API accepted it."""
    name: str | None
    created_at: float
    """Unix seconds."""


class TemplateExists(Exception):
    """The id is taken (the API draws another)."""


class TemplatesUnavailable(Exception):
    """Redis could not be reached; the caller may retry."""


class TemplateStore(Protocol):
    async def create(self, record: StoredTemplate) -> None:
        """Raises TemplateExists when the id is taken."""
        ...

    async def get(self, template_id: str) -> StoredTemplate | None: ...

    async def list(self) -> list[StoredTemplate]:
        """Every template, by id."""
        ...

    async def delete(self, template_id: str) -> bool:
        """False when there was no such template."""
        ...

    async def close(self) -> None: ...


def _encode(record: StoredTemplate) -> str:
    fields = asdict(record)
    del fields["id"]  # the hash field names it
    return json.dumps(fields, separators=(",", ":"))


def _decode(template_id: str, raw: str | bytes) -> StoredTemplate:
    fields: dict[str, Any] = json.loads(raw)
    return StoredTemplate(
        id=template_id,
        text=str(fields["text"]),
        name=fields.get("name"),
        created_at=float(fields["created_at"]),
    )


class MemoryTemplates:
    """One process (``coap-bridge up`` without Redis); no method awaits, so each is atomic."""

    def __init__(self) -> None:
        self._records: dict[str, StoredTemplate] = {}

    async def create(self, record: StoredTemplate) -> None:
        if record.id in self._records:
            raise TemplateExists(record.id)
        self._records[record.id] = record

    async def get(self, template_id: str) -> StoredTemplate | None:
        return self._records.get(template_id)

    async def list(self) -> list[StoredTemplate]:
        return [self._records[key] for key in sorted(self._records)]

    async def delete(self, template_id: str) -> bool:
        return self._records.pop(template_id, None) is not None

    async def close(self) -> None:
        return None


class RedisTemplates:
    """Shared by every API replica: one server, Sentinel or Cluster. Redis failures become
    :class:`TemplatesUnavailable`."""

    def __init__(self, connection: RedisConnection, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._connection = connection
        self._client: Any = connection.client
        self._key = templates_key(prefix)

    async def _call(self, command: Any) -> Any:
        try:
            return await command
        except REDIS_ERRORS as exc:
            raise TemplatesUnavailable(f"template store unavailable: {exc}") from exc

    async def create(self, record: StoredTemplate) -> None:
        # HSETNX: two replicas drawing the same id cannot overwrite each other's template.
        created = await self._call(self._client.hsetnx(self._key, record.id, _encode(record)))
        if not created:
            raise TemplateExists(record.id)

    async def get(self, template_id: str) -> StoredTemplate | None:
        raw = await self._call(self._client.hget(self._key, template_id))
        return None if raw is None else _decode(template_id, raw)

    async def list(self) -> list[StoredTemplate]:
        raw: dict[Any, Any] = await self._call(self._client.hgetall(self._key))
        records = [
            _decode(key.decode() if isinstance(key, bytes) else str(key), value)
            for key, value in raw.items()
        ]
        return sorted(records, key=lambda record: record.id)

    async def delete(self, template_id: str) -> bool:
        removed = await self._call(self._client.hdel(self._key, template_id))
        return bool(removed)

    async def close(self) -> None:
        await self._connection.aclose()


def templates_for(
    redis_url: str | None, prefix: str = DEFAULT_PREFIX, *, timeout: float = 2.0
) -> TemplateStore:
    """The template store a deployment's Redis URL names (None: this process's memory)."""
    if redis_url is None:
        return MemoryTemplates()
    return RedisTemplates(connect(redis_url, timeout=timeout, retries=1), prefix=prefix)
