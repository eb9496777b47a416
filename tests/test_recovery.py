"""Subscribe with ``since``: nothing lost, nothing twice, on the memory and Redis brokers.

Real servers, real redis-server, raw clients (tests/wsclient.py).  Every check counts
exact offsets: a recovered subscription must see each offset after its position once,
in order, whatever was published while it subscribed.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from wsclient import RawClient, connect

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[limits]
messages_per_connection = 100000
[namespaces.rec]
publish = "anyone"
history_size = 1000
history_ttl = 300
"""


def uniq(prefix: str = "rec") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "redis"])
def node(request, fastws_server):
    """One node on the memory broker, or on a fresh redis-server."""
    if request.param == "memory":
        return fastws_server(config=CONFIG)
    redis_server = request.getfixturevalue("redis_server")
    srv = fastws_server("--broker", redis_server.url, config=CONFIG)
    srv.redis_url = redis_server.url
    return srv


async def collect_until(c: RawClient, sub_id: int, channel: str, last: int,
                        timeout: float = 20.0) -> tuple[dict, list[int]]:
    """Read until the `subscribed` reply with ``sub_id`` and the event at offset ``last``
    of ``channel``; returns (reply, offsets of ``channel``'s events in arrival order)."""
    reply: dict | None = None
    offsets: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while reply is None or not offsets or offsets[-1] < last:
        m = await c.recv(max(0.1, deadline - loop.time()))
        if m.get("id") == sub_id:
            assert m["type"] == "subscribed", m
            reply = m
        elif m.get("type") == "event" and m["channel"] == channel:
            offsets.append(m["offset"])
    return reply, offsets


async def test_since_while_publishing(node):
    """Subscribers join with `since` while a publisher runs: each sees every offset after
    its position exactly once, in order (history first, then the live stream)."""
    ch = uniq()
    pub = await connect(node.ws_url)
    first = await pub.request({"id": 1, "type": "publish", "channel": ch, "data": 1})
    epoch = first["epoch"]
    total = 400

    async def publisher() -> None:
        for i in range(2, total + 1):
            pub.send({"id": i, "type": "publish", "channel": ch, "data": i})
            if i % 8 == 0:
                await asyncio.sleep(0)  # let subscribes interleave with publications
        while True:
            m = await pub.recv()
            if m.get("id") == total:
                return

    async def subscriber(k: int) -> None:
        await asyncio.sleep(k * 0.002)
        c = await connect(node.ws_url)
        since = k % 5  # 0..4: every subscriber has something to recover
        c.send({"id": 1, "type": "subscribe", "channel": ch,
                "since": {"offset": since, "epoch": epoch if since else ""}})
        reply, offsets = await collect_until(c, 1, ch, total)
        assert reply["recovered"] is True
        assert offsets == list(range(since + 1, total + 1)), (k, since, offsets[:20])
        c.close()

    await asyncio.gather(publisher(), *(subscriber(k) for k in range(40)))
    pub.close()


async def test_recovered_false_after_flushall(redis_server, fastws_server):
    """FLUSHALL loses every stream: a `since` in the old epoch gives recovered:false and
    nothing of the old stream; the new epoch's position then recovers normally."""
    srv = fastws_server("--broker", redis_server.url, config=CONFIG)
    ch = uniq()
    old = [srv.publish(ch, i) for i in range(3)]
    r = aioredis.from_url(redis_server.url)
    try:
        await r.flushall()
    finally:
        await r.aclose()
    c = await connect(srv.ws_url)
    reply = await c.request({"id": 1, "type": "subscribe", "channel": ch,
                             "since": {"offset": 2, "epoch": old[0]["epoch"]}})
    assert reply["recovered"] is False
    new = srv.publish(ch, "fresh")
    assert new["offset"] == 1 and new["epoch"] != old[0]["epoch"]
    ev = await c.recv()
    assert (ev["type"], ev["offset"], ev["data"]) == ("event", 1, "fresh")
    d = await connect(srv.ws_url)
    reply = await d.request({"id": 1, "type": "subscribe", "channel": ch,
                             "since": {"offset": 2, "epoch": old[0]["epoch"]}})
    assert reply["recovered"] is False and d.messages.empty()
    e = await connect(srv.ws_url)
    e.send({"id": 1, "type": "subscribe", "channel": ch,
            "since": {"offset": 0, "epoch": new["epoch"]}})
    reply, offsets = await collect_until(e, 1, ch, 1)
    assert reply["recovered"] is True and offsets == [1]
    for x in (c, d, e):
        x.close()


async def test_pattern_since_while_publishing(node):
    """A pattern recovers from its namespace's log: subscribers joining with `since` (a
    `ns_offset`/`ns_epoch` seen on an event) while three channels are published get
    exactly the events the pattern matches after that position, once, in log order."""
    base = uniq()
    chans = [f"{base}-a", f"{base}-b", f"{base}-c"]
    pattern = f"{base}-[ab]"
    watcher = await connect(node.ws_url)
    await watcher.request({"id": 1, "type": "subscribe", "channel": pattern})
    pub = await connect(node.ws_url)
    for i, ch in enumerate(chans):  # positions to recover from
        await pub.request({"id": i + 1, "type": "publish", "channel": ch, "data": i})
    seen = [await watcher.recv() for _ in range(2)]
    assert [e["channel"] for e in seen] == chans[:2] and all("ns_offset" in e for e in seen)
    total = 300

    async def publisher() -> None:
        for i in range(10, total + 10):
            pub.send({"id": i, "type": "publish", "channel": chans[i % 3], "data": i})
            if i % 8 == 0:
                await asyncio.sleep(0)
        while (await pub.recv()).get("id") != total + 9:
            pass

    truth: list[tuple[str, int]] = [(e["channel"], e["offset"]) for e in seen]
    want = 2 + sum(1 for i in range(10, total + 10) if i % 3 != 2)

    async def watch() -> None:
        while len(truth) < want:
            e = await watcher.recv()
            truth.append((e["channel"], e["offset"]))

    got: dict[int, tuple[int, list[tuple[str, int]]]] = {}

    async def subscriber(k: int) -> None:
        await asyncio.sleep(k * 0.002)
        c = await connect(node.ws_url)
        start = seen[k % 2]
        c.send({"id": 1, "type": "subscribe", "channel": pattern,
                "since": {"offset": start["ns_offset"], "epoch": start["ns_epoch"]}})
        events: list[tuple[str, int]] = []
        reply = None
        while reply is None or len(events) < want - 1 - k % 2:
            m = await c.recv()
            if m.get("id") == 1:
                reply = m
            elif m.get("type") == "event":
                events.append((m["channel"], m["offset"]))
        assert reply["recovered"] is True, reply
        got[k] = (k % 2, events)
        c.close()

    await asyncio.gather(publisher(), watch(), *(subscriber(k) for k in range(30)))
    for skip, events in got.values():
        assert events == truth[skip + 1:], (skip, events[:10], truth[:10])
    watcher.close()
    pub.close()


async def test_pattern_across_namespaces_is_not_recovered(node):
    """A pattern spanning namespaces has no log to recover from: recovered:false."""
    c = await connect(node.ws_url)
    reply = await c.request({"id": 1, "type": "subscribe", "channel": "*:x",
                             "since": {"offset": 1, "epoch": "e"}})
    assert reply["recovered"] is False
    c.close()
