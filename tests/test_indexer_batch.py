"""The indexer's publishers in batches: HttpPublisher.publish_many against a real server
(requests of up to BATCH_ITEMS, order kept, a refused item stops it), and a backlog on a
real eth-tester chain sent in a few requests instead of one per publication."""

from __future__ import annotations

import pytest
from redis_helpers import events, sub, uniq
from wsclient import connect

from fastws.indexer.checkpoint import MemoryCheckpoint
from fastws.indexer.mapping import EventCodec
from fastws.indexer.publish import BATCH_ITEMS, BrokerPublisher, HttpPublisher, PublishRefused
from fastws.indexer.runner import Indexer
from fastws.indexer.source import Backoff, HttpRpc, LogSource

pytestmark = pytest.mark.timeout(120)

WEI = 10**18
FAST = Backoff(base=0.01, cap=0.05)


async def test_publish_many_in_requests_of_batch_items(server) -> None:
    a, b = uniq(), uniq()
    c = await connect(server.ws_url)
    await sub(c, a, 1)
    await sub(c, b, 2)
    n = BATCH_ITEMS + 100
    items = [(a if i % 2 else b, {"i": i}, f"k{i}") for i in range(2 * n)]
    pub = HttpPublisher(server.http_url, server.api_key)
    try:
        await pub.publish_many(items)
        assert pub.requests == 3 and pub.retries == 0     # 500 + 500 + 200
        got = await events(c, 2 * n)
        for ch in (a, b):
            mine = [e for e in got if e["channel"] == ch]
            assert [e["data"]["i"] for e in mine] == [i for ch2, d, _ in items if ch2 == ch
                                                      for i in (d["i"],)]
            assert [e["offset"] for e in mine] == list(range(1, n + 1))
        # the same keys again: the server drops every repeat
        await pub.publish_many(items[:10])
        assert server.publish(a, "after")["offset"] == n + 1
    finally:
        await pub.close()
        c.close()


async def test_publish_many_refused_item_stops_it(server) -> None:
    a = uniq()
    pub = HttpPublisher(server.http_url, server.api_key)
    try:
        with pytest.raises(PublishRefused, match="HTTP 400 for bad channel: .*printable"):
            await pub.publish_many([(a, {"i": 0}, "k0"), ("bad channel", {"i": 1}, "k1"),
                                    (a, {"i": 2}, "k2")])
        assert server.publish(a, "next")["offset"] == 3   # the good items were published
    finally:
        await pub.close()
    wrong = HttpPublisher(server.http_url, "wrong-key")
    try:
        with pytest.raises(PublishRefused, match="HTTP 401"):
            await wrong.publish_many([(a, {"i": 0}, "k0")])
    finally:
        await wrong.close()


async def test_broker_publisher_publish_many(redis_server, fastws_server) -> None:
    srv = fastws_server("--broker", redis_server.url)
    a = uniq()
    c = await connect(srv.ws_url)
    await sub(c, a, 1)
    from fastws.config import Config

    pub = BrokerPublisher(redis_server.url, Config().for_channel)
    try:
        await pub.publish_many([(a, {"i": i}, f"k{i}") for i in range(BATCH_ITEMS + 5)])
        got = await events(c, BATCH_ITEMS + 5)
        assert [e["offset"] for e in got] == list(range(1, BATCH_ITEMS + 6))
        assert [e["data"]["i"] for e in got] == list(range(BATCH_ITEMS + 5))
    finally:
        await pub.close()
        c.close()


async def test_indexer_backlog_goes_in_few_requests(chain, server) -> None:
    addr = chain.deploy()
    first = chain.head() + 1
    mid = chain.create_market(addr, "Will the backlog be quick?")
    bets = 60
    for i in range(bets):
        chain.place_bet(addr, mid, i % 2 == 0, WEI, bettor=1 + i % 3)
    chain.mine(1)
    c = await connect(server.ws_url)
    await sub(c, f"market:{addr}", 1)
    source = LogSource(HttpRpc(chain.rpc.url, timeout=10.0), [addr],   # type: ignore[attr-defined]
                       backoff=FAST)
    pub = HttpPublisher(server.http_url, server.api_key)
    ix = Indexer(source, EventCodec(chain.abi), pub, MemoryCheckpoint(), confirmations=1,
                 from_block=first, poll_interval=0.02)
    try:
        await ix.open()
        steps = 0
        while await ix.step() or ix.cp.block < chain.head():
            steps += 1
            assert steps < 100
        assert ix.stats.events == bets + 1
        # one request per step with events (not one per publication: 2 × 61 of them)
        assert 1 <= pub.requests <= steps + 1 < 2 * (bets + 1)
        got = await events(c, bets + 1)
        assert [e["data"]["blockNumber"] for e in got] == list(range(first, first + bets + 1))
        assert [e["offset"] for e in got] == list(range(1, bets + 2))
    finally:
        await pub.close()
        await source.rpc.close()
        c.close()


async def test_backlog_tool_smoke() -> None:
    """``python -m loadtest.indexer_backlog`` (the numbers of docs/indexer.md) runs."""
    from loadtest.indexer_backlog import api_rate, catch_up

    res = await catch_up(30, "memory://", None)
    assert res["events"] == 30 and res["rate"] > 0 and res["seconds"] >= res["first"] > 0
    assert await api_rate(10, "memory://", 0.3, 2) > 0
