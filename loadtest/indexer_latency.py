"""Block → WebSocket client latency of ``fastws index``: polling vs newHeads.

``python -m loadtest.indexer_latency [--blocks N] [--poll-interval S]`` runs, on this
machine, a demo chain (eth-tester) served over HTTP and WebSocket JSON-RPC
(:class:`~fastws.indexer.demo_chain.RpcServer`, :class:`WsRpcServer`), a
``fastws serve`` process, and a WebSocket client subscribed to ``market:<address>``.
For each mode it starts a ``fastws index`` process, once with ``--rpc http://…``
(polling every ``--poll-interval``) and once with ``--rpc ws://…`` (woken by
``eth_subscribe newHeads``), then mines ``--blocks`` blocks with one bet each, at random
moments, and times each from the moment the block is mined (the chain's mining hook)
to the moment the client receives the event (same process, same clock).  Prints one
line per mode: min, median, p90, max and mean in milliseconds.  See docs/indexer.md.

``python -m loadtest.indexer_latency --chains [--blocks N] [--rpc ws|http]`` instead
runs two chains (two eth-tester chains, two chain ids, each served on its own port)
and one ``fastws index --config chains.toml`` indexing both at once, mines a bet on
each chain at random moments, the two chains concurrently, and prints one line per
network: block mined → event at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "measure", "measure_chains"]

API_KEY = "latency-key"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _run_mode(chain: Any, rpc_url: str, http_url: str, ws_url: str, blocks: int,
                    poll: float, workdir: Path, rng: random.Random) -> list[float]:
    """Latencies (seconds) of ``blocks`` bets through an indexer reading ``rpc_url``."""
    from websockets.asyncio.client import connect

    addr = chain.deploy()
    mined: dict[int, float] = {}

    def on_block(block: dict[str, Any]) -> None:
        mined[int(block["number"])] = time.perf_counter()

    chain.block_listeners.append(on_block)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    log = open(workdir / f"index-{rpc_url.split(':')[0]}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastws", "index", "--rpc", rpc_url, "--contract", addr,
         "--from-block", str(chain.head() + 1), "--confirmations", "1", "--url", http_url,
         "--api-key", API_KEY, "--checkpoint", str(workdir / f"cp-{addr}.json"),
         "--poll-interval", str(poll), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    loop = asyncio.get_running_loop()
    out: list[float] = []
    try:
        async with connect(ws_url, proxy=None) as ws:
            await ws.send(json.dumps({"id": 1, "type": "subscribe",
                                      "channel": f"market:{addr}"}))

            async def next_event(tx_block: int) -> float:
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if msg.get("type") == "event" and msg["data"]["blockNumber"] == tx_block:
                        return time.perf_counter()

            # warm-up: the indexer is running and caught up once this arrives
            mid = await loop.run_in_executor(None, chain.create_market, addr, "Warm-up?")
            await next_event(chain.head())
            for i in range(blocks):
                await asyncio.sleep(0.2 + rng.uniform(0, poll))   # a random phase
                await loop.run_in_executor(None, chain.place_bet, addr, mid, i % 2 == 0,
                                           10**15, 1 + i % 5)
                number = chain.head()
                received = await next_event(number)
                out.append(received - mined[number])
    finally:
        _stop(proc)
        log.close()
        chain.block_listeners.remove(on_block)
    return out


def _summary(name: str, xs: list[float]) -> str:
    ms = sorted(x * 1000 for x in xs)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return (f"{name:<28} n={len(ms):<3} min {ms[0]:7.1f}  median {statistics.median(ms):7.1f}"
            f"  p90 {p90:7.1f}  max {ms[-1]:7.1f}  mean {statistics.fmean(ms):7.1f} ms")


async def measure(blocks: int = 30, poll: float = 1.0, seed: int = 1) -> dict[str, list[float]]:
    """Run both modes; returns their latencies (seconds) by mode name."""
    from fastws.indexer.demo_chain import DemoChain, RpcServer, WsRpcServer

    rng = random.Random(seed)
    chain = DemoChain(contracts=0, rng=random.Random(seed))
    http_rpc = RpcServer(chain).start()
    ws_rpc = WsRpcServer(chain).start()
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fastws-latency-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    server = subprocess.Popen([sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--api-key", API_KEY, "--log-level",
                               "warning"], stdout=subprocess.DEVNULL,
                              stderr=open(workdir / "serve.log", "wb"), env=env)  # noqa: SIM115
    results: dict[str, list[float]] = {}
    try:
        await _wait_port(port, server)
        http_url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
        results[f"polling every {poll:g}s (http)"] = await _run_mode(
            chain, http_rpc.url, http_url, ws_url, blocks, poll, workdir, rng)
        results["newHeads subscription (ws)"] = await _run_mode(
            chain, ws_rpc.url, http_url, ws_url, blocks, poll, workdir, rng)
    finally:
        _stop(server)
        ws_rpc.stop()
        http_rpc.stop()
    return results


async def measure_chains(blocks: int = 30, rpc: str = "ws", poll: float = 1.0,
                         seed: int = 1) -> dict[str, list[float]]:
    """Two chains indexed by one ``fastws index --config``: block → client latencies
    (seconds) by network, bets mined on both chains concurrently."""
    from websockets.asyncio.client import connect

    from fastws.indexer.demo_chain import DemoChain, RpcServer, WsRpcServer

    rng = random.Random(seed)
    chains = {"alpha": DemoChain(contracts=0, rng=random.Random(seed)),
              "beta": DemoChain(contracts=0, rng=random.Random(seed + 1), chain_id=31337,
                                owner=1)}
    servers = [(RpcServer(c) if rpc == "http" else WsRpcServer(c)).start()
               for c in chains.values()]
    addrs = {name: c.deploy() for name, c in chains.items()}
    mined: dict[tuple[str, int], float] = {}
    for name, chain in chains.items():
        chain.block_listeners.append(
            lambda block, name=name: mined.__setitem__((name, int(block["number"])),
                                                       time.perf_counter()))
    workdir = Path(tempfile.mkdtemp(prefix="fastws-latency-chains-"))
    config = workdir / "chains.toml"
    config.write_text("".join(
        f'[chains.{name}]\nrpc = "{srv.url}"\ncontracts = ["{addrs[name]}"]\n'
        f"from_block = {chain.head() + 1}\nconfirmations = 1\nchain_id = {chain.chain_id}\n"
        f"poll_interval = {poll}\n"
        f'checkpoint = "{workdir / (name + ".json")}"\n\n'
        for (name, chain), srv in zip(chains.items(), servers, strict=True)))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    server = subprocess.Popen([sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--api-key", API_KEY, "--log-level",
                               "warning"], stdout=subprocess.DEVNULL,
                              stderr=open(workdir / "serve.log", "wb"), env=env)  # noqa: SIM115
    proc: subprocess.Popen[bytes] | None = None
    loop = asyncio.get_running_loop()
    results: dict[str, list[float]] = {name: [] for name in chains}
    try:
        await _wait_port(port, server)
        log = open(workdir / "index.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastws", "index", "--config", str(config), "--url",
             f"http://127.0.0.1:{port}", "--api-key", API_KEY, "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        async with connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
            waiting: dict[tuple[str, int], asyncio.Future[float]] = {}
            for i, name in enumerate(chains):
                await ws.send(json.dumps({"id": i + 1, "type": "subscribe",
                                          "channel": f"market:{addrs[name]}"}))

            async def read() -> None:
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("type") != "event":
                        continue
                    now = time.perf_counter()
                    fut = waiting.get((msg["data"]["network"], msg["data"]["blockNumber"]))
                    if fut is not None and not fut.done():
                        fut.set_result(now)

            reader = asyncio.ensure_future(read())

            async def event_of(name: str, action: Any, *args: Any) -> float:
                chain = chains[name]
                fut: asyncio.Future[float] = loop.create_future()
                waiting[(name, chain.head() + 1)] = fut     # one transaction, one block
                await loop.run_in_executor(None, action, *args)
                return await asyncio.wait_for(fut, 60)

            async def drive(name: str) -> None:
                chain, addr = chains[name], addrs[name]
                await event_of(name, chain.create_market, addr, "Warm-up?")   # caught up
                for i in range(blocks):
                    await asyncio.sleep(0.2 + rng.uniform(0, poll))           # a random phase
                    number = chain.head() + 1
                    received = await event_of(name, chain.place_bet, addr, 0, i % 2 == 0,
                                              10**15, 1 + i % 5)
                    results[name].append(received - mined[(name, number)])

            try:
                await asyncio.gather(*(drive(name) for name in chains))
            finally:
                reader.cancel()
        log.close()
    finally:
        if proc is not None:
            _stop(proc)
        _stop(server)
        for srv in servers:
            srv.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.indexer_latency``: print the two modes' latencies."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.indexer_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=30, help="blocks per mode (default 30)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="the polling indexer's --poll-interval (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the timing")
    parser.add_argument("--chains", action="store_true",
                        help="two chains indexed by one process: one line per network")
    parser.add_argument("--rpc", choices=("ws", "http"), default="ws",
                        help="--chains: the chains' RPC (ws: newHeads; http: polling)")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.poll_interval <= 0:
        parser.error("--blocks must be at least 1 and --poll-interval above 0")
    with contextlib.suppress(KeyboardInterrupt):
        if args.chains:
            results = asyncio.run(measure_chains(args.blocks, args.rpc, args.poll_interval,
                                                 args.seed))
            print(f"block mined → event at a WebSocket client, two chains in one fastws "
                  f"index ({args.rpc} RPC), {args.blocks} blocks per chain, 1 confirmation, "
                  "all on this machine:")
            for name, xs in results.items():
                print(_summary(f"network {name}", xs))
            return 0
        results = asyncio.run(measure(args.blocks, args.poll_interval, args.seed))
        print(f"block mined → event at a WebSocket client, {args.blocks} blocks per mode, "
              "1 confirmation, all on this machine:")
        for name, xs in results.items():
            print(_summary(name, xs))
        return 0
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
