"""redis-py clients for both sides' stores, from any URL :mod:`stores.redis_url` accepts: one
server (``redis://``, ``rediss://`` with TLS, ``unix://``), a Sentinel-managed master
(``redis+sentinel://…``) or a Redis Cluster (``…?cluster=1``).

- :func:`connect` → :class:`RedisConnection`: the client (a ``Redis`` or a ``RedisCluster``) and
  whatever else the URL made us open (a Sentinel's own clients), closed together.
- :class:`SlotClient`: a plain ``Redis`` client on the server that holds one hash slot — for the
  API's device store, whose WATCH/MULTI/EXEC transactions and PUBLISH inside MULTI need a real
  connection to that server. With one server or Sentinel it is just that server's client. On a
  Cluster it is a client of the master that owns the slot, found through a ``RedisCluster``
  client and looked up again after a ``MOVED`` reply or a lost connection (a failover or a
  resharding). redis-py's own cluster transactions are not usable for this (checked with
  redis-py 8.1): its ``ClusterPipeline(transaction=True)`` refuses PUBLISH, drops a WATCHed
  EXISTS (split across slots, never awaited) and runs each WATCHed command in a new event loop
  on a thread of its own (~7 ms a transaction).

TLS (``rediss://``): redis-py's, certificate and host name verified against the system's trust
store; a CA bundle of one's own and a client certificate go in the URL's query, as redis-py
reads them: ``rediss://host:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=…&ssl_keyfile=…``.
Those files are checked when the client is made (:func:`check_tls_files`), so a wrong path is
an error naming the parameter at start-up rather than every command failing later.

Script calls to one server without TLS take :mod:`stores.resp` instead (docs/ARCHITECTURE.md,
"Own wire clients on the hot path"); everything else goes through these clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from stores.redis_url import RedisTarget, parse_redis_url

# What a lost or unreachable Redis raises. A Cluster client that cannot reach any node raises
# RedisClusterException, which is not a RedisError.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


@dataclass
class RedisConnection:
    """A client built from a URL, and the clients of the sentinels that found its master."""

    client: Redis | RedisCluster
    sentinels: list[Redis] = field(default_factory=list)

    @property
    def cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            # Closing the master's client leaves the connections to the sentinels open.
            for sentinel in self.sentinels:
                await sentinel.aclose()


def _options(
    timeout: float,
    connect_timeout: float | None,
    retries: int | None,
    decode_responses: bool,
    health_check_interval: float | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout if connect_timeout is None else connect_timeout,
        "decode_responses": decode_responses,
    }
    if health_check_interval is not None:  # None: redis-py's default (no checks)
        options["health_check_interval"] = health_check_interval
    if retries is not None:  # None: redis-py's default schedule
        options["retry"] = Retry(NoBackoff(), retries)
    return options


_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def check_tls_files(url: str) -> None:
    """ValueError naming the query parameter when a TLS file of a ``rediss://`` URL cannot be
    read (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return
    for name, path in parse_qsl(parts.query):
        if name in _TLS_FILES:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(
                    f"redis_url: {name}={path!r} cannot be read: {exc.strerror or exc}"
                ) from None


def connect(
    url: str | RedisTarget,
    *,
    timeout: float,
    connect_timeout: float | None = None,
    retries: int | None = 0,
    decode_responses: bool = False,
    health_check_interval: float | None = None,
) -> RedisConnection:
    """A client for ``url``; nothing connects until the first command.

    ``timeout``: for each command (and for connecting, unless ``connect_timeout`` says
    otherwise). ``retries``: immediate retries of a failed command; the default, none, suits
    callers that answer a failure at once (local dedup, a 503) rather than hold a device
    through a retry schedule; None keeps redis-py's default schedule. A Cluster client always
    keeps its own schedule: it is how it follows MOVED redirections and a failover to a new
    master. ``health_check_interval``: seconds after which an idle connection is checked
    with a PING before use (a long-lived pub/sub reader wants it)."""
    target = parse_redis_url(url) if isinstance(url, str) else url
    check_tls_files(target.url)
    options = _options(timeout, connect_timeout, retries, decode_responses, health_check_interval)
    if target.kind == "cluster":
        options.pop("retry", None)
        return RedisConnection(
            RedisCluster.from_url(target.url, max_connections=MAX_CONNECTIONS, **options)
        )
    if target.kind == "sentinel":
        # The sentinels' own clients get the same timeouts and retries (redis-py's default
        # gives them only the timeouts, and its retry schedule: seconds when they are down).
        sentinel_kwargs = {
            k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"
        }
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **options
        )
        master: Redis = sentinel.master_for(
            target.service, db=target.db, max_connections=MAX_CONNECTIONS, **options
        )
        return RedisConnection(master, list(sentinel.sentinels))
    return RedisConnection(Redis.from_pool(_waiting_pool(target.url, timeout, options)))


# Connections one client may open to one server. redis-py's asyncio pool refuses the call
# beyond its limit (100 by default) with "Too many connections" — a 503 for a device under load
# (Benchmark O: the proxy's parallel fetches plus management calls). A waiting pool queues the
# call for a free connection instead, for at most the command timeout.
MAX_CONNECTIONS = 256


def _waiting_pool(url: str, timeout: float, options: dict[str, Any]) -> BlockingConnectionPool:
    return BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
    )


class SlotClient:
    """A plain client of the server holding the slot of ``key`` (see the module docstring)."""

    def __init__(
        self,
        url: str | RedisTarget,
        key: str,
        *,
        timeout: float,
        connect_timeout: float | None = None,
        retries: int = 0,
        decode_responses: bool = False,
    ) -> None:
        self._target = parse_redis_url(url) if isinstance(url, str) else url
        self._key = key
        self._options = _options(timeout, connect_timeout, retries, decode_responses, None)
        self._connection: RedisConnection | None = None  # one server / Sentinel: the client
        self._cluster: RedisCluster | None = None  # Cluster: finds the slot's master …
        self._node: Redis | None = None  # … and this is the client of that master
        self._lock = asyncio.Lock()
        # On a Cluster, connect() leaves ``retries`` out (the cluster client keeps its own
        # schedule); the slot master's client built later gets them, from self._options.
        connection = connect(
            self._target,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            decode_responses=decode_responses,
        )
        if isinstance(connection.client, RedisCluster):
            self._cluster = connection.client
        else:
            self._connection = connection

    @property
    def cluster(self) -> bool:
        return self._cluster is not None

    async def client(self) -> Redis:
        """The client to send the next command to (on a Cluster: asks it on first use)."""
        if self._connection is not None:
            client = self._connection.client
            assert isinstance(client, Redis)
            return client
        if self._node is None:
            async with self._lock:
                if self._node is None:
                    self._node = await self._node_client()
        return self._node

    async def _node_client(self) -> Redis:
        assert self._cluster is not None
        await self._cluster.initialize()
        node = self._cluster.get_node_from_key(self._key)
        if node is None:  # only for replica=True; kept for the type checker
            raise RedisError(f"no Redis Cluster node holds the slot of {self._key}")
        # The URL's credentials, TLS and other options, with the master's address.
        options: dict[str, Any] = {**parse_url(self._target.url), **self._options}
        options.update(host=node.host, port=node.port, db=0)
        wait = options.get("socket_timeout") or 5.0
        return Redis.from_pool(
            BlockingConnectionPool(max_connections=MAX_CONNECTIONS, timeout=wait, **options)
        )

    async def relocate(self, stale: Redis) -> None:
        """``stale`` was told MOVED or lost its connection: on a Cluster, forget it and refresh
        the slot map so the next :meth:`client` goes to the slot's current master."""
        if self._cluster is None:
            return
        async with self._lock:
            if self._node is not stale:
                return  # another task already moved on
            self._node = None
            with contextlib.suppress(*REDIS_ERRORS):
                await stale.aclose()
            # The next initialize() asks the cluster for its slots again.
            with contextlib.suppress(*REDIS_ERRORS):
                await self._cluster.nodes_manager.initialize()

    async def aclose(self) -> None:
        try:
            if self._connection is not None:
                await self._connection.aclose()
            if self._node is not None:
                node, self._node = self._node, None
                await node.aclose()
        finally:
            if self._cluster is not None:
                await self._cluster.aclose()
