"""The RESP link (fastws.broker.resp) on its own, against a real redis-server: command
encoding, broker URLs, the pipelined command connection, and the pub/sub connection's
one delivery per publication."""

from __future__ import annotations

import asyncio

import pytest

from fastws.broker import resp
from fastws.broker.base import BrokerUnavailable
from fastws.broker.resp import (
    CommandConnection,
    PubSubConnection,
    RedisTarget,
    encode_command,
)

pytestmark = pytest.mark.timeout(60)


def test_encode_command():
    assert encode_command("SET", b"k\r\n", 15) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n15\r\n"


def test_encode_command_matches_the_python_encoder():
    """hiredis' pack_command (used when present) writes what the Python encoder does,
    for every kind of argument the broker sends."""
    args = ("EVALSHA", "a" * 40, 3, "fws:{ns:é}:ch:m", b"", b"\x00fwm\x00{}\n", -5,
            2**40, "", "ünï ✓", b"\r\n$3\r\n", 0)
    assert encode_command(*args) == resp._encode_command_py(*args)


def test_targets_of_broker_urls():
    t = RedisTarget("redis://user:p%40ss@example:6390/3")
    assert (t.host, t.port, t.db, t.auth_args(), t.sentinel) == (
        "example", 6390, 3, ("user", "p@ss"), None)
    assert RedisTarget("redis://h").auth_args() is None
    t = RedisTarget("redis+sentinel://:pw@s1,s2:26380/main/2")
    assert t.sentinel == ([("s1", 26379), ("s2", 26380)], "main")
    assert (t.db, t.auth_args()) == (2, ("pw",))
    t = RedisTarget("redis+cluster://a:7000,[::1]:7001")
    assert t.hosts == [("a", 7000), ("::1", 7001)] and t.sentinel is None


async def test_command_connection_answers_in_call_order(redis_server):
    lost = asyncio.Event()
    cmd = CommandConnection("test", lost.set)
    await cmd.connect("127.0.0.1", redis_server.port, RedisTarget(redis_server.url),
                      {"echo": "return ARGV[1]"})
    futs = [cmd.call("SET", "k", i) for i in range(100)] + [cmd.call("GET", "k")]
    assert (await asyncio.gather(*futs))[-1] == b"99"
    assert await cmd.call("EVALSHA", cmd.shas["echo"], 0, "hi") == b"hi"
    pending = cmd.call("BLPOP", "never", 0)
    cmd.drop()
    with pytest.raises(BrokerUnavailable):
        await pending
    with pytest.raises(BrokerUnavailable):
        cmd.call("PING")
    assert not lost.is_set()  # dropped on purpose: not reported as lost


async def test_pubsub_connection_delivers_each_publication_once(redis_server):
    got: list[tuple[bytes, bytes]] = []
    target = RedisTarget(redis_server.url)
    pubsub = PubSubConnection("test", lambda ch, payload: got.append((ch, payload)),
                              lambda: None)
    cmd = CommandConnection("test-pub", lambda: None)
    await asyncio.gather(pubsub.connect("127.0.0.1", redis_server.port, target),
                         cmd.connect("127.0.0.1", redis_server.port, target, {}))
    await asyncio.gather(pubsub.subscribe("a:1"), pubsub.subscribe("a:*"))
    assert pubsub.holds("a:1") and not pubsub.holds("b:1")
    # both subscriptions match: Redis sends each publication twice, it is delivered once;
    # two identical payloads are two publications
    assert await asyncio.gather(cmd.call("PUBLISH", "a:1", "x"),
                                cmd.call("PUBLISH", "a:1", "x"),
                                cmd.call("PUBLISH", "a:2", "y")) == [2, 2, 1]
    await pubsub.barrier()
    assert got == [(b"a:1", b"x"), (b"a:1", b"x"), (b"a:2", b"y")]
    assert pubsub.current_lag() >= 0
    pubsub.drop()
    cmd.drop()
