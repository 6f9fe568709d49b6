"""Fixtures shared by every test suite: real Redis and Mosquitto processes.

``redis_server`` (function scope; one process per session) -> ``RedisServer``
    ``.url``, ``.port``, ``.stop()``, ``.start()``; flushed and running when a test starts.
``mosquitto`` (function scope; one process per session) -> ``MosquittoServer``
    ``.url``, ``.port``, ``.stop()``, ``.start()`` (same port), ``.pause()``, ``.resume()``;
    running when a test starts, resumed/restarted afterwards if the test left it down.

Both classes live in ``tests.support.services``.

``redis_sentinel``, ``redis_cluster`` and ``redis_topology`` (a throwaway Sentinel in front of
``redis_server``, a throwaway 3-node Redis Cluster, and each of the two in turn) come from the
plugin ``tests.support.redis_topologies``, registered below.

To watch a topic see ``tests.support.mqtt`` (``subscribed``, ``collect``).

``browser`` (a headless Chromium, selenium) comes from the plugin ``tests.support.browser``;
``screenshot(driver, name)`` there saves build/test-artifacts/<name>.png.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.services import MosquittoServer, RedisServer

pytest_plugins = ["tests.support.redis_topologies", "tests.support.browser"]


@pytest.fixture(scope="session")
def _redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def _mosquitto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    with MosquittoServer(tmp_path_factory.mktemp("mosquitto")) as server:
        yield server


@pytest.fixture
def redis_server(_redis_process: RedisServer) -> Iterator[RedisServer]:
    _redis_process.start()
    _redis_process.flushall()
    yield _redis_process
    _redis_process.start()


@pytest.fixture
def mosquitto(_mosquitto_process: MosquittoServer) -> Iterator[MosquittoServer]:
    _mosquitto_process.start()
    yield _mosquitto_process
    _mosquitto_process.resume()
    _mosquitto_process.start()


@pytest.fixture(autouse=True)
async def _let_closed_transports_release_their_sockets() -> AsyncIterator[None]:
    # An asyncio datagram transport closes its socket in a callback on the next loop turn; a
    # test that closes one as its last step would otherwise leave the socket to the garbage
    # collector (ResourceWarning, an error under filterwarnings = error).
    yield
    await asyncio.sleep(0)
