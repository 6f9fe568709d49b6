"""stores.redis_url: which Redis deployment a URL names (pure; the clients are tested on real
servers in tests/proxy/test_redis_topologies.py and tests/api/test_store_topologies.py)."""

from __future__ import annotations

import pytest

from stores.redis_url import RedisTarget, parse_redis_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://user:p%40ss@redis.example:6380/3?socket_keepalive=true",
        "rediss://redis.example:6380",
        "unix:///run/redis.sock?db=2",
        "redis://localhost",
    ],
)
def test_plain_urls_pass_through_unchanged(url: str) -> None:
    assert parse_redis_url(url) == RedisTarget("single", url=url)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://10.0.0.1:7000?cluster=1", "redis://10.0.0.1:7000"),
        ("redis://10.0.0.1:7000/0?cluster=true", "redis://10.0.0.1:7000/0"),
        ("rediss://u:p@seed:7000/?cluster=YES&ssl_cert_reqs=none", "rediss://u:p@seed:7000/?ssl_cert_reqs=none"),
        ("redis://seed:7000?ssl=0&cluster=on", "redis://seed:7000?ssl=0"),
    ],
)  # fmt: skip
def test_cluster_flag_is_taken_out_of_the_url(url: str, base: str) -> None:
    assert parse_redis_url(url) == RedisTarget("cluster", url=base)


def test_cluster_off_is_a_single_server() -> None:
    assert parse_redis_url("redis://h:1/2?cluster=0") == RedisTarget("single", url="redis://h:1/2")


def test_sentinel_hosts_service_and_db() -> None:
    assert parse_redis_url("redis+sentinel://h1:26379,h2:26380/mymaster/2") == RedisTarget(
        "sentinel", sentinels=(("h1", 26379), ("h2", 26380)), service="mymaster", db=2
    )
    assert parse_redis_url("redis+sentinel://h1/mymaster") == RedisTarget(
        "sentinel", sentinels=(("h1", 26379),), service="mymaster"
    )
    assert parse_redis_url("REDIS+SENTINEL://[::1]:5000,[fd00::2],::3/s/") == RedisTarget(
        "sentinel", sentinels=(("::1", 5000), ("fd00::2", 26379), ("::3", 26379)), service="s"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379",  # no service
        "redis+sentinel://h1:26379/",
        "redis+sentinel://h1:port/mymaster",
        "redis+sentinel://h1:70000/mymaster",
        "redis+sentinel://h1,:26379/mymaster",
        "redis+sentinel://h1/mymaster/db1",
        "redis+sentinel://h1/mymaster?password=x",
        "redis+sentinel://user:pw@h1/mymaster",
        "redis://h:1/1?cluster=1",  # a cluster has database 0 only
        "redis://h:1?cluster=maybe",
        "localhost:6379",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the message names the URL; any is fine)
        parse_redis_url(url)
