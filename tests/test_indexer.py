"""The indexer against a real chain (eth-tester / py-evm) and a real fastws server.

One chain per module (conftest's ``chain``: py-evm costs ~1.5 s to start), served
over HTTP JSON-RPC by ``RpcServer`` in a thread; each test deploys its own
PredictionMarket contract.  The server gets the events through ``POST /api/publish``
and a raw WebSocket client checks what subscribers see.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, scrape
from eth_account import Account
from wsclient import connect

from fastws.indexer.checkpoint import FileCheckpoint, MemoryCheckpoint
from fastws.indexer.demo_chain import FOLLOW, DemoChain, RpcServer, WsRpcServer
from fastws.indexer.mapping import EventCodec, Follow
from fastws.indexer.publish import HttpPublisher
from fastws.indexer.runner import Indexer
from fastws.indexer.source import Backoff, HttpRpc, LogSource

WEI = 10**18
FAST = Backoff(base=0.01, cap=0.05)


async def subscribe(c: Any, channel: str, rid: int) -> None:
    reply = await c.request({"id": rid, "type": "subscribe", "channel": channel})
    assert reply["type"] == "subscribed", reply


async def events(c: Any, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``n`` event pushes (other pushes skipped)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        m = await c.recv(timeout=max(0.01, deadline - time.monotonic()))
        if m.get("type") == "event":
            out.append(m)
    return out


async def watched_contract(chain: DemoChain, fastws_server: Any) -> tuple[Any, str, int, Any]:
    """A new server, a PredictionMarket deployed, the first block after it, and a client
    subscribed to the contract's ``market:`` channel (as request 1)."""
    srv = fastws_server()
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    return srv, addr, first, c


def block(chain: DemoChain, number: int) -> Any:
    with chain.lock:
        return chain.w3.eth.get_block(number)


def tx_of(chain: DemoChain, number: int) -> str:
    """The hash of the only transaction of block ``number``."""
    return "0x" + bytes(block(chain, number)["transactions"][0]).hex()


def start_indexer(*args: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fastws", "index", *args], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def until(cond: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Await a condition that another process makes true (short polls, bounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def catch_up(ix: Indexer, chain: DemoChain, confirmations: int = 1) -> None:
    """Step the in-process indexer until every safe block is processed."""
    for _ in range(500):
        more = await ix.step()
        assert ix.cp is not None
        if not more and ix.cp.block >= chain.head() - confirmations + 1:
            return
    raise AssertionError("the indexer did not catch up")


def in_process(chain: DemoChain, rpc: RpcServer, srv: Any, address: str, start: int, *,
               confirmations: int = 1, timeout: float = 10.0) -> Indexer:
    source = LogSource(HttpRpc(rpc.url, timeout=timeout), [address], backoff=FAST)
    ix = Indexer(source, EventCodec(chain.abi), HttpPublisher(srv.http_url, srv.api_key),
                 MemoryCheckpoint(), confirmations=confirmations, from_block=start,
                 poll_interval=0.02)
    ix.stats.rpc_faults.clear()
    source.on_fault = ix.stats.fault
    return ix


async def close(ix: Indexer) -> None:
    await ix.publisher.close()
    await ix.source.rpc.close()


# --------------------------------------------------------------------------- fields


async def test_cli_publishes_confirmed_events_with_their_fields(chain, rpc, fastws_server,
                                                                tmp_path) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, "events:*", 1)
    await subscribe(c, f"market:{addr}", 2)
    mid = chain.create_market(addr, "Will it rain in Paris tomorrow?")
    chain.place_bet(addr, mid, True, 3 * WEI, bettor=2)
    chain.resolve(addr, mid, False)
    b1, b2, b3 = first, first + 1, first + 2
    assert chain.head() == b3
    mport = free_port()
    proc = start_indexer("--rpc", rpc.url, "--contract", addr, "--from-block", str(first),
                         "--url", srv.http_url, "--api-key", srv.api_key, "--checkpoint",
                         str(tmp_path / "cp.json"), "--poll-interval", "0.05",
                         "--metrics-port", str(mport), log=tmp_path / "indexer.log")
    try:
        got = await events(c, 4)      # b1 and b2 have 2 confirmations: 2 events × 2 channels
        assert [(e["channel"], e["data"]["eventType"]) for e in got] == [
            ("events:market_created", "MarketCreated"), (f"market:{addr}", "MarketCreated"),
            ("events:bet_placed", "BetPlaced"), (f"market:{addr}", "BetPlaced")]
        assert got[0]["data"] == got[1]["data"] and got[2]["data"] == got[3]["data"]
        blk1, blk2 = block(chain, b1), block(chain, b2)
        assert got[0]["data"] == {
            "eventType": "MarketCreated", "marketAddress": addr, "blockNumber": b1,
            "blockHash": "0x" + bytes(blk1["hash"]).hex(), "txHash": tx_of(chain, b1),
            "logIndex": 0, "timestamp": blk1["timestamp"],
            "args": {"marketId": mid, "creator": chain.owner.lower(),
                     "question": "Will it rain in Paris tomorrow?",
                     "endTime": block(chain, b1 - 1)["timestamp"] + 3600},
            "network": "default", "chainId": chain.chain_id,   # --network's default
        }
        bet = got[2]["data"]
        assert bet["blockNumber"] == b2 and bet["timestamp"] == blk2["timestamp"]
        assert bet["blockHash"] == "0x" + bytes(blk2["hash"]).hex()
        assert bet["txHash"] == tx_of(chain, b2)
        assert bet["args"] == {"marketId": mid, "bettor": chain.accounts[2].lower(),
                               "outcome": True, "amount": str(3 * WEI),
                               "yesPool": str(3 * WEI), "noPool": 0}
        assert all(isinstance(e["offset"], int) and e["epoch"] for e in got)

        # b3 has one confirmation: the indexer has seen it and holds its event back
        def seen() -> bool:
            m = scrape(f"http://127.0.0.1:{mport}")
            return (m.get('fastws_indexer_head_block{network="default"}') == b3
                    and m.get('fastws_indexer_checkpoint_block{network="default"}') == b2)
        await until(seen, what="indexer at head b3, checkpoint b2")
        metrics = scrape(f"http://127.0.0.1:{mport}")
        assert metrics['fastws_indexer_events_total{network="default"}'] == 2
        assert metrics['fastws_indexer_lag_blocks{network="default"}'] == 1
        assert c.messages.empty()
        chain.mine(1)
        resolved = await events(c, 2)
        assert [e["data"]["eventType"] for e in resolved] == ["MarketResolved"] * 2
        assert resolved[0]["channel"] == "events:market_resolved"
        assert resolved[0]["data"]["args"] == {"marketId": mid, "outcome": False,
                                               "totalPool": str(3 * WEI)}
    finally:
        assert stop(proc) == 0, (tmp_path / "indexer.log").read_text()


# --------------------------------------------------------------------------- restart


async def test_restart_resumes_from_the_checkpoint_without_loss_or_duplicates(
        chain, rpc, fastws_server, tmp_path) -> None:
    srv, addr, first, c = await watched_contract(chain, fastws_server)
    cp_file = tmp_path / "cp.json"
    log = tmp_path / "indexer.log"
    args = ["--rpc", rpc.url, "--contract", addr, "--from-block", str(first), "--url",
            srv.http_url, "--api-key", srv.api_key, "--checkpoint", str(cp_file),
            "--poll-interval", "0.05"]
    mid = chain.create_market(addr, "Will the launch happen on time?")
    chain.place_bet(addr, mid, True, WEI, bettor=1)
    chain.place_bet(addr, mid, False, 2 * WEI, bettor=2)
    chain.mine(1)

    proc = start_indexer(*args, log=log)
    got = await events(c, 3)
    assert stop(proc) == 0, log.read_text()
    saved = json.loads(cp_file.read_text())
    assert saved["block"] >= first + 2 and saved["contracts"] == [addr]

    # while the indexer is down: more events; the restart picks them up, once
    chain.place_bet(addr, mid, True, 5 * WEI, bettor=3)
    chain.place_bet(addr, mid, True, 7 * WEI, bettor=4)
    chain.mine(1)
    proc = start_indexer(*args, log=log)
    got += await events(c, 2)
    assert stop(proc) == 0, log.read_text()

    # a crash after publishing and before saving: the checkpoint is behind what was
    # published; the restart publishes those events again and the server drops them
    stale = await FileCheckpoint(cp_file).load()
    assert stale is not None
    stale.block = first
    stale.hashes = {n: h for n, h in stale.hashes.items() if n <= first}
    stale.recent = [e for e in stale.recent if e.block <= first]
    await FileCheckpoint(cp_file).save(stale)
    chain.resolve(addr, mid, True)
    chain.mine(1)
    proc = start_indexer(*args, log=log)
    try:
        got += await events(c, 1)
    finally:
        assert stop(proc) == 0, log.read_text()

    kinds = [e["data"]["eventType"] for e in got]
    assert kinds == ["MarketCreated"] + ["BetPlaced"] * 4 + ["MarketResolved"]
    keys = [(e["data"]["txHash"], e["data"]["logIndex"]) for e in got]
    assert len(set(keys)) == len(keys)
    assert [e["offset"] for e in got] == list(range(got[0]["offset"], got[0]["offset"] + 6))
    assert [e["data"]["args"]["amount"] for e in got if e["data"]["eventType"] == "BetPlaced"] \
        == [str(WEI), str(2 * WEI), str(5 * WEI), str(7 * WEI)]
    reply = await c.request({"id": 9, "type": "history", "channel": f"market:{addr}",
                             "limit": 100})
    assert len(reply["publications"]) == 6


async def test_redis_broker_mode_publishes_and_checkpoints_in_redis(
        chain, rpc, redis_server, fastws_server, tmp_path) -> None:
    import redis

    srv = fastws_server("--broker", redis_server.url)
    addr = chain.deploy()
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    log = tmp_path / "indexer.log"
    args = ["--rpc", rpc.url, "--contract", addr, "--from-block", str(first), "--broker",
            redis_server.url, "--checkpoint", "test:indexer:cp", "--poll-interval", "0.05"]
    mid = chain.create_market(addr, "Will it rain in Paris tomorrow?")
    chain.place_bet(addr, mid, True, WEI, bettor=1)
    chain.mine(1)
    proc = start_indexer(*args, log=log)
    got = await events(c, 2)
    assert stop(proc) == 0, log.read_text()
    saved = json.loads(redis.Redis.from_url(redis_server.url).get("test:indexer:cp"))
    assert saved["block"] >= first + 1 and saved["contracts"] == [addr]

    chain.place_bet(addr, mid, False, 2 * WEI, bettor=2)
    chain.mine(1)
    proc = start_indexer(*args, log=log)
    try:
        got += await events(c, 1)
    finally:
        assert stop(proc) == 0, log.read_text()
    assert [e["data"]["eventType"] for e in got] == ["MarketCreated", "BetPlaced", "BetPlaced"]
    assert [e["offset"] for e in got] == [got[0]["offset"] + i for i in range(3)]
    reply = await c.request({"id": 2, "type": "history", "channel": f"market:{addr}",
                             "limit": 10})
    assert len(reply["publications"]) == 3


# --------------------------------------------------------------------------- reorg


async def test_reorg_publishes_retractions_before_the_new_chain(chain, rpc, fastws_server) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    bettor = Account.create()
    with chain.lock:
        chain.w3.eth.send_transaction({"from": chain.owner, "to": bettor.address,
                                       "value": 100 * WEI, "gas": 21000})
    mid = chain.create_market(addr, "Will the next block number be even?")
    created_at = chain.head()
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    await subscribe(c, "events:*", 2)
    ix = in_process(chain, rpc, srv, addr, created_at)
    try:
        await ix.open()
        await catch_up(ix, chain)
        assert [e["data"]["eventType"] for e in await events(c, 2)] == ["MarketCreated"] * 2

        contract = chain.w3.eth.contract(address=chain.contracts[-1].address, abi=chain.abi)
        with chain.lock:
            nonce = chain.w3.eth.get_transaction_count(bettor.address)
            tx = contract.functions.placeBet(mid, True).build_transaction({
                "from": bettor.address, "nonce": nonce, "value": 2 * WEI, "gas": 300_000,
                "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9})
        raw_a = bettor.sign_transaction(tx).raw_transaction
        snap = chain.snapshot()
        with chain.lock:
            tx_a = "0x" + bytes(chain.w3.eth.send_raw_transaction(raw_a)).hex()
        chain.place_bet(addr, mid, False, 3 * WEI, bettor=2)
        await catch_up(ix, chain)
        old = [e["data"] for e in await events(c, 4) if e["channel"].startswith("market:")]
        assert [d["txHash"] for d in old][0] == tx_a and len(old) == 2

        # the fork: an empty block, then bet A again (same tx, another block), then bet C
        chain.revert(snap)
        chain.mine(1)
        with chain.lock:
            chain.w3.eth.send_raw_transaction(raw_a)
        chain.place_bet(addr, mid, True, 4 * WEI, bettor=3)
        await catch_up(ix, chain)
        got = [e for e in await events(c, 8) if e["channel"].startswith("market:")]
        retractions, fresh = got[:2], got[2:]
        assert [e["data"] for e in retractions] == [dict(old[1], removed=True),
                                                    dict(old[0], removed=True)]
        assert all("removed" not in e["data"] for e in fresh)
        assert fresh[0]["data"]["txHash"] == tx_a          # same tx, same logIndex, new block
        assert fresh[0]["data"]["blockHash"] != old[0]["blockHash"]
        assert fresh[0]["data"]["blockNumber"] == old[0]["blockNumber"] + 1
        assert fresh[1]["data"]["args"]["amount"] == str(4 * WEI)
        assert ix.stats.reorgs == 1 and ix.stats.retractions == 2
    finally:
        await close(ix)


# --------------------------------------------------------------------------- RPC faults


async def test_get_logs_range_limits_are_followed(chain, rpc, fastws_server) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    start = chain.head() + 1
    mid = chain.create_market(addr, "Will gas stay under 20 gwei today?")
    for i in range(6):
        chain.mine(2)
        chain.place_bet(addr, mid, i % 2 == 0, (i + 1) * WEI, bettor=1 + i % 5)
    ranges: list[int] = []

    def refuse_big_ranges(method: str, params: list[Any]) -> tuple[int, dict, bytes] | None:
        if method == "eth_getLogs":
            f = params[0]
            span = int(f["toBlock"], 16) - int(f["fromBlock"], 16) + 1
            ranges.append(span)
            if span > 4:
                body = {"jsonrpc": "2.0", "id": 1, "error": {
                    "code": -32005, "message": "query exceeds max block range 4"}}
                return 200, {}, json.dumps(body).encode()
        return None

    rpc.fault = refuse_big_ranges
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    ix = in_process(chain, rpc, srv, addr, start)
    try:
        await ix.open()
        await catch_up(ix, chain)
        got = await events(c, 7)
    finally:
        await close(ix)
    assert [e["data"]["eventType"] for e in got] == ["MarketCreated"] + ["BetPlaced"] * 6
    assert [e["data"]["args"]["amount"] for e in got[1:]] == [str(i * WEI) for i in range(1, 7)]
    assert ranges[0] > 4 and ix.stats.rpc_faults.get("range", 0) >= 1
    assert ix.source.span <= 4 + 4 // 2


async def test_rpc_faults_are_retried_with_backoff(chain, rpc, fastws_server) -> None:
    srv = fastws_server()
    addr = chain.deploy()
    start = chain.head() + 1
    mid = chain.create_market(addr, "Will BTC dominance exceed 60% by Friday?")
    chain.place_bet(addr, mid, True, WEI, bettor=1)
    injected: list[str] = []
    plan = {  # method → faults to answer with, in turn
        "eth_blockNumber": ["429", "timeout"],
        "eth_getLogs": ["503", "rpc-error"],
        "eth_getBlockByNumber": ["500", "garbage"],
    }

    def faults(method: str, params: list[Any]) -> tuple[int, dict, bytes] | None:
        todo = plan.get(method)
        if not todo:
            return None
        kind = todo.pop(0)
        injected.append(f"{method}:{kind}")
        if kind == "429":
            return 429, {"Retry-After": "0"}, b'{"error":"rate limited"}'
        if kind == "timeout":
            time.sleep(0.6)
            return None
        if kind == "rpc-error":   # a one-block range refused: retried as an error
            body = {"jsonrpc": "2.0", "id": 1,
                    "error": {"code": -32603, "message": "internal error"}}
            return 200, {}, json.dumps(body).encode()
        if kind == "garbage":
            return 502, {"Content-Type": "text/html"}, b"<html>bad gateway</html>"
        return int(kind), {}, b"{}"

    rpc.fault = faults
    c = await connect(srv.ws_url)
    await subscribe(c, f"market:{addr}", 1)
    ix = in_process(chain, rpc, srv, addr, start, timeout=0.3)
    ix.source.max_range = ix.source.span = 1
    try:
        await ix.open()
        await catch_up(ix, chain)
        got = await events(c, 2)
    finally:
        await close(ix)
    assert [e["data"]["eventType"] for e in got] == ["MarketCreated", "BetPlaced"]
    assert sorted(injected) == sorted(f"{m}:{k}" for m, ks in {
        "eth_blockNumber": ["429", "timeout"], "eth_getLogs": ["503", "rpc-error"],
        "eth_getBlockByNumber": ["500", "garbage"]}.items() for k in ks)
    assert ix.stats.rpc_faults.get("transient", 0) == 5
    assert ix.stats.rpc_faults.get("error", 0) == 1


async def test_publisher_waits_for_the_server(chain, rpc, fastws_server) -> None:
    port = free_port()
    addr = chain.deploy()
    start = chain.head() + 1
    chain.create_market(addr, "Will it rain in Paris tomorrow?")

    class Late:   # the server's address before it listens
        http_url = f"http://127.0.0.1:{port}"
        api_key = "test-key"

    ix = in_process(chain, rpc, Late, addr, start)
    ix.publisher.backoff = FAST
    try:
        await ix.open()
        task = asyncio.ensure_future(catch_up(ix, chain))
        await until(lambda: ix.publisher.retries >= 2, what="publish retries")
        srv = fastws_server(port=port)
        c = await connect(srv.ws_url)
        reply = await c.request({"id": 1, "type": "history", "channel": f"market:{addr}",
                                 "limit": 10})
        await task
        reply = await c.request({"id": 2, "type": "history", "channel": f"market:{addr}",
                                 "limit": 10})
        assert [p["data"]["eventType"] for p in reply["publications"]] == ["MarketCreated"]
    finally:
        await close(ix)


# --------------------------------------------------------------------------- factories


def follower(chain: DemoChain, rpc: RpcServer, srv: Any, start: int) -> Indexer:
    """An in-process indexer of the factory that follows MarketDeployed.market."""
    abi = chain.factory_abi + chain.abi
    source = LogSource(HttpRpc(rpc.url), [chain.factory_address], backoff=FAST)
    ix = Indexer(source, EventCodec(abi), HttpPublisher(srv.http_url, srv.api_key),
                 MemoryCheckpoint(), confirmations=1, from_block=start, poll_interval=0.02,
                 follow=Follow.parse(FOLLOW, abi))
    source.on_fault = ix.stats.fault
    return ix


def deploy_with_market(chain: DemoChain, question: str) -> str:
    """The factory deploys a market contract and a market is opened on it, in one block
    (the child's first log shares the block of the event that creates it)."""
    with chain.lock:
        child = chain.factory.functions.deployMarket().call({"from": chain.owner})
        end = chain.w3.eth.get_block("latest")["timestamp"] + 3600
        contract = chain.w3.eth.contract(address=child, abi=chain.abi)
        chain.tester.disable_auto_mine_transactions()
        try:
            chain.factory.functions.deployMarket().transact({"from": chain.owner,
                                                             "gas": 2_000_000})
            contract.functions.createMarket(question, end).transact({"from": chain.accounts[1],
                                                                     "gas": 300_000})
        finally:
            chain.tester.enable_auto_mine_transactions()   # mines both in one block
    chain.contracts.append(contract)
    chain.open_markets[child.lower()] = [0]
    chain.end_times[(child.lower(), 0)] = end
    return child.lower()


async def test_cli_follows_contracts_the_factory_creates_across_restarts(
        chain, rpc, fastws_server, tmp_path) -> None:
    srv = fastws_server()
    factory = chain.factory_address
    first = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, "events:*", 1)
    cp_file = tmp_path / "cp.json"
    log = tmp_path / "indexer.log"
    mport = free_port()
    args = ["--rpc", rpc.url, "--contract", factory, "--follow", "MarketDeployed.market",
            "--from-block", str(first), "--confirmations", "1", "--url", srv.http_url,
            "--api-key", srv.api_key, "--checkpoint", str(cp_file), "--poll-interval", "0.05",
            "--metrics-port", str(mport)]
    child = deploy_with_market(chain, "Will it rain in Paris tomorrow?")
    born = chain.head()
    chain.place_bet(child, 0, True, WEI, bettor=2)

    proc = start_indexer(*args, log=log)
    try:
        got = await events(c, 3)
        assert [(e["channel"], e["data"]["marketAddress"]) for e in got] == [
            ("events:market_deployed", factory), ("events:market_created", child),
            ("events:bet_placed", child)]
        deployed, created = got[0]["data"], got[1]["data"]
        assert deployed["args"] == {"market": child, "owner": chain.owner.lower()}
        assert deployed["blockNumber"] == created["blockNumber"] == born
        assert created["logIndex"] > deployed["logIndex"] or \
            created["txHash"] != deployed["txHash"]
        await until(lambda: scrape(f"http://127.0.0.1:{mport}").get(
            'fastws_indexer_followed_contracts{network="default"}') == 1, what="followed gauge")
    finally:
        assert stop(proc) == 0, log.read_text()
    saved = json.loads(cp_file.read_text())
    assert saved["follow"] == "MarketDeployed.market" and saved["contracts"] == [factory]
    assert [(f["address"], f["block"]) for f in saved["followed"]] == [(child, born)]

    # while it is down: the child takes a bet, the factory makes a second one; the
    # restart follows the first from its checkpoint and finds the second
    chain.place_bet(child, 0, False, 2 * WEI, bettor=3)
    second = chain.deploy()
    mid = chain.create_market(second, "Will the launch happen on time?")
    proc = start_indexer(*args, log=log)
    try:
        got = await events(c, 3)
    finally:
        assert stop(proc) == 0, log.read_text()
    assert [(e["data"]["eventType"], e["data"]["marketAddress"]) for e in got] == [
        ("BetPlaced", child), ("MarketDeployed", factory), ("MarketCreated", second)]
    assert got[0]["data"]["args"]["amount"] == str(2 * WEI)
    assert got[2]["data"]["args"]["marketId"] == mid
    saved = json.loads(cp_file.read_text())
    assert [f["address"] for f in saved["followed"]] == [child, second]

    # another --follow (or none) with this checkpoint: refused in one line
    plain = [a for a in args if a not in ("--follow", "MarketDeployed.market")]
    proc = subprocess.run([sys.executable, "-m", "fastws", "index", *plain, "--log-level",
                           "error"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "written with --follow MarketDeployed.market" in proc.stderr


async def test_reorg_of_a_factory_event_stops_following_its_contract(
        chain, rpc, fastws_server) -> None:
    srv = fastws_server()
    start = chain.head() + 1
    c = await connect(srv.ws_url)
    await subscribe(c, "events:*", 1)
    ix = follower(chain, rpc, srv, start)
    try:
        await ix.open()
        snap = chain.snapshot()
        child = deploy_with_market(chain, "Will gas stay under 20 gwei today?")
        born = chain.head()
        chain.place_bet(child, 0, True, WEI, bettor=1)
        await catch_up(ix, chain)
        old = [e["data"] for e in await events(c, 3)]
        assert [d["eventType"] for d in old] == ["MarketDeployed", "MarketCreated", "BetPlaced"]
        assert ix.source.addresses == [chain.factory_address, child]
        assert ix.stats.followed == 1

        # the fork abandons the deployment: three empty blocks, a longer chain
        chain.revert(snap)
        chain.mine(3)
        await catch_up(ix, chain)
        retracted = [e["data"] for e in await events(c, 3)]
        assert retracted == [dict(d, removed=True) for d in reversed(old)]
        assert ix.source.addresses == [chain.factory_address]
        assert ix.cp is not None and ix.cp.followed == [] and ix.stats.followed == 0

        # the same deployment on the new chain (same address, later block): followed
        # again from there
        again = deploy_with_market(chain, "Will gas stay under 20 gwei today?")
        assert again == child and chain.head() > born
        await catch_up(ix, chain)
        fresh = [e["data"] for e in await events(c, 2)]
        assert [(d["eventType"], d["blockNumber"]) for d in fresh] == [
            ("MarketDeployed", chain.head()), ("MarketCreated", chain.head())]
        assert [(f.address, f.block) for f in ix.cp.followed] == [(child, chain.head())]
        assert ix.stats.reorgs == 1 and ix.stats.retractions == 3
    finally:
        await close(ix)


# --------------------------------------------------------------------------- new heads


def metric(port: int, name: str) -> float:
    """One metric of the single-chain indexer's /metrics (network ``default``; -1 while
    it is not serving yet)."""
    try:
        return scrape(f"http://127.0.0.1:{port}").get(name + '{network="default"}', -1)
    except OSError:
        return -1


@pytest.fixture(scope="module")
def ws_server(chain: DemoChain) -> Iterator[WsRpcServer]:
    server = WsRpcServer(chain).start()
    yield server
    server.stop()


@pytest.fixture
def ws_rpc(ws_server: WsRpcServer) -> Iterator[WsRpcServer]:
    ws_server.fault = None
    yield ws_server
    ws_server.fault = None


def start_ws_indexer(ws_rpc: WsRpcServer, srv: Any, addr: str, first: int, tmp_path: Path,
                     poll_interval: str) -> tuple[subprocess.Popen, int, Path]:
    """``fastws index`` of ``addr`` from block ``first`` (1 confirmation) over the
    WebSocket RPC into ``srv``, polling every ``poll_interval`` s while it has no
    subscription; returns the process, its metrics port and its log."""
    mport = free_port()
    log = tmp_path / "indexer.log"
    proc = start_indexer("--rpc", ws_rpc.url, "--contract", addr, "--from-block", str(first),
                         "--confirmations", "1", "--url", srv.http_url, "--api-key",
                         srv.api_key, "--checkpoint", str(tmp_path / "cp.json"),
                         "--poll-interval", poll_interval, "--metrics-port", str(mport),
                         log=log)
    return proc, mport, log


async def test_ws_rpc_new_heads_wake_the_indexer(chain, ws_rpc, fastws_server,
                                                 tmp_path) -> None:
    srv, addr, first, c = await watched_contract(chain, fastws_server)
    # a poll interval far longer than the test: only newHeads can wake the indexer
    proc, mport, log = start_ws_indexer(ws_rpc, srv, addr, first, tmp_path, "600")
    try:
        def idle_and_subscribed() -> bool:
            return (metric(mport, "fastws_indexer_head_subscription") == 1
                    and metric(mport, "fastws_indexer_checkpoint_block") == chain.head())
        await until(idle_and_subscribed, what="subscribed and caught up")
        mid = chain.create_market(addr, "Will it rain in Paris tomorrow?")
        got = await events(c, 1, timeout=10)
        chain.place_bet(addr, mid, True, WEI, bettor=1)
        chain.mine(1)                                     # an empty block wakes it too
        chain.place_bet(addr, mid, False, 2 * WEI, bettor=2)
        got += await events(c, 2, timeout=10)
        assert [e["data"]["eventType"] for e in got] == ["MarketCreated", "BetPlaced",
                                                         "BetPlaced"]
        metrics = scrape(f"http://127.0.0.1:{mport}")
        assert metrics['fastws_indexer_new_heads_total{network="default"}'] >= 4
        assert metrics['fastws_indexer_head_subscription_failures_total{network="default"}'] == 0
        assert ws_rpc.calls.get("eth_subscribe", 0) >= 1
    finally:
        assert stop(proc) == 0, log.read_text()
    assert "new heads by subscription" in log.read_text()


async def test_ws_rpc_falls_back_to_polling_and_subscribes_again(
        chain, ws_rpc, fastws_server, tmp_path) -> None:
    srv, addr, first, c = await watched_contract(chain, fastws_server)

    def refuse(method: str, params: list[Any]) -> dict[str, Any] | None:
        if method == "eth_subscribe":
            return {"code": -32601, "message": "the method eth_subscribe is not available"}
        return None

    ws_rpc.fault = refuse
    mid = chain.create_market(addr, "Will the launch happen on time?")
    proc, mport, log = start_ws_indexer(ws_rpc, srv, addr, first, tmp_path, "0.1")

    try:
        got = await events(c, 1)                         # polling: the subscription failed
        await until(lambda: metric(mport, "fastws_indexer_head_subscription_failures_total") >= 1,
                    what="a failed subscription")
        assert metric(mport, "fastws_indexer_head_subscription") == 0
        chain.place_bet(addr, mid, True, WEI, bettor=1)
        got += await events(c, 1)

        ws_rpc.fault = None                              # the node accepts it again
        await until(lambda: metric(mport, "fastws_indexer_head_subscription") == 1,
                    what="subscribed again")
        failures = metric(mport, "fastws_indexer_head_subscription_failures_total")

        ws_rpc.drop()                                    # the node restarts
        await until(lambda: metric(mport, "fastws_indexer_head_subscription_failures_total")
                    == failures + 1, what="the drop counted")
        chain.place_bet(addr, mid, False, 3 * WEI, bettor=2)
        got += await events(c, 1)
        await until(lambda: metric(mport, "fastws_indexer_head_subscription") == 1,
                    what="subscribed after the drop")
        chain.resolve(addr, mid, True)
        got += await events(c, 1)
    finally:
        assert stop(proc) == 0, log.read_text()
    assert [e["data"]["eventType"] for e in got] == ["MarketCreated", "BetPlaced", "BetPlaced",
                                                     "MarketResolved"]
    text = log.read_text()
    assert "eth_subscribe newHeads failed" in text and "polling every 0.1s" in text
    assert "newHeads subscription lost" in text
    assert "Traceback" not in text


async def test_latency_tool_times_both_modes() -> None:
    """The documented measurement (docs/indexer.md) runs: two modes, one time per block."""
    from loadtest.indexer_latency import measure

    results = await measure(blocks=2, poll=0.2)
    assert list(results) == ["polling every 0.2s (http)", "newHeads subscription (ws)"]
    assert all(len(xs) == 2 and all(0 < x < 30 for x in xs) for xs in results.values())
