"""What a Redis URL points at: one server, a Sentinel-managed master, or a Redis Cluster.

Pure (no I/O): :func:`stores.redis.connect` builds the one client of both sides from the
parsed :class:`RedisTarget`, so the proxy and the API accept exactly the same URLs
(``--redis-url``, issue #4):

- ``redis://[user:pass@]host:port[/db]``, ``rediss://...``, ``unix:///path?db=N`` — one server,
  handed to redis-py unchanged;
- ``redis+sentinel://host1:26379,host2:26379/service[/db]`` — the master that the sentinels
  name ``service`` (a host without a port means 26379; IPv6 hosts in brackets);
- any of the first form with ``cluster=1`` (or ``true``/``yes``/``on``) in the query — a Redis
  Cluster reached through that seed node. The ``cluster`` parameter is removed from
  :attr:`RedisTarget.url`; the other parameters stay. A cluster has only database 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

Kind = Literal["single", "sentinel", "cluster"]


@dataclass(frozen=True)
class RedisTarget:
    kind: Kind
    url: str = ""
    """The URL for redis-py (single, cluster); empty for sentinel."""
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0


def parse_redis_url(url: str) -> RedisTarget:
    """Classify ``url``; ``ValueError`` says what is wrong with a malformed one."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"not a Redis URL (no scheme): {url!r}")
    if scheme.lower() == SENTINEL_SCHEME:
        return _sentinel(url[len(scheme) + len(sep) :])
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value.lower() for name, value in query if name == "cluster"]
    if not flags:
        return RedisTarget("single", url=url)  # untouched: redis-py parses the rest
    if any(flag not in _TRUE | _FALSE for flag in flags):
        raise ValueError(f"cluster= takes 1/true/yes/on or 0/false/no/off: {url!r}")
    rest = urlencode([(name, value) for name, value in query if name != "cluster"])
    base = urlunsplit(parts._replace(query=rest))
    if flags[-1] in _FALSE:
        return RedisTarget("single", url=base)
    db = _db(parts.path.strip("/"), url)
    if db != 0:
        raise ValueError(f"Redis Cluster has only database 0: {url!r}")
    return RedisTarget("cluster", url=base)


def _sentinel(rest: str) -> RedisTarget:
    """``host1:26379,host2:26379/service[/db]`` (what follows ``redis+sentinel://``)."""
    whole = f"{SENTINEL_SCHEME}://{rest}"
    if "?" in rest or "#" in rest or "@" in rest:
        raise ValueError(f"redis+sentinel:// URLs take no credentials or parameters: {whole!r}")
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not service:
        raise ValueError(f"redis+sentinel:// URL needs a service name (…/mymaster): {whole!r}")
    nodes = tuple(_node(node, whole) for node in hosts.split(","))
    return RedisTarget("sentinel", sentinels=nodes, service=service, db=_db(db.strip("/"), whole))


def _node(node: str, url: str) -> tuple[str, int]:
    if node.startswith("["):  # [v6]:port or [v6]
        host, _, tail = node[1:].partition("]")
        port = tail.removeprefix(":")
    elif node.count(":") == 1:
        host, _, port = node.partition(":")
    else:
        host, port = node, ""
    if not host:
        raise ValueError(f"a sentinel without a host in {url!r}")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad sentinel port {port!r} in {url!r}")
    return host, int(port)


def _db(text: str, url: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"the database must be a number, not {text!r}: {url!r}")
    return int(text)
