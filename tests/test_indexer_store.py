"""The durable event store (``fastws index --store postgresql://…``, SPEC §14).

Real parts: an eth-tester chain (conftest's ``chain``, served over HTTP JSON-RPC), a
fastws server taking ``POST /api/publish``, and the machine's PostgreSQL, a database
per test (pg_helpers: the tests fail, not skip, when no PostgreSQL answers).  The
store is cut for real by a TCP proxy between the indexer and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import free_port, http
from pg_helpers import PG, PgProxy, count, fresh_database, query
from test_indexer import FAST, WEI, events, start_indexer, stop, subscribe, until
from wsclient import connect

from fastws.indexer import source as rpcs
from fastws.indexer.demo_chain import DemoChain
from fastws.indexer.mapping import EventCodec
from fastws.indexer.publish import HttpPublisher
from fastws.indexer.runner import Indexer
from fastws.indexer.source import LogSource
from fastws.indexer.store import EventStore
from fastws.indexer.templates import Channels


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def ready(port: int) -> int:
    """The indexer's /readyz status (0 while it does not answer)."""
    try:
        return http("GET", f"http://127.0.0.1:{port}/readyz")[0]
    except OSError:
        return 0


async def test_events_are_rows_written_with_the_checkpoint_before_publishing(
        chain, rpc, fastws_server, pg_url, tmp_path) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    mid = chain.create_market(addr, "Will it rain in Paris tomorrow?")
    chain.place_bet(addr, mid, True, 3 * WEI, bettor=2)

    # a wrong API key: the rows and the checkpoint are committed, then the server
    # refuses the publication and the indexer stops (exit 1): stored, not published
    argv = ["--rpc", rpc.url, "--contract", addr, "--from-block", str(first),
            "--confirmations", "1", "--url", srv.http_url, "--store", pg_url,
            "--network", "testnet", "--poll-interval", "0.05"]
    proc = start_indexer(*argv, "--api-key", "wrong", log=tmp_path / "first.log")
    assert proc.wait(30) == 1, (tmp_path / "first.log").read_text()
    assert "401" in (tmp_path / "first.log").read_text()
    rows = await query(pg_url, "SELECT * FROM fastws_events ORDER BY block_number, log_index")
    assert [r["event"] for r in rows] == ["MarketCreated", "BetPlaced"]
    (cp,) = await query(pg_url, "SELECT key, network, chain_id, block_number, doc::text "
                                "FROM fastws_checkpoints")
    doc = json.loads(cp["doc"])
    assert cp["network"] == "testnet" and cp["chain_id"] == chain.chain_id
    assert [p["data"]["eventType"] for p in doc["pending"]] == ["MarketCreated", "BetPlaced"]
    assert c.messages.empty()

    # the restart publishes what was stored (pending) first, once, then goes on
    mport = free_port()
    proc = start_indexer(*argv, "--api-key", srv.api_key, "--metrics-port", str(mport),
                         log=tmp_path / "second.log")
    try:
        got = await events(c, 2)
        data = [e["data"] for e in got]
        assert [d["eventType"] for d in data] == ["MarketCreated", "BetPlaced"]
        assert all(d["network"] == "testnet" and d["chainId"] == chain.chain_id for d in data)
        chain.resolve(addr, mid, True)
        (resolved,) = await events(c, 1)       # the next event: nothing was doubled
        assert resolved["data"]["eventType"] == "MarketResolved"
        await until(lambda: ready(mport) == 200, what="/readyz 200")
        rows = await query(pg_url, "SELECT * FROM fastws_events ORDER BY block_number, "
                                   "log_index")
        assert len(rows) == 3
        for row, d in zip(rows, [*data, resolved["data"]], strict=True):
            assert (row["network"], row["chain_id"], row["block_number"], row["block_hash"],
                    row["tx_hash"], row["log_index"], row["address"], row["event"],
                    json.loads(row["args"]), row["removed"]) == (
                "testnet", chain.chain_id, d["blockNumber"], d["blockHash"], d["txHash"],
                d["logIndex"], addr, d["eventType"], d["args"], False)
            assert row["block_timestamp"] == datetime.fromtimestamp(d["timestamp"], UTC)
        indexes = [r["indexdef"] for r in await query(
            pg_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'fastws_events'")]
        assert any("(chain_id, address, block_number)" in i for i in indexes), indexes
        assert any("(chain_id, block_hash, log_index)" in i for i in indexes), indexes
    finally:
        assert stop(proc) == 0
    (cp,) = await query(pg_url, "SELECT block_number, doc::text FROM fastws_checkpoints")
    assert cp["block_number"] == resolved["data"]["blockNumber"]
    assert "pending" not in json.loads(cp["doc"])


class DiesAfterPublishing(HttpPublisher):
    """The process "dies" right after its publications were accepted, before the store
    hears of it: a fault that cannot be caused from outside at the right instant."""

    async def publish_many(self, items: list[Any]) -> None:
        await super().publish_many(items)
        raise SystemExit("died after publishing")


def store_indexer(chain: DemoChain, srv: Any, store: EventStore, addr: str, start: int, *,
                  publisher: HttpPublisher | None = None,
                  channels: list[str] | None = None) -> Indexer:
    source = LogSource(rpcs.TesterRpc(chain.request), [addr], backoff=FAST)
    return Indexer(source, EventCodec(chain.abi),
                   publisher or HttpPublisher(srv.http_url, srv.api_key),
                   store.chain("test", "testnet"), confirmations=1, from_block=start,
                   network="testnet", channels=Channels(channels) if channels else None)


async def catch_up(ix: Indexer, chain: DemoChain) -> None:
    for _ in range(200):
        if not await ix.step() and ix.cp is not None and ix.cp.block >= chain.head():
            return
    raise AssertionError("the indexer did not catch up")


async def test_a_crash_after_publishing_does_not_double_on_restart(chain, fastws_server,
                                                                   pg_url) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    mid = chain.create_market(addr, "Will the launch happen on time?")
    chain.place_bet(addr, mid, False, WEI, bettor=3)
    store = EventStore(pg_url, backoff=FAST)
    dying = DiesAfterPublishing(srv.http_url, srv.api_key)
    ix = store_indexer(chain, srv, store, addr, first, publisher=dying)
    await ix.open()
    with pytest.raises(SystemExit):
        await catch_up(ix, chain)
    await dying.close()
    got = await events(c, 2)
    assert [e["data"]["eventType"] for e in got] == ["MarketCreated", "BetPlaced"]
    (cp,) = await query(pg_url, "SELECT doc::text FROM fastws_checkpoints")
    assert len(json.loads(cp["doc"])["pending"]) == 2       # the store never heard of it

    again = store_indexer(chain, srv, store, addr, first)    # the restart
    try:
        await again.open()                 # publishes pending again: the same keys
        chain.resolve(addr, mid, False)
        await catch_up(again, chain)
        (nxt,) = await events(c, 1)
        assert nxt["data"]["eventType"] == "MarketResolved"   # no repeat came before it
        assert await count(pg_url, "SELECT count(*) FROM fastws_events") == 3
    finally:
        await again.publisher.close()
        await store.close()


async def test_reorg_marks_rows_removed_and_retracts_on_the_template_channels(
        chain, fastws_server, pg_url) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    mid = chain.create_market(addr, "Will the next block number be even?")
    start = chain.head() + 1
    bettor = chain.accounts[4].lower()
    c = await connect(srv.ws_url)
    await subscribe(c, f"bettor:{bettor}", 1)
    await subscribe(c, "net:testnet", 2)
    store = EventStore(pg_url, backoff=FAST)
    ix = store_indexer(chain, srv, store, addr, start,
                       channels=["bettor:{args.bettor}", "net:{network}"])
    try:
        await ix.open()
        snap = chain.snapshot()
        chain.place_bet(addr, mid, True, 2 * WEI, bettor=4)
        await catch_up(ix, chain)
        old = await events(c, 2)
        assert {e["channel"] for e in old} == {f"bettor:{bettor}", "net:testnet"}
        chain.revert(snap)
        chain.mine(2)                      # the fork is longer and holds no bet
        await catch_up(ix, chain)
        gone = await events(c, 2)          # the retraction, on the same two channels
        assert {e["channel"] for e in gone} == {f"bettor:{bettor}", "net:testnet"}
        assert all(e["data"] == dict(old[0]["data"], removed=True) for e in gone)
        rows = await query(pg_url, "SELECT event, removed, block_hash FROM fastws_events")
        assert [(r["event"], r["removed"]) for r in rows] == [("BetPlaced", True)]
        assert rows[0]["block_hash"] == old[0]["data"]["blockHash"]
        chain.place_bet(addr, mid, False, 5 * WEI, bettor=4)   # a new bet on the fork
        await catch_up(ix, chain)
        (new,) = [e for e in await events(c, 2) if e["channel"] == "net:testnet"]
        assert "removed" not in new["data"]
        assert await count(pg_url, "SELECT count(*) FROM fastws_events WHERE NOT removed") == 1
    finally:
        await ix.publisher.close()
        await store.close()


async def test_store_down_retries_with_backoff_and_publishes_nothing_new(
        chain, rpc, fastws_server, pg_url, tmp_path) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    proxy = PgProxy(free_port())
    via_proxy = pg_url.replace(":5432/", f":{proxy.port}/")
    mport = free_port()
    log = tmp_path / "indexer.log"
    proc = start_indexer("--rpc", rpc.url, "--contract", addr, "--from-block", str(first),
                         "--confirmations", "1", "--url", srv.http_url, "--api-key",
                         srv.api_key, "--store", via_proxy, "--poll-interval", "0.05",
                         "--metrics-port", str(mport), log=log)
    try:
        # no store at start: a clear line, retries, /readyz 503, nothing published
        await until(lambda: "connect failed" in log.read_text(), what="the retry line")
        line = next(ln for ln in log.read_text().splitlines() if "connect failed" in ln)
        assert f"127.0.0.1:{proxy.port}" in line and "retry in" in line
        assert ready(mport) == 503
        mid = chain.create_market(addr, "Will gas stay under 20 gwei today?")
        await until(lambda: log.read_text().count("connect failed") >= 3, what="3 retries")
        assert c.messages.empty()
        await proxy.start()                                  # the store comes up
        (created,) = await events(c, 1)
        assert created["data"]["eventType"] == "MarketCreated"
        await until(lambda: ready(mport) == 200, what="/readyz 200")

        await proxy.cut()                                    # the store goes away
        fails = log.read_text().count("failed (")
        chain.place_bet(addr, mid, True, WEI, bettor=2)
        await until(lambda: log.read_text().count("failed (") >= fails + 2,
                    what="commits failing")
        assert ready(mport) == 503 and c.messages.empty()    # not published without it
        await proxy.start()
        (bet,) = await events(c, 1)
        assert bet["data"]["eventType"] == "BetPlaced"
        chain.resolve(addr, mid, True)
        (resolved,) = await events(c, 1)                     # nothing doubled before it
        assert resolved["data"]["eventType"] == "MarketResolved"
        assert await count(pg_url, "SELECT count(*) FROM fastws_events") == 3
    finally:       # the proxy lives on this loop: stop the indexer without blocking it
        assert await asyncio.to_thread(stop, proc) == 0
        await proxy.cut()


async def test_backlog_tool_with_the_store_smoke() -> None:
    """``python -m loadtest.indexer_backlog --store …`` (docs/benchmarks.md) runs: every
    event a row of its own database, created and dropped."""
    from loadtest.indexer_backlog import catch_up, commit_rate

    res = await catch_up(30, "memory://", None, PG)
    assert res["events"] == 30 and res["rows"] == 30 and res["rate"] > 0
    assert await commit_rate(PG, 200, 50) > 0


def test_a_store_that_can_never_work_stops_the_start(tmp_path) -> None:
    """No such database (or a refused login): one line naming the store, status 2; a
    store that does not answer is retried instead (above)."""
    url = PG + "/fastws_no_such_database"
    proc = start_indexer("--rpc", "http://127.0.0.1:9", "--contract", "0x" + "ab" * 20,
                         "--store", url, log=tmp_path / "indexer.log")
    assert proc.wait(30) == 2
    lines = [ln for ln in (tmp_path / "indexer.log").read_text().splitlines()
             if ln.startswith("fastws index: ")]
    assert lines == [f"fastws index: --store: {url}: InvalidCatalogNameError: database "
                     '"fastws_no_such_database" does not exist']
