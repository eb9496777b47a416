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
from conftest import scrape
from wsclient import RawClient, connect

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[limits]
messages_per_connection = 100000
[namespaces.rec]
publish = "anyone"
history_size = 1000
history_ttl = 300
[namespaces.short]
publish = "anyone"
history_size = 2
"""


def uniq(prefix: str = "rec") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


async def recv(c: RawClient) -> dict:
    """The next message: from the queue without a timer when one is waiting (cheap
    enough for a thousand clients reading tens of thousands of events)."""
    if not c.messages.empty():
        return c.messages.get_nowait()
    return await c.recv()


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
    """A pattern recovers from its namespace's log: subscribers joining with `since` (the
    channel, offset and epoch of an event they got) while three channels are published
    get exactly the events the pattern matches after that one, once, in log order."""
    base = uniq()
    chans = [f"{base}-a", f"{base}-b", f"{base}-c"]
    pattern = f"{base}-[ab]"
    watcher = await connect(node.ws_url)
    await watcher.request({"id": 1, "type": "subscribe", "channel": pattern})
    pub = await connect(node.ws_url)
    for i, ch in enumerate(chans):  # positions to recover from
        await pub.request({"id": i + 1, "type": "publish", "channel": ch, "data": i})
    seen = [await watcher.recv() for _ in range(2)]
    assert [e["channel"] for e in seen] == chans[:2]
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
                "since": {"offset": start["offset"], "epoch": start["epoch"],
                          "channel": start["channel"]}})
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


async def _positions(clients: list[RawClient], subs: list[str], count: list[int]
                     ) -> list[dict]:
    """Read ``count[i]`` events on each client; return each one's last position as the
    clients keep it (a pattern's names the channel of its last event)."""
    async def last(i: int) -> dict:
        e: dict = {}
        for _ in range(count[i]):
            e = await recv(clients[i])
            assert e["type"] == "event", e
        if "*" in subs[i] or "[" in subs[i]:
            return {"offset": e["offset"], "epoch": e["epoch"], "channel": e["channel"]}
        return {"offset": e["offset"], "epoch": e["epoch"]}
    return await asyncio.gather(*(last(i) for i in range(len(clients))))


async def test_thousand_clients_reconnect(node):
    """1,000 clients (channels and patterns) disconnect, 500 events are published, all
    reconnect with `since`: each gets exactly the events it missed, in order, once."""
    base = uniq()
    chans = [f"{base}-{k}" for k in range(10)]
    subs = [chans[i % 10] if i % 5 else (f"{base}-[0-4]" if i % 10 else f"{base}-*")
            for i in range(1000)]

    def matching(name: str) -> list[str]:
        if name.endswith("*"):
            return chans
        return chans[:5] if name.endswith("[0-4]") else [name]

    clients = list(await asyncio.gather(*(connect(node.ws_url) for _ in subs)))
    replies = await asyncio.gather(*(
        c.request({"id": 1, "type": "subscribe", "channel": s})
        for c, s in zip(clients, subs, strict=True)))
    assert all(r["type"] == "subscribed" for r in replies)
    pub = await connect(node.ws_url)
    for k, ch in enumerate(chans):  # one event each: every client has a position
        await pub.request({"id": k + 1, "type": "publish", "channel": ch, "data": -1})
    since = await _positions(clients, subs, [len(matching(s)) for s in subs])
    for c in clients:
        c.close()
    await asyncio.gather(*(c.wait_closed() for c in clients))

    for i in range(500):  # missed by everyone: 50 per channel, interleaved
        pub.send({"id": 100 + i, "type": "publish", "channel": chans[i % 10], "data": i})
    while (await pub.recv()).get("id") != 599:
        pass
    order = [(chans[i % 10], 2 + i // 10) for i in range(500)]  # (channel, offset)

    clients = list(await asyncio.gather(*(connect(node.ws_url) for _ in subs)))

    async def resubscribe(c: RawClient, name: str, pos: dict) -> None:
        c.send({"id": 2, "type": "subscribe", "channel": name, "since": pos})
        want = [x for x in order if x[0] in matching(name)]
        got = []
        while True:
            m = await recv(c)
            if m.get("id") == 2:
                assert m["recovered"] is True, (name, m)
                break
            got.append((m["channel"], m["offset"]))
        assert got == want, (name, got[:5], want[:5])
        pong = await c.request({"id": 3, "type": "ping"})  # nothing else came after
        assert pong["type"] == "pong" and c.messages.empty()
        c.close()

    await asyncio.gather(*(resubscribe(c, s, p)
                           for c, s, p in zip(clients, subs, since, strict=True)))
    pub.close()


async def _lose_one(redis_url: str, channel: str, data: bytes = b'"lost"') -> None:
    """Store the channel's next publication in history without publishing it: what a
    node sees when Redis pub/sub dropped a message."""
    from fastws.broker.redis_scripts import keys_for

    meta, stream, _ = keys_for(channel)
    r = aioredis.from_url(redis_url)
    try:
        offset = await r.hincrby(meta, "o", 1)
        await r.xadd(stream, {"d": data}, id=f"{offset}-0")
    finally:
        await r.aclose()


@pytest.mark.parametrize("via", ["next publication", "position check"])
async def test_gap_closes_with_4010_and_recovers(redis_server, fastws_server, via):
    """A publication that never reached the node (lost on pub/sub) is noticed, by the
    jump in offsets of the next one or by the periodic position check: the channel's
    subscribers and the patterns matching it are closed with 4010, and `since` then
    recovers the lost publication."""
    srv = fastws_server("--broker", redis_server.url, config=CONFIG)
    ch = uniq()
    exact, pattern, other = [await connect(srv.ws_url) for _ in range(3)]
    await exact.request({"id": 1, "type": "subscribe", "channel": ch})
    await pattern.request({"id": 1, "type": "subscribe", "channel": ch[:-2] + "*"})
    await other.request({"id": 1, "type": "subscribe", "channel": uniq()})
    first = srv.publish(ch, "one")
    for c in (exact, pattern):
        assert (await c.recv())["offset"] == 1
    await _lose_one(redis_server.url, ch)
    if via == "next publication":
        srv.publish(ch, "three")
    for c in (exact, pattern):  # the position check runs every 10 s
        assert await c.wait_closed(timeout=15.0) == 4010
    assert not other.closed.is_set()
    assert scrape(srv.http_url)["fastws_gaps_total"] == 1
    again = await connect(srv.ws_url)
    again.send({"id": 1, "type": "subscribe", "channel": ch,
                "since": {"offset": 1, "epoch": first["epoch"]}})
    last = 3 if via == "next publication" else 2
    reply, offsets = await collect_until(again, 1, ch, last)
    assert reply["recovered"] is True and offsets == list(range(2, last + 1))
    for c in (other, again):
        c.close()


async def test_pattern_position_gone_is_not_recovered(node):
    """A pattern's position must still be found in the namespace's log (on Redis through
    its channel's history entry, so a trimmed channel entry is gone too); a channel the
    pattern does not match, or no channel at all, gives recovered:false, no replay."""
    ch = uniq("short")
    res = [node.publish(ch, i) for i in range(5)]
    pattern = ch[:-3] + "*"
    c = await connect(node.ws_url)
    for rid, since in enumerate([
            {"offset": 4, "epoch": res[0]["epoch"], "channel": "short:other"},
            {"offset": 4, "epoch": res[0]["epoch"]}]):  # no channel: not a log position
        reply = await c.request({"id": rid + 1, "type": "subscribe", "channel": pattern,
                                 "since": since})
        assert reply["recovered"] is False and c.messages.empty(), (since, reply)
        await c.request({"id": 9, "type": "unsubscribe", "channel": pattern})
    c.send({"id": 10, "type": "subscribe", "channel": pattern,
            "since": {"offset": 1, "epoch": res[0]["epoch"], "channel": ch}})
    if hasattr(node, "redis_url"):  # offset 1 left the channel's history (size 2)
        reply = await c.recv()
        assert reply["id"] == 10 and reply["recovered"] is False and c.messages.empty()
    else:  # the memory broker scans the log itself, which still holds it
        reply, offsets = await collect_until(c, 10, ch, 5)
        assert reply["recovered"] is True and offsets == [2, 3, 4, 5]
    await c.request({"id": 11, "type": "unsubscribe", "channel": pattern})
    c.send({"id": 12, "type": "subscribe", "channel": pattern,
            "since": {"offset": 4, "epoch": res[0]["epoch"], "channel": ch}})
    reply, offsets = await collect_until(c, 12, ch, 5)
    assert reply["recovered"] is True and offsets == [5]
    c.close()


async def test_positioned_subscribe_recovers_without_events(node):
    """A `positioned` subscribe answers where the stream is (a channel's top; for a
    pattern the namespace log's); a client that got no event before it dropped recovers
    from there: exactly what was published meanwhile."""
    ch = uniq()
    pattern = ch[:-2] + "*"
    positions = {}
    for round_, (first, last) in enumerate([(1, 3), (4, 5)]):
        for name in (ch, pattern):
            c = await connect(node.ws_url)
            reply = await c.request({"id": 1, "type": "subscribe", "channel": name,
                                     "positioned": True})
            assert "recovered" not in reply and isinstance(reply["offset"], int), reply
            positions[name] = {"offset": reply["offset"], "epoch": reply["epoch"]}
            c.close()
        if round_ == 0:
            assert positions[ch] == {"offset": 0, "epoch": ""}  # nothing published yet
        for i in range(first, last + 1):
            node.publish(ch, i)
        node.publish(uniq(), "elsewhere")  # in the log, not matched by the pattern
        for name in (ch, pattern):
            c = await connect(node.ws_url)
            c.send({"id": 2, "type": "subscribe", "channel": name, "since": positions[name]})
            reply, offsets = await collect_until(c, 2, ch, last)
            assert reply["recovered"] is True and offsets == list(range(first, last + 1))
            pong = await c.request({"id": 3, "type": "ping"})
            assert pong["type"] == "pong" and c.messages.empty()
            c.close()


async def test_python_client_recovers_subscriptions_that_got_no_event(redis_server,
                                                                    fastws_server):
    """The Python client subscribes `positioned`: a channel and a pattern that saw no
    event before their node was killed recover what another node published meanwhile."""
    import signal

    import fastws

    broker = ("--broker", redis_server.url)
    srv = fastws_server(*broker, config=CONFIG)
    other = fastws_server(*broker, config=CONFIG)
    ch = uniq()
    async with fastws.connect(srv.ws_url, backoff_base=0.05, backoff_cap=0.2) as c:
        sub = await c.subscribe(ch)
        psub = await c.subscribe(ch[:-2] + "*")
        srv.stop(signal.SIGKILL)
        for i in range(3):
            await asyncio.to_thread(other.publish, ch, i)
        await asyncio.to_thread(fastws_server, *broker, config=CONFIG, port=srv.port)
        assert await sub.wait_subscribed(timeout=10) is True
        assert await psub.wait_subscribed(timeout=10) is True
        got = [await c.next_event(timeout=5) for _ in range(3)]
        assert [(e.channel, e.offset, e.data) for e in got] == [(ch, i + 1, i) for i in range(3)]
        with pytest.raises(fastws.RequestTimeout):
            await c.next_event(timeout=0.2)
