"""The payload template store (stores/templates.py): one contract for memory, a real
redis-server and a real 3-node Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from stores.keys import templates_key
from stores.templates import (
    MemoryTemplates,
    RedisTemplates,
    StoredTemplate,
    TemplateExists,
    TemplateStore,
    TemplatesUnavailable,
    templates_for,
)
from tests.support.services import RedisServer

PREFIX = "t"
TEXT = '{"sense":[{"asset":"é","value":{"byte":0,"bytelength":1,"type":"uint"}}]}'
ONE = StoredTemplate("b-1", TEXT, "tracker", 1_700_000_000.5)
TWO = StoredTemplate("a-2", "{}", None, 1_700_000_001.0)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TemplateStore]:
    if request.param == "memory":
        built = templates_for(None, PREFIX)
        assert isinstance(built, MemoryTemplates)
    else:
        fixture = "redis_server" if request.param == "redis" else f"redis_{request.param}"
        built = templates_for(request.getfixturevalue(fixture).url, PREFIX)
        assert isinstance(built, RedisTemplates)
    yield built
    await built.close()


async def test_create_get_list_delete(store: TemplateStore) -> None:
    assert await store.get(ONE.id) is None
    assert await store.list() == []
    await store.create(ONE)
    await store.create(TWO)
    assert await store.get(ONE.id) == ONE  # text, name and time come back exactly
    assert await store.get(TWO.id) == TWO
    assert await store.list() == [TWO, ONE]  # by id
    assert await store.delete(ONE.id) is True
    assert await store.delete(ONE.id) is False
    assert await store.get(ONE.id) is None
    assert await store.list() == [TWO]


async def test_an_id_is_never_overwritten(store: TemplateStore) -> None:
    await store.create(ONE)
    with pytest.raises(TemplateExists):
        await store.create(StoredTemplate(ONE.id, "{}", "other", 1.0))
    assert await store.get(ONE.id) == ONE


async def test_one_hash_under_its_hash_tag(redis_server: RedisServer) -> None:
    store = templates_for(redis_server.url, PREFIX)
    try:
        await store.create(ONE)
        assert isinstance(store, RedisTemplates)
        raw = await store._client.hkeys(templates_key(PREFIX))
        assert raw == [ONE.id.encode()]
        assert templates_key(PREFIX) == "t:{tpl}"
    finally:
        await store.close()


async def test_redis_down_is_unavailable(redis_server: RedisServer) -> None:
    store = templates_for(redis_server.url, PREFIX, timeout=0.5)
    try:
        redis_server.stop()
        with pytest.raises(TemplatesUnavailable):
            await store.get(ONE.id)
        with pytest.raises(TemplatesUnavailable):
            await store.create(ONE)
        with pytest.raises(TemplatesUnavailable):
            await store.list()
        with pytest.raises(TemplatesUnavailable):
            await store.delete(ONE.id)
    finally:
        redis_server.start()
        await store.close()
