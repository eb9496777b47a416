"""The indexer's broker publications follow the namespace rules a node applies
(``fastws.broker.publication_for``): in a ``stream = true`` namespace every event is
appended to ``fastws:stream:<namespace>`` once per idempotency key (a retry of the same
batch adds nothing), and every event goes into the namespace log, so a pattern
subscriber's ``last`` and ``since`` recover indexer events.  Real redis-server, a real
fastws server sharing it, and a real eth-tester chain for the ``fastws index`` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from test_indexer import events, start_indexer, stop, subscribe, until
from wsclient import connect

from fastws.broker import StreamAppend, publication_for
from fastws.config import load_config
from fastws.indexer import parse_args
from fastws.indexer.publish import BrokerPublisher

pytestmark = pytest.mark.timeout(120)

WEI = 10**18
STREAM_TOML = """
[namespaces.market]
stream = true
[namespaces.events]
stream = true
"""


def entries(r: redis.Redis, key: str) -> list[dict[str, str]]:
    """The fields of every entry of the stream ``key``, oldest first."""
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _id, fields in r.xrange(key)]


def write_config(tmp_path: Path) -> str:
    path = tmp_path / "fastws.toml"
    path.write_text(STREAM_TOML)
    return str(path)


def test_publication_for_is_the_nodes_rule(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text(STREAM_TOML + "[namespaces.quiet]\nhistory_size = 0\n")
    config = load_config({"config": str(tmp_path / "f.toml"), "broker": "redis://h:1"})
    pub = publication_for(config.for_channel("market:0xa"), "market:0xa", b"1", "k")
    assert (pub.history_size, pub.idempotency_key, pub.log) == (100, "k", ("market", 10_000))
    assert pub.stream == StreamAppend("fastws:stream:market", 1_000_000, "", "")
    quiet = publication_for(config.for_channel("quiet:x"), "quiet:x", b"1")
    assert (quiet.history_size, quiet.log, quiet.stream) == (0, None, None)
    owner = publication_for(config.for_channel("user:bob"), "user:bob", b"1")
    assert owner.log is None                      # private: exact subscribers only
    eph = publication_for(config.for_channel("market:0xa"), "market:0xa", b"1",
                          ephemeral=True)
    assert (eph.history_size, eph.log, eph.stream, eph.meta) == (0, None, None, b'{"e":1}')


def test_the_indexer_reads_a_stream_namespace_with_its_redis_broker(tmp_path: Path) -> None:
    args = parse_args(["--rpc", "http://127.0.0.1:1", "--contract", "0x" + "ab" * 20,
                       "--broker", "redis://127.0.0.1:1", "--config",
                       write_config(tmp_path)])
    assert args.config.for_channel("market:0xa").stream


async def test_broker_publisher_appends_once_per_key_and_feeds_the_namespace_log(
        redis_server, fastws_server, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    srv = fastws_server("--broker", redis_server.url, config=STREAM_TOML)
    r = redis.Redis(port=redis_server.port)
    config = load_config({"config": path, "broker": redis_server.url})
    items = [("market:0xa", {"i": 0}, "tx0:0"), ("market:0xb", {"i": 1}, "tx0:1"),
             ("market:0xa", {"i": 2}, "tx1:0")]
    pub = BrokerPublisher(redis_server.url, config.for_channel)
    try:
        await pub.publish_many(items)
        first = entries(r, "fastws:stream:market")
        await pub.publish_many(items)              # the indexer's retry: the same keys
        await pub.publish(*items[2])               # and one by one
        assert entries(r, "fastws:stream:market") == first
        await pub.publish("market:0xb", {"i": 3}, "tx2:0")
    finally:
        await pub.close()
    got = entries(r, "fastws:stream:market")
    assert [(e["channel"], json.loads(e["data"]), e["offset"]) for e in got] == [
        ("market:0xa", {"i": 0}, "1"), ("market:0xb", {"i": 1}, "1"),
        ("market:0xa", {"i": 2}, "2"), ("market:0xb", {"i": 3}, "2")]
    assert {(e["user"], e["client"]) for e in got} == {("", "")}   # no connection
    assert len({e["epoch"] for e in got if e["channel"] == "market:0xa"}) == 1

    # a pattern subscriber recovers them from the namespace log: `last` …
    c = await connect(srv.ws_url)
    try:
        c.send({"id": 1, "type": "subscribe", "channel": "market:*", "last": 10})
        replayed, reply = await c.until_reply(1)
        assert reply["type"] == "subscribed", reply
        assert [(e["channel"], e["data"]["i"], e["offset"]) for e in replayed] == [
            ("market:0xa", 0, 1), ("market:0xb", 1, 1), ("market:0xa", 2, 2),
            ("market:0xb", 3, 2)]
        # … and `since` the last event it got
        since = {"channel": "market:0xb", "offset": 1, "epoch": replayed[1]["epoch"]}
        c.send({"id": 2, "type": "subscribe", "channel": "market:0x*", "since": since})
        replayed, reply = await c.until_reply(2)
        assert reply.get("recovered") is True, reply
        assert [(e["channel"], e["data"]["i"]) for e in replayed] == [
            ("market:0xa", 2), ("market:0xb", 3)]
    finally:
        c.close()


async def test_indexer_events_reach_the_stream_once_across_a_replay(
        chain, rpc, redis_server, fastws_server, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    srv = fastws_server("--broker", redis_server.url, config=STREAM_TOML)
    r = redis.Redis(port=redis_server.port)
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    log = tmp_path / "indexer.log"
    args = ["--rpc", rpc.url, "--contract", addr, "--from-block", str(first),
            "--confirmations", "1", "--broker", redis_server.url, "--config", path,
            "--checkpoint", "test:indexer:stream", "--poll-interval", "0.05"]
    mid = chain.create_market(addr, "Will the stream get every event once?")
    chain.place_bet(addr, mid, True, WEI, bettor=1)
    chain.mine(1)
    proc = start_indexer(*args, log=log)
    try:
        live = await events(c, 2)
    finally:
        assert stop(proc) == 0, log.read_text()
    market = entries(r, "fastws:stream:market")
    assert [(e["channel"], json.loads(e["data"]), int(e["offset"]), e["epoch"])
            for e in market] == [(e["channel"], e["data"], e["offset"], e["epoch"])
                                 for e in live]
    assert {(e["user"], e["client"]) for e in market} == {("", "")}
    by_event = entries(r, "fastws:stream:events")
    assert sorted(e["channel"] for e in by_event) == ["events:bet_placed",
                                                      "events:market_created"]

    # the checkpoint lost: the indexer publishes the same blocks again (same keys)
    r.delete("test:indexer:stream")
    proc = start_indexer(*args, log=log)
    try:
        await until(lambda: r.get("test:indexer:stream") is not None
                    and json.loads(r.get("test:indexer:stream"))["block"] >= first + 1,
                    what="the replay's checkpoint")
    finally:
        assert stop(proc) == 0, log.read_text()
    assert entries(r, "fastws:stream:market") == market
    assert entries(r, "fastws:stream:events") == by_event

    # a pattern subscriber's `last` sees them (the namespace log)
    d = await connect(srv.ws_url)
    try:
        d.send({"id": 1, "type": "subscribe", "channel": "market:*", "last": 5})
        replayed, reply = await d.until_reply(1)
        assert reply["type"] == "subscribed", reply
        assert [e["data"] for e in replayed] == [e["data"] for e in live]
    finally:
        d.close()
        c.close()
