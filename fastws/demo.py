"""``serve --demo``: two embedded chains, a demo driver and the indexer, in-process.

:func:`run_demo` starts one thread that holds two eth-tester (py-evm) chains, the
networks of :data:`NETWORKS` (``l1``, the chain of the documented addresses, and
``l2``, another chain id and deployer), each with two ``PredictionMarket`` contracts,
a driver per chain that sends one transaction every ``interval`` seconds or so (create
a market, bet on one, resolve one), and the real indexer (:mod:`fastws.indexer`)
reading each chain and publishing into the node, as ``fastws index`` would:
``events:market_created``, ``events:bet_placed``, ``events:market_resolved`` and
``market:<contract address>``, every event with its ``network`` and ``chainId`` (SPEC
§14), as ``fastws index --config chains.toml`` does with two ``[chains.NAME]`` tables.
The chains live in their own thread so that py-evm's CPU work does not stall the
server's event loop; the publications hop onto the node's loop.

The chain's market contracts are deployed by a ``MarketFactory``; the indexer watches
the factory and the first contracts and follows ``MarketDeployed.market``, so a market
contract the driver deploys later (``events:market_deployed``) is indexed from its
first block on, like ``fastws index --follow``.

The demo indexes with 1 confirmation (the embedded chain never reorganizes), and the
chain's mining hook wakes the indexer at each block (as ``eth_subscribe("newHeads")``
does for ``fastws index --rpc ws://``), so events show up as soon as their block is
mined.  py-evm keeps every block in memory (~8 KB
each), so after ``MAX_BLOCKS`` blocks the demo starts over on a fresh chain (block
numbers start again from 0).  Needs the ``chain`` extra (``web3[tester]``:
``pip install 'fastws[chain]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastws.node import Node

__all__ = ["NETWORKS", "run_demo"]

log = logging.getLogger("fastws.demo")
STOP_TIMEOUT = 5.0
MAX_BLOCKS = 10_000   # ~3 hours at the default pace, ~80 MB of py-evm state per chain
# (network, chain id, deploying account): l1 is eth-tester's chain id and account 0 (the
# documented FACTORY_ADDRESS and MARKET_ADDRESSES), l2 another chain id and deployer
NETWORKS: tuple[tuple[str, int | None, int], ...] = (("l1", None, 0), ("l2", 31337, 1))


async def run_demo(node: Node, interval: float = 1.0, contracts: int = 2) -> None:
    """Run the demo chain, driver and indexer for ``node`` until cancelled."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    state: dict[str, Any] = {}

    def finish(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def thread_main() -> None:
        error: BaseException | None = None
        try:
            import uvloop

            uvloop.run(_demo(node, loop, interval, contracts, state))
        except asyncio.CancelledError:
            pass
        except ImportError as exc:
            log.error("serve --demo needs the 'chain' extra (web3[tester]: eth-tester, "
                      "py-evm): pip install 'fastws[chain]' (%s)", exc)
            error = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the server's loop
            log.exception("the demo chain stopped")
            error = exc
        with contextlib.suppress(RuntimeError):   # the server's loop may be closed
            loop.call_soon_threadsafe(finish, error)

    thread = threading.Thread(target=thread_main, name="fastws-demo-chain", daemon=True)
    thread.start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        demo_loop, task = state.get("loop"), state.get("task")
        if demo_loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):
                demo_loop.call_soon_threadsafe(task.cancel)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(done), STOP_TIMEOUT)
        raise


async def _demo(node: Node, node_loop: asyncio.AbstractEventLoop, interval: float,
                contracts: int, state: dict[str, Any]) -> None:
    state["loop"] = asyncio.get_running_loop()
    state["task"] = asyncio.current_task()
    from fastws.indexer.metrics import IndexerCollector
    from fastws.indexer.runner import IndexerStats

    stats = [IndexerStats(network=network) for network, _, _ in NETWORKS]
    extra = getattr(node, "extra_collectors", None)
    if isinstance(extra, list):
        extra.append(IndexerCollector(stats))

    async def network(n: int) -> None:
        name, chain_id, owner = NETWORKS[n]
        while True:   # a fresh chain every MAX_BLOCKS blocks: py-evm keeps every block
            await _one_chain(node, node_loop, interval, contracts, stats[n], name,
                             chain_id, owner)

    await asyncio.gather(*(network(n) for n in range(len(NETWORKS))))


async def _one_chain(node: Node, node_loop: asyncio.AbstractEventLoop, interval: float,
                     contracts: int, stats: Any, network: str = "l1",
                     chain_id: int | None = None, owner: int = 0) -> None:
    from fastws.indexer.checkpoint import MemoryCheckpoint
    from fastws.indexer.demo_chain import FOLLOW, DemoChain
    from fastws.indexer.heads import ChainHeads
    from fastws.indexer.mapping import EventCodec, Follow
    from fastws.indexer.publish import NodePublisher
    from fastws.indexer.runner import Indexer
    from fastws.indexer.source import LogSource, TesterRpc

    chain = DemoChain(contracts, chain_id=chain_id, owner=owner)
    heads = ChainHeads()                 # woken at each block, as by a node's newHeads
    chain.block_listeners.append(heads.notify)
    abi = chain.factory_abi + chain.abi
    # the factory and the contracts it deployed so far, from the next block on (their
    # deployment is history); the ones it deploys later are found through FOLLOW
    source = LogSource(TesterRpc(chain.request), [chain.factory_address, *chain.addresses],
                       on_fault=stats.fault)
    indexer = Indexer(source, EventCodec(abi), NodePublisher(node, node_loop),
                      MemoryCheckpoint(), confirmations=1, from_block=chain.head() + 1,
                      poll_interval=min(0.25, interval), stats=stats,
                      follow=Follow.parse(FOLLOW, abi), heads=heads, network=network,
                      chain_id=chain.chain_id)
    await indexer.open()
    log.info("demo chain %s (chain id %d): factory %s, contracts %s", network, chain.chain_id,
             chain.factory_address, ", ".join(chain.addresses))
    idx = asyncio.get_running_loop().create_task(indexer.run())
    rng = chain.rng
    try:
        while chain.head() < MAX_BLOCKS:
            if idx.done():
                idx.result()         # the indexer died: surface why
            try:
                chain.tick()
            except Exception as exc:  # noqa: BLE001 - a reverted demo transaction: go on
                log.warning("demo transaction failed: %s", exc)
            await asyncio.sleep(interval * rng.uniform(0.5, 1.5))
        log.info("demo chain reached %d blocks: starting a fresh one", MAX_BLOCKS)
    finally:
        idx.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await idx
