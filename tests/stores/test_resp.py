"""Our own Redis link (stores/resp.py): the RESP codec row by row, and the link against a real
redis-server (pipelining, AUTH and SELECT, a unix socket, a lost or silent server)."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stores.resp import (
    Address,
    LinkDown,
    ProtocolViolation,
    RespError,
    RespLink,
    address_of,
    encode_command,
    parse_reply,
)
from tests.support.services import RedisServer


@pytest.mark.parametrize(
    ("args", "wire"),
    [
        ((b"PING",), b"*1\r\n$4\r\nPING\r\n"),
        (("GET", "k"), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        ((b"SET", b"k", b"", 5), b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n$1\r\n5\r\n"),
        (("é", b"\r\n\x00"), b"*2\r\n$2\r\n\xc3\xa9\r\n$3\r\n\r\n\x00\r\n"),
        ((b"EVALSHA", b"ab", -1), b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$2\r\n-1\r\n"),
    ],
)  # fmt: skip
def test_commands_are_arrays_of_bulk_strings(args: tuple[bytes | str | int], wire: bytes) -> None:
    assert encode_command(*args) == wire


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"+OK\r\n", b"OK"),
        (b":42\r\n", 42),
        (b":-3\r\n", -3),
        (b"$5\r\nhello\r\n", b"hello"),
        (b"$0\r\n\r\n", b""),
        (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string may hold CR LF
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n$-1\r\n$1\r\nc\r\n:1\r\n", [None, b"c", 1]),
        (b"*2\r\n*1\r\n:1\r\n*0\r\n", [[1], []]),
    ],
)
def test_replies_of_each_type(wire: bytes, reply: object) -> None:
    assert parse_reply(wire) == (reply, len(wire))
    # Every cut short of the end is "not yet", never a wrong reply.
    for cut in range(len(wire)):
        assert parse_reply(wire[:cut]) is None, cut


def test_error_replies_are_values_and_replies_follow_each_other() -> None:
    wire = b"-NOSCRIPT No matching script\r\n*2\r\n-ERR inner\r\n:7\r\n+OK\r\n"
    first, at = parse_reply(wire)  # type: ignore[misc]
    assert isinstance(first, RespError)
    assert str(first) == "NOSCRIPT No matching script"
    second, at = parse_reply(wire, at)  # type: ignore[misc]
    assert isinstance(second, list)
    assert isinstance(second[0], RespError)
    assert second[1] == 7
    assert parse_reply(wire, at) == (b"OK", len(wire))


def test_an_unknown_reply_type_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        parse_reply(b"%1\r\n")


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6390/0", Address("127.0.0.1", 6390)),
        ("redis://db.example", Address("db.example", 6379)),
        ("redis://u:p%40ss@h:7/3", Address("h", 7, username="u", password="p@ss", db=3)),
        ("redis://:secret@h:7", Address("h", 7, password="secret")),
        ("unix:///run/redis.sock?db=2", Address(path="/run/redis.sock", db=2)),
        ("rediss://h:7", None),  # TLS: left to redis-py
    ],
)
def test_address_of_url(url: str, address: Address | None) -> None:
    assert address_of(url) == address


def _address(server: RedisServer, **extra: object) -> Address:
    return Address(server.host, server.port, **extra)  # type: ignore[arg-type]


async def test_pipelined_commands_are_answered_in_order(redis_server: RedisServer) -> None:
    link = await RespLink.open(_address(redis_server))
    try:
        sets = [link.call(b"SET", f"k{n}", n) for n in range(200)]
        gets = [link.call(b"GET", f"k{n}") for n in range(200)]
        assert await asyncio.gather(*sets) == [b"OK"] * 200
        assert await asyncio.gather(*gets) == [str(n).encode() for n in range(200)]
        big = b"x" * 300_000  # arrives in many reads
        assert await link.call(b"SET", b"big", big) == b"OK"
        assert await link.call(b"GET", b"big") == big
        error = await link.call(b"INCR", b"big")
        assert isinstance(error, RespError)
        assert await link.call(b"PING") == b"PONG"  # an error reply leaves the link usable
    finally:
        link.close()


@pytest.fixture
def acl_user(redis_server: RedisServer) -> Iterator[tuple[str, str]]:
    assert redis_server.execute("ACL", "SETUSER", "linkuser", "on", ">s3cret", "~*", "+@all")[
        :3
    ] == (b"+OK")
    yield "linkuser", "s3cret"
    redis_server.execute("ACL", "DELUSER", "linkuser")


async def test_the_link_authenticates_and_selects_the_urls_database(
    redis_server: RedisServer, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    address = address_of(f"redis://{user}:{password}@{redis_server.host}:{redis_server.port}/5")
    assert address is not None
    link = await RespLink.open(address)
    try:
        assert await link.call(b"SET", b"in-five", b"1") == b"OK"
        assert await link.call(b"ACL", b"WHOAMI") == user.encode()
    finally:
        link.close()
    assert _in_db(redis_server, 5, "in-five")
    assert not _in_db(redis_server, 0, "in-five")


async def test_a_refused_password_is_link_down(
    redis_server: RedisServer, acl_user: tuple[str, str]
) -> None:
    user, _ = acl_user
    with pytest.raises(LinkDown, match="refused"):
        await RespLink.open(_address(redis_server, username=user, password="wrong"))


async def test_nobody_listening_is_link_down() -> None:
    from tests.support.services import free_port

    with pytest.raises(LinkDown):
        await RespLink.open(Address("127.0.0.1", free_port()))


async def test_a_lost_connection_fails_what_waits_and_closes_the_link(
    redis_server: RedisServer,
) -> None:
    link = await RespLink.open(_address(redis_server))
    blocked = link.call(b"BLPOP", b"never-filled", 5)  # waits in Redis
    await asyncio.sleep(0.05)
    redis_server.execute("CLIENT", "KILL", "TYPE", "normal")
    with pytest.raises(LinkDown, match="lost"):
        await asyncio.wait_for(blocked, 2)
    assert link.closed
    with pytest.raises(LinkDown):
        await link.call(b"PING")


async def test_a_silent_server_is_link_down_within_the_wait_limit() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        link = await RespLink.open(Address(*listener.getsockname()), wait_limit=0.2)
        with pytest.raises(LinkDown, match="no reply"):
            # The link's own limit (0.2 s) must fire well before this one.
            await asyncio.wait_for(link.call(b"PING"), 3)
        assert link.closed
    finally:
        listener.close()


async def test_a_setup_that_gets_no_answer_is_link_down_and_leaves_no_connection() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        address = Address(*listener.getsockname(), password="secret")
        with pytest.raises(LinkDown, match="no connection within"):
            await RespLink.open(address, wait_limit=0.2)
        accepted, _ = listener.accept()
        with accepted:
            accepted.setblocking(False)
            loop = asyncio.get_running_loop()
            asked = await asyncio.wait_for(loop.sock_recv(accepted, 100), 2)
            assert asked.startswith(b"*2\r\n$4\r\nAUTH")  # it asked, then gave up
            closed = await asyncio.wait_for(loop.sock_recv(accepted, 100), 2)
            assert closed == b""  # and closed the connection
    finally:
        listener.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"+OK\r\n",  # a reply before any command
        b"%1\r\n",  # RESP3 map: not something this link asked for
        b":12x\r\n",  # not a number
    ],
)
async def test_bytes_that_answer_nothing_close_the_link(sent: bytes) -> None:
    # A scripted server: real Redis never sends these.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sent)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        link = await RespLink.open(Address(*server.sockets[0].getsockname()[:2]))
        pending = link.call(b"PING") if sent != b"+OK\r\n" else None
        await asyncio.sleep(0.1)
        assert link.closed
        if pending is not None:
            with pytest.raises(LinkDown, match="unreadable"):
                await pending
    finally:
        server.close()
        await server.wait_closed()


class _UnixRedis(RedisServer):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.socket_path = str(workdir / "redis.sock")

    def command(self) -> list[str]:
        return [*super().command(), "--unixsocket", self.socket_path, "--unixsocketperm", "700"]


async def test_a_unix_socket_url_reaches_the_server() -> None:
    # A short directory: a unix socket path is limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="resp") as workdir, _UnixRedis(Path(workdir)) as server:
        address = address_of(f"unix://{server.socket_path}?db=1")
        assert address is not None
        link = await RespLink.open(address)
        try:
            assert await link.call(b"SET", b"over-unix", b"1") == b"OK"
        finally:
            link.close()
        assert _in_db(server, 1, "over-unix")
        assert not _in_db(server, 0, "over-unix")


def _in_db(server: RedisServer, db: int, key: str) -> bool:
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        sock.sendall(encode_command(b"SELECT", db) + encode_command(b"EXISTS", key))
        reply = b""
        while reply.count(b"\r\n") < 2:
            reply += sock.recv(1024)
    assert reply.startswith(b"+OK\r\n:"), reply
    return reply.endswith(b":1\r\n")
