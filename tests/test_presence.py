"""Presence across nodes on Redis: a killed node's clients leave within one TTL."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest
import redis.asyncio as aioredis
from wsclient import connect

from fastws.broker.redis import PRESENCE_REFRESH, PRESENCE_TTL
from fastws.broker.redis_scripts import presence_keys

pytestmark = pytest.mark.timeout(90)

CONFIG = """
[namespaces.chat]
presence = true
"""


async def test_killed_node_clients_leave_within_one_ttl(redis_server, fastws_server):
    """SIGKILL a node: its client stays listed at most one TTL (its expiry is never
    moved again, while the live node keeps refreshing its own), then is gone; a closed
    connection leaves at once, with a `leave` push across nodes."""
    n1 = fastws_server("--broker", redis_server.url, config=CONFIG)
    n2 = fastws_server("--broker", redis_server.url, config=CONFIG)
    room = f"chat:{uuid.uuid4().hex[:10]}"
    a = await connect(n1.ws_url)
    await a.request({"id": 1, "type": "subscribe", "channel": room})
    b = await connect(n2.ws_url)
    await b.request({"id": 1, "type": "subscribe", "channel": room})
    join = await a.recv()
    assert join["type"] == "join" and join["channel"] == room
    dead = join["client"]
    listed = await a.request({"id": 2, "type": "presence", "channel": room})
    (alive,) = {c["client"] for c in listed["clients"]} - {dead}

    n2.stop(signal.SIGKILL)
    killed_ms = time.time() * 1000
    _, zkey = presence_keys(room)
    r = aioredis.from_url(redis_server.url)
    try:
        before = dict(await r.zrange(zkey, 0, -1, withscores=True))
        assert before[dead.encode()] <= killed_ms + PRESENCE_TTL * 1000 + 1000
        # the live node refreshes its own entry; nobody refreshes the dead node's
        deadline = time.monotonic() + PRESENCE_REFRESH + 5
        while True:
            now = dict(await r.zrange(zkey, 0, -1, withscores=True))
            if now[alive.encode()] > before[alive.encode()]:
                break
            assert time.monotonic() < deadline, "the live node never refreshed"
            await asyncio.sleep(0.2)
        assert now[dead.encode()] == before[dead.encode()]
        listed = await a.request({"id": 3, "type": "presence", "channel": room})
        assert {c["client"] for c in listed["clients"]} == {alive, dead}  # within the TTL
        # one TTL later (moved forward for the dead entry only): it is gone
        await r.zadd(zkey, {dead: before[dead.encode()] - PRESENCE_TTL * 1000 - 1000})
        listed = await a.request({"id": 4, "type": "presence", "channel": room})
        assert [c["client"] for c in listed["clients"]] == [alive]
    finally:
        await r.aclose()

    c = await connect(n1.ws_url)  # a fresh member on the live node, then its instant leave
    await c.request({"id": 1, "type": "subscribe", "channel": room})
    joined = await a.recv()
    c.close()
    left = await a.recv(timeout=2.0)
    assert left == {**joined, "type": "leave"}
    a.close()
