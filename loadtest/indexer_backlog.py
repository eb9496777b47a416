"""Backlog catch-up of ``fastws index``, and publications/s of ``POST /api/publish``.

``python -m loadtest.indexer_backlog [--blocks N] [--broker URL] [--tree DIR]`` builds, on
this machine, a demo chain (eth-tester, served over HTTP JSON-RPC) holding one market
contract with ``N`` blocks of one event each (a market, then bets), starts a ``fastws
serve`` process (``--broker``, default ``memory://``) and a WebSocket client subscribed
to ``market:<address>``, then starts ``fastws index --from-block`` at the first of those
blocks (from the source tree ``--tree``, default this one: give an older checkout to
compare) and times the events' arrival at the client: the rate from the first to the
last event (each event is two publications: ``events:…`` and ``market:…``), and the
whole run from the indexer's start.  py-evm answers ``eth_getLogs`` over a few hundred
blocks in seconds (a real node answers from its log index in milliseconds), which would
hide the publishing side, so this RPC server answers ``eth_getLogs`` from the logs of the
transactions' receipts, kept when they were mined; every other call is the chain's.
With ``--store postgresql://user@host:port`` the indexer also keeps every event in
PostgreSQL (``fastws index --store``: rows and checkpoint in one transaction before
publishing), in a database of its own that the tool creates on that server and drops
afterwards; it checks that every event is a row.  ``--store URL --commits N --batch B``
times the store alone: ``N`` events committed ``B`` per transaction with their
checkpoint (the indexer's commit, as for a range of ``B`` events), rows/s.

``python -m loadtest.indexer_backlog --api BATCH [--broker URL] [--seconds S]
[--inflight K]`` instead posts publications to a server as fast as it answers, ``K``
requests in flight on keep-alive connections, each a single publication object
(``BATCH`` 1) or an array of ``BATCH``, over 8 channels, and prints publications/s.
See docs/indexer.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.indexer_latency import _free_port, _stop, _wait_port

__all__ = ["api_rate", "catch_up", "commit_rate", "main"]

API_KEY = "backlog-key"


class _IndexedRpc:
    """A :class:`~fastws.indexer.demo_chain.RpcServer` whose ``eth_getLogs`` is answered
    from ``logs`` (RPC JSON, in (block, logIndex) order) instead of by py-evm."""

    @staticmethod
    def start(chain: Any, logs: list[dict[str, Any]]) -> Any:
        from fastws.indexer.demo_chain import RpcServer

        class Indexed(RpcServer):
            def _one(self, req: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
                if req.get("method") != "eth_getLogs":
                    return super()._one(req)
                q = (req.get("params") or [{}])[0]
                lo, hi = int(q["fromBlock"], 16), int(q["toBlock"], 16)
                addrs = q.get("address") or []
                addrs = {a.lower() for a in ([addrs] if isinstance(addrs, str) else addrs)}
                found = [lg for lg in logs if lo <= int(lg["blockNumber"], 16) <= hi
                         and (not addrs or lg["address"].lower() in addrs)]
                return 200, {}, {"jsonrpc": "2.0", "id": req.get("id"), "result": found}

        return Indexed(chain).start()


def _server(port: int, broker: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    return subprocess.Popen([sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--api-key", API_KEY, "--broker", broker,
                             "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "serve.log", "wb"),  # noqa: SIM115
                            env=env)


@contextlib.asynccontextmanager
async def _database(server: str) -> Any:
    """A fresh database on the PostgreSQL at ``server`` (a postgresql:// URL without a
    database, or with one: replaced); yields its URL, drops it afterwards."""
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    parts = urlsplit(server)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")), timeout=5)
    name = f"fastws_backlog_{secrets.token_hex(4)}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def catch_up(blocks: int, broker: str, tree: Path | None,
                   store: str | None = None) -> dict[str, float]:
    """Index ``blocks`` blocks of one event each from block 0 of their range; returns
    events, seconds from the indexer's start, and events/s from first to last event.
    ``store``: a PostgreSQL server to keep the events in too (``--store``)."""
    if store is None:
        return await _catch_up(blocks, broker, tree, None)
    import asyncpg

    async with _database(store) as url:
        res = await _catch_up(blocks, broker, tree, url)
        con = await asyncpg.connect(url, timeout=5)
        try:
            rows = await con.fetchval("SELECT count(*) FROM fastws_events")
        finally:
            await con.close()
        if rows != blocks:
            raise RuntimeError(f"{rows} rows in fastws_events for {blocks} events")
        res["rows"] = rows
        return res


async def _catch_up(blocks: int, broker: str, tree: Path | None,
                    store: str | None) -> dict[str, float]:
    from websockets.asyncio.client import connect

    from fastws.indexer.demo_chain import DemoChain, to_rpc_json

    chain = DemoChain(contracts=0)
    addr = chain.deploy()
    first = chain.head() + 1
    contract = chain._contract(addr)
    with chain.lock:
        end = chain.w3.eth.get_block("latest")["timestamp"] + 10**6
    receipts = [chain._transact(contract.functions.createMarket("Backlog?", end), chain.owner)]
    for i in range(blocks - 1):
        receipts.append(chain._transact(contract.functions.placeBet(0, i % 2 == 0),
                                        chain.accounts[1 + i % 5], 10**15))
    chain.mine(1)  # the last event's confirmation
    logs = [to_rpc_json(dict(lg)) for r in receipts for lg in r["logs"]]
    rpc = _IndexedRpc.start(chain, logs)
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fastws-backlog-"))
    server = _server(port, broker, workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    cwd = tree or Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(cwd)
    proc: subprocess.Popen[bytes] | None = None
    try:
        await _wait_port(port, server)
        async with connect(f"ws://127.0.0.1:{port}/ws", proxy=None,
                           max_size=None) as ws:
            await ws.send(json.dumps({"id": 1, "type": "subscribe",
                                      "channel": f"market:{addr}"}))
            while json.loads(await ws.recv()).get("type") != "subscribed":
                pass
            start = time.perf_counter()
            keep = (["--store", store] if store else
                    ["--checkpoint", str(workdir / "cp.json")])
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastws", "index", "--rpc", rpc.url, "--contract",
                 addr, "--from-block", str(first), "--confirmations", "1", "--url",
                 f"http://127.0.0.1:{port}", "--api-key", API_KEY, *keep,
                 "--poll-interval", "0.05", "--log-level",
                 "warning"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                stderr=open(workdir / "index.log", "wb"))  # noqa: SIM115
            got = 0
            t_first = t_last = 0.0
            while got < blocks:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                except TimeoutError:
                    raise RuntimeError(f"{got} of {blocks} events arrived") from None
                if msg.get("type") == "event":
                    got += 1
                    t_last = time.perf_counter()
                    if got == 1:
                        t_first = t_last
    finally:
        if proc is not None:
            _stop(proc)
        _stop(server)
        rpc.stop()
    return {"events": blocks, "seconds": t_last - start, "first": t_first - start,
            "rate": (blocks - 1) / (t_last - t_first) if t_last > t_first else 0.0}


async def commit_rate(server: str, events: int, batch: int) -> float:
    """Rows/s of the indexer's store commit (rows and checkpoint in one transaction),
    ``batch`` events per transaction, into a fresh database on ``server``."""
    from fastws.indexer.checkpoint import Checkpoint, PublishedEvent
    from fastws.indexer.store import EventStore

    async with _database(server) as url:
        store = EventStore(url)
        await store.connect()
        chain = store.chain("bench", "bench")
        cp = Checkpoint(chain_id=1, contracts=["0x" + "11" * 20], block=0)
        t0 = time.perf_counter()
        for first in range(0, events, batch):
            datas = [{"eventType": "BetPlaced", "marketAddress": "0x" + "11" * 20,
                      "blockNumber": n, "blockHash": f"0x{n:064x}", "txHash": f"0x{n:064x}",
                      "logIndex": 0, "timestamp": 1_700_000_000 + n,
                      "args": {"marketId": 1, "bettor": "0x" + "22" * 20, "outcome": True,
                               "amount": "1000000000000000000"},
                      "network": "bench", "chainId": 1}
                     for n in range(first, min(events, first + batch))]
            cp.block = datas[-1]["blockNumber"]
            cp.pending = [PublishedEvent(f"1:{d['txHash']}:0", d) for d in datas]
            await chain.commit(cp, datas, [])
            cp.pending = []
            await chain.save(cp)          # what the indexer does once they are published
        elapsed = time.perf_counter() - t0
        await store.close()
        return events / elapsed


async def api_rate(batch: int, broker: str, seconds: float, inflight: int) -> float:
    """Publications/s that one server accepts through ``POST /api/publish``."""
    import aiohttp

    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fastws-apibench-"))
    server = _server(port, broker, workdir)
    url = f"http://127.0.0.1:{port}/api/publish"
    done = 0
    try:
        await _wait_port(port, server)
        conn = aiohttp.TCPConnector(limit=inflight)
        async with aiohttp.ClientSession(connector=conn, headers={
                "Authorization": f"Bearer {API_KEY}",
                "Content-Type": "application/json"}) as session:
            stop_at = time.perf_counter() + seconds

            async def worker(w: int) -> None:
                nonlocal done
                n = 0
                while time.perf_counter() < stop_at:
                    items = [{"channel": f"events:bench{(w + i) % 8}",
                              "data": {"w": w, "n": n + i}} for i in range(batch)]
                    body = json.dumps(items if batch > 1 else items[0])
                    async with session.post(url, data=body) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")
                    n += batch
                    done += batch

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(inflight)))
            return done / (time.perf_counter() - t0)
    finally:
        _stop(server)


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.indexer_backlog``: print the catch-up rate (or the API's)."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.indexer_backlog",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2000,
                        help="blocks of one event each to catch up on (default 2000)")
    parser.add_argument("--broker", default="memory://", help="the server's --broker")
    parser.add_argument("--tree", type=Path, default=None,
                        help="source tree to run `fastws index` from (default: this one)")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="a PostgreSQL server (postgresql://user@host:port): the indexer "
                             "keeps the events there too, in a database the tool creates "
                             "and drops")
    parser.add_argument("--commits", type=int, default=0, metavar="N",
                        help="with --store: time N events committed to the store alone")
    parser.add_argument("--batch", type=int, default=100,
                        help="--commits: events per transaction (default 100)")
    parser.add_argument("--api", type=int, default=0, metavar="BATCH",
                        help="measure POST /api/publish with BATCH publications per request")
    parser.add_argument("--seconds", type=float, default=5.0, help="--api: duration")
    parser.add_argument("--inflight", type=int, default=16, help="--api: requests in flight")
    args = parser.parse_args(argv)
    if args.blocks < 2 or args.api < 0 or args.seconds <= 0 or args.inflight < 1:
        parser.error("--blocks must be at least 2, --seconds and --inflight positive")
    if args.commits and not args.store:
        parser.error("--commits needs --store postgresql://user@host:port")
    with contextlib.suppress(KeyboardInterrupt):
        if args.commits:
            rate = asyncio.run(commit_rate(args.store, args.commits, max(1, args.batch)))
            print(f"store commits, {args.batch} events per transaction with the checkpoint: "
                  f"{rate:,.0f} rows/s")
            return 0
        if args.api:
            rate = asyncio.run(api_rate(args.api, args.broker, args.seconds, args.inflight))
            print(f"POST /api/publish, {args.api} per request, {args.inflight} in flight, "
                  f"broker {args.broker}: {rate:,.0f} publications/s")
            return 0
        res: dict[str, Any] = asyncio.run(catch_up(args.blocks, args.broker, args.tree,
                                                   args.store))
        stored = ", store on (every event a row)" if args.store else ""
        print(f"backlog of {res['events']} events (×2 publications), broker {args.broker}"
              f"{stored}: "
              f"{res['rate']:,.0f} events/s first to last event; from the indexer's start "
              f"{res['first']:.2f} s to the first event, {res['seconds']:.2f} s to the last "
              f"({res['events'] / res['seconds']:,.0f} events/s)")
        return 0
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
