"""Redis Cluster: a 3-master cluster started by the test, sharded pub/sub, patterns, and
faults confined to the shard they happen on."""

from __future__ import annotations

import asyncio
import itertools
import signal

import orjson
import pytest
from conftest import API_KEY, ServerProc, http, scrape
from redis_helpers import (
    PRESENCE_TUNED,
    PRESENCE_WINDOW,
    ApiPublisher,
    api_publish,
    events,
    listening,
    presence_of,
    readyz,
    start_cluster,
    stream_top,
    sub,
    uniq,
    until,
)
from wsclient import RawClient, connect

pytestmark = pytest.mark.timeout(120)

PRESENCE_CONFIG = """
[namespaces.chat]
presence = true
"""


@pytest.fixture(scope="module")
def redis_cluster():
    c = start_cluster()
    yield c
    c.stop()


async def test_cluster_sharded_fanout_patterns_and_raw_publish(redis_cluster, fastws_server):
    n1 = fastws_server("--broker", redis_cluster.url)
    n2 = fastws_server("--broker", redis_cluster.url)
    base = uniq("events")
    channels = [f"{base}:{i}" for i in range(6)]        # spread over the masters
    assert len({redis_cluster.owner(ch) for ch in channels}) > 1
    exact = await connect(n2.ws_url)
    for i, ch in enumerate(channels):
        await sub(exact, ch, i)
    both = await connect(n2.ws_url)                     # a channel and a pattern
    await sub(both, channels[0], 1)
    await sub(both, base + ":*", 2)
    pattern = await connect(n1.ws_url)                  # only a pattern, other node
    await sub(pattern, base + ":*", 1)

    results = [await asyncio.to_thread(n1.publish, ch, {"ch": i})
               for i, ch in enumerate(channels)]
    assert all(r["offset"] == 1 and r["epoch"] for r in results)
    got = await events(exact, 6)
    assert [(e["channel"], e["data"], e["offset"]) for e in got] == [
        (ch, {"ch": i}, 1) for i, ch in enumerate(channels)]
    got = await events(pattern, 6)
    assert sorted(e["channel"] for e in got) == sorted(channels)
    got = await events(both, 6)
    assert sorted(e["channel"] for e in got) == sorted(channels)   # once each

    # a raw PUBLISH on any master reaches channel and pattern subscribers once
    other = next(p for p in redis_cluster.ports if p != redis_cluster.owner(channels[0]))
    redis_cluster.cli(other, "publish", channels[0], '{"raw":true}')
    for c in (exact, both, pattern):
        e = (await events(c, 1))[0]
        assert (e["channel"], e["data"]) == (channels[0], {"raw": True})
        assert "offset" not in e
    # a marker: nothing else was queued before it
    await asyncio.to_thread(n1.publish, channels[1], "end")
    for c in (exact, both, pattern):
        assert (await events(c, 1))[0]["data"] == "end"

    # the channel is subscribed on its own shard (SSUBSCRIBE), by n2 only
    owner = redis_cluster.owner(channels[0])
    out = redis_cluster.cli(owner, "pubsub", "shardnumsub", channels[0]).split()
    assert out[-1] == "1"
    # history through the other node
    hist = await pattern.request({"id": 9, "type": "history", "channel": channels[1],
                                  "limit": 10})
    assert [p["data"] for p in hist["publications"]] == [{"ch": 1}, "end"]
    for c in (exact, both, pattern):
        c.close()


@pytest.fixture(scope="module")
def replica_cluster():
    """3 masters, each with one replica (failovers change which is which)."""
    c = start_cluster(masters=3, replicas=1)
    yield c
    c.stop()


async def test_cluster_failover_keeps_every_acknowledged_publication(replica_cluster,
                                                                     fastws_server):
    """A graceful CLUSTER FAILOVER of the channel's master while a subscriber listens:
    every publication answered 200 reaches it (live, or after its 4010 through since),
    and offsets never repeat."""
    cluster = replica_cluster
    node = fastws_server("--broker", cluster.url)
    channel = uniq("events")
    master = cluster.owner(channel)
    replica = cluster.replica_of(master)
    pub = ApiPublisher(node.http_url, channel)
    seq = itertools.count(1)                       # every attempt its own data

    async with listening(node.ws_url, channel) as received:
        for _ in range(3):
            await until(lambda: pub.publish(next(seq)), what="a publication before")
        assert cluster.cli(replica, "cluster", "failover").strip() == "OK"

        def landed_on_new_master() -> bool:
            return pub.publish(next(seq)) and stream_top(replica, channel) == \
                pub.last_position()
        await until(landed_on_new_master, what="a publication on the promoted replica")
        await until(lambda: set(pub.ok) <= {e.data for e in received},
                    what="every acknowledged event")
        data = [e.data for e in received]
    assert data == sorted(set(data))
    pub.assert_offsets_go_on()


def publish_status(node: ServerProc, channel: str, data: object = "x") -> int:
    return api_publish(node.http_url, channel, data)[0]


async def next_event(c: RawClient, data: object) -> None:
    """The next message of ``c`` is the event ``data`` (no disconnect before it)."""
    msg = await c.recv()
    assert msg["type"] == "event" and msg["data"] == data, msg


async def subscribers(node: ServerProc, channels: list[str],
                      pattern: str) -> tuple[dict[str, RawClient], RawClient]:
    """One raw connection subscribed to each of ``channels``, and one to ``pattern``."""
    clients = {}
    for ch in channels:
        clients[ch] = await connect(node.ws_url)
        await sub(clients[ch], ch, 1)
    holder = await connect(node.ws_url)
    await sub(holder, pattern, 1)
    return clients, holder


async def closed_with_4010(c: RawClient) -> None:
    while (msg := await c.recv(timeout=30))["type"] == "event":
        pass
    assert msg["type"] == "disconnect" and msg["code"] == 4010, msg
    assert await c.wait_closed() == 4010


async def test_cluster_failover_closes_only_that_shards_subscribers(replica_cluster,
                                                                    fastws_server):
    """CLUSTER FAILOVER of one master: the subscribers of its channels, and pattern
    subscribers (their feeds span every shard), get 4010; those of the other masters'
    channels keep their streams, and publishing to them never stops."""
    cluster = replica_cluster
    node = fastws_server("--broker", cluster.url)
    await until(lambda: readyz(node) == 200, what="ready")
    base = uniq("events")
    by_master = cluster.channels_by_master(base)
    master = next(iter(by_master))
    moved = by_master[master][0]
    kept = [v[0] for p, v in by_master.items() if p != master]
    clients, pattern = await subscribers(node, [moved, *kept], base + ":*")
    before = scrape(node.http_url)['fastws_connections_closed_total{code="4010"}']

    replica = cluster.replica_of(master)
    assert cluster.cli(replica, "cluster", "failover").strip() == "OK"
    await closed_with_4010(clients[moved])
    await closed_with_4010(pattern)
    await until(lambda: publish_status(node, moved) == 200, what="the moved shard back")
    for i, ch in enumerate(kept):
        assert publish_status(node, ch, i) == 200
        await next_event(clients[ch], i)
    metrics = scrape(node.http_url)
    assert metrics['fastws_connections_closed_total{code="4010"}'] == before + 2
    assert metrics["fastws_broker_shards_up"] == metrics["fastws_broker_shards"] == 3
    for c in [*clients.values(), pattern]:
        c.close()


async def test_cluster_master_down_fails_only_its_channels(fastws_server):
    """A master killed, no replica to take over (cluster-require-full-coverage no): its
    channels answer 503 (publish, subscribe, history), every other channel keeps
    working, with no 4010, and the node stays ready (fastws_broker_shards_up says 2 of
    3).  When it is back, its channels work again and only their subscribers (and
    pattern ones) get 4010."""
    cluster = start_cluster(extra=("--cluster-require-full-coverage", "no"))
    try:
        node = fastws_server("--broker", cluster.url)
        await until(lambda: readyz(node) == 200, what="ready")
        base = uniq("events")
        by_master = cluster.channels_by_master(base, per_master=2)
        holder = cluster.holder_of(f"fastws-{node.proc.pid}-global")
        assert holder is not None
        victim = next(p for p in by_master if p != holder)  # the global link lives on
        dead, dead_too = by_master[victim]
        live = [v[0] for p, v in by_master.items() if p != victim]
        clients, pattern = await subscribers(node, [dead, *live], base + ":*")

        cluster.kill(victim)
        await until(lambda: publish_status(node, dead) == 503, what="503 on the lost shard")
        for i, ch in enumerate(live):
            assert publish_status(node, ch, i) == 200
            await next_event(clients[ch], i)
        assert sorted(e["data"] for e in await events(pattern, len(live))) == [0, 1]
        # a batch over both: only the lost shard's item fails, the other is published
        status, _, body = http("POST", node.http_url + "/api/publish",
                               [{"channel": dead, "data": "b"}, {"channel": live[0], "data": "b"}],
                               headers={"Authorization": f"Bearer {API_KEY}"})
        assert status == 200, body
        lost, published = orjson.loads(body)
        assert lost["status"] == 503 and "offset" in published, body
        await next_event(clients[live[0]], "b")
        assert [e["data"] for e in await events(pattern, 1)] == ["b"]
        assert readyz(node) == 200
        metrics = scrape(node.http_url)
        assert (metrics["fastws_broker_shards"], metrics["fastws_broker_shards_up"]) == (3, 2)
        assert metrics["fastws_broker_up"] == 1
        other = await connect(node.ws_url)
        refused = await other.request({"id": 1, "type": "subscribe", "channel": dead_too})
        assert refused["type"] == "error" and refused["code"] == 503, refused
        refused = await other.request({"id": 2, "type": "history", "channel": dead_too})
        assert refused["type"] == "error" and refused["code"] == 503, refused
        await sub(other, live[0], 3)                       # the others still subscribe

        cluster.restart(victim)
        await closed_with_4010(clients[dead])
        await closed_with_4010(pattern)
        await until(lambda: publish_status(node, dead) == 200, what="the shard back")
        assert scrape(node.http_url)["fastws_broker_shards_up"] == 3
        for i, ch in enumerate(live):
            assert publish_status(node, ch, f"after {i}") == 200
            await next_event(clients[ch], f"after {i}")
        await next_event(other, "after 0")
        await sub(other, dead_too, 4)
        for c in [*clients.values(), other]:
            c.close()
    finally:
        cluster.stop()


async def test_cluster_presence_leave_of_a_killed_node(redis_cluster, tuned_server):
    """Presence on a cluster (its events go by SPUBLISH in the channel's shard): a node
    killed, the survivor's sweep pushes its client's leave, once."""
    a_node, b_node = (tuned_server(PRESENCE_TUNED, "--broker", redis_cluster.url,
                                   config=PRESENCE_CONFIG) for _ in range(2))
    for n in (a_node, b_node):
        await until(lambda n=n: readyz(n) == 200, what="ready")
    room = uniq("chat")
    a = await connect(a_node.ws_url)
    await sub(a, room, 1)
    b = await connect(b_node.ws_url)
    await sub(b, room, 1)
    join = await a.recv()
    assert join["type"] == "join"
    b_node.stop(signal.SIGKILL)
    assert await a.recv(timeout=PRESENCE_WINDOW + 5) == {**join, "type": "leave"}
    assert join["client"] not in await presence_of(a, room, 2)
    assert publish_status(a_node, room, "marker") == 200
    await next_event(a, "marker")
    a.close()
