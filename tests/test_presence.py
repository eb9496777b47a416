"""Presence across nodes on Redis when a node dies or stalls: the survivors sweep its
expired entries and push `leave` (once), as a clean disconnect would."""

from __future__ import annotations

import asyncio
import operator
import signal
import time

import pytest
import redis.asyncio as aioredis
from redis_helpers import PRESENCE_TUNED, PRESENCE_WINDOW, presence_of, sub, uniq
from wsclient import RawClient, connect

from fastws.broker.redis_scripts import presence_keys

pytestmark = pytest.mark.timeout(90)

CONFIG = """
[namespaces.chat]
presence = true
"""

REFRESH = PRESENCE_TUNED["PRESENCE_REFRESH"]
TUNED, WINDOW = PRESENCE_TUNED, PRESENCE_WINDOW


async def until_refreshed(r: aioredis.Redis, room: str, clients: list[str]) -> None:
    """Until each of ``clients``' entries has been re-added by its node (its expiry
    moved on since this call): every sweep those nodes began before it is done."""
    _, zkey = presence_keys(room)
    before = dict(await r.zrange(zkey, 0, -1, withscores=True))
    deadline = time.monotonic() + 10
    while True:
        now = dict(await r.zrange(zkey, 0, -1, withscores=True))
        if all(now.get(c.encode(), 0) > before.get(c.encode(), 0) for c in clients):
            return
        assert time.monotonic() < deadline, "the live nodes stopped refreshing"
        await asyncio.sleep(REFRESH / 4)


async def pushes_until_marker(c: RawClient, marker: str) -> list[dict]:
    """Every push ``c`` gets before the event whose data is ``marker``."""
    out = []
    while True:
        m = await c.recv()
        if m.get("type") == "event" and m.get("data") == marker:
            return out
        out.append(m)


async def test_killed_node_clients_leave_with_one_push_each(redis_server, tuned_server):
    """SIGKILL a node: a watcher on each of two surviving nodes gets its client's
    `leave` within one window (expiry + one sweep interval), exactly as a clean leave
    looks, and exactly once although both nodes sweep; presence no longer lists it."""
    a_node, b_node, c_node = (tuned_server(TUNED, "--broker", redis_server.url,
                                           config=CONFIG) for _ in range(3))
    room = uniq("chat")
    a = await connect(a_node.ws_url)
    await sub(a, room, 1)
    c = await connect(c_node.ws_url)
    await sub(c, room, 1)
    assert (await a.recv())["type"] == "join"          # c's
    b = await connect(b_node.ws_url)
    await sub(b, room, 1)
    join = await a.recv()
    assert join["type"] == "join" and join["channel"] == room
    assert await c.recv() == join
    dead = join["client"]
    alive = await presence_of(a, room, 2) - {dead}
    assert len(alive) == 2

    b_node.stop(signal.SIGKILL)
    killed = time.monotonic()
    leave_a = await a.recv(timeout=WINDOW + 5)
    took = time.monotonic() - killed
    assert leave_a == {**join, "type": "leave"}          # as a normal leave looks
    assert await c.recv(timeout=WINDOW + 5) == leave_a
    assert took < WINDOW + 1.0, f"the leave came {took:.2f} s after the kill"
    assert await presence_of(a, room, 3) == alive
    assert await presence_of(c, room, 3) == alive

    # exactly once: both survivors have swept again since, then a marker publication
    r = aioredis.from_url(redis_server.url)
    try:
        await until_refreshed(r, room, sorted(alive))
    finally:
        await r.aclose()
    await asyncio.to_thread(a_node.publish, room, "marker")
    assert await pushes_until_marker(a, "marker") == []
    assert await pushes_until_marker(c, "marker") == []
    print(f"leave pushed {took:.2f} s after SIGKILL (window {WINDOW:.1f} s)")
    for client in (a, c):
        client.close()


async def test_stalled_node_clients_leave_and_join_again(redis_server, tuned_server):
    """A node that stops refreshing for longer than the expiry (SIGSTOP) looks dead to
    the others: its client leaves; once it runs again its refresh adds the client back
    with a `join`.  Its own subscribers, for whom the client never left, see neither."""
    a_node, b_node = (tuned_server(TUNED, "--broker", redis_server.url, config=CONFIG)
                      for _ in range(2))
    room = uniq("chat")
    a = await connect(a_node.ws_url)
    await sub(a, room, 1)
    b = await connect(b_node.ws_url)
    await sub(b, room, 1)
    watcher = await connect(b_node.ws_url)              # b's node-mate
    await sub(watcher, room, 1)
    joins = [await a.recv(), await a.recv()]            # b's and the watcher's
    assert {m["type"] for m in joins} == {"join"}
    everyone = await presence_of(a, room, 2)
    assert len(everyone) == 3
    b_node.proc.send_signal(signal.SIGSTOP)
    try:
        leaves = [await a.recv(timeout=WINDOW + 5) for _ in range(2)]
    finally:
        b_node.proc.send_signal(signal.SIGCONT)
    key = operator.itemgetter("client")
    assert sorted(leaves, key=key) == sorted(({**m, "type": "leave"} for m in joins), key=key)
    back = [await a.recv(timeout=WINDOW + 5) for _ in range(2)]
    assert sorted(back, key=key) == sorted(joins, key=key)
    assert await presence_of(a, room, 3) == everyone
    assert await presence_of(watcher, room, 3) == everyone
    await asyncio.to_thread(a_node.publish, room, "marker")
    assert await pushes_until_marker(watcher, "marker") == []
    assert await pushes_until_marker(a, "marker") == []
    for client in (a, b, watcher):
        client.close()
