"""A built-in demo publisher: seed-style prediction-market events for `serve --demo`.

It publishes through the node like any producer, to ``events:<event>`` and
``market:<address>``, with the field names the first users' indexers use.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from fastws.node import Node

__all__ = ["run_demo", "demo_events"]


def _address() -> str:
    return "0x" + os.urandom(20).hex()


def demo_events(rng: random.Random):
    """Yield an endless stream of (event_name, data) like an indexer would publish."""
    markets: list[str] = []
    block = 1_000_000
    while True:
        block += 1
        if len(markets) < 3 or rng.random() < 0.1:
            name, event = "market_created", "MarketCreated"
            market = _address()
            markets.append(market)
            args = {"question": rng.choice(["Will ETH close above 5k?",
                                            "Will it rain in Paris tomorrow?",
                                            "Will the next block be even?"]),
                    "endTime": int(time.time()) + 3600}
        elif rng.random() < 0.1 and len(markets) > 3:
            name, event = "market_resolved", "MarketResolved"
            market = markets.pop(0)
            args = {"outcome": rng.choice(["YES", "NO"])}
        else:
            name, event = "bet_placed", "BetPlaced"
            market = rng.choice(markets)
            args = {"bettor": _address(), "outcome": rng.choice(["YES", "NO"]),
                    "amount": str(rng.randrange(10**15, 10**19))}
        yield name, market, {
            "eventType": event, "marketAddress": market, "blockNumber": block,
            "txHash": "0x" + os.urandom(32).hex(), "logIndex": 0,
            "timestamp": int(time.time()), "args": args,
        }


async def run_demo(node: Node, interval: float = 1.0) -> None:
    """Publish one demo event every ``interval`` seconds until cancelled."""
    rng = random.Random()
    for name, market, data in demo_events(rng):
        await node.publish(f"events:{name}", data)
        await node.publish(f"market:{market}", data)
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))
