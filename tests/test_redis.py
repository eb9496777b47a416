"""The Redis broker end to end: real redis-server, real fastws nodes, raw producers."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from conftest import http, scrape
from redis_helpers import events, sub, uniq
from wsclient import connect

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def r(redis_server):
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_raw_publish_reaches_every_node_once(redis_server, fastws_server, r):
    n1 = fastws_server("--broker", redis_server.url)
    n2 = fastws_server("--broker", redis_server.url)
    base = uniq()
    clients = []
    for node in (n1, n2):
        c = await connect(node.ws_url)
        # one connection holding a channel and two patterns that all match
        await sub(c, base + ":x", 1)
        await sub(c, base + ":*", 2)
        await sub(c, "*:x", 3)
        clients.append(c)
    other = await connect(n2.ws_url)
    await sub(other, "events:*", 1)
    await r.publish(base + ":x", b'{"a":1}')
    await r.publish(base + ":x", b"not json \xff")
    await r.publish(base + ":x", b'{"a":1}')
    await r.publish(base + ":y", b"[2]")
    for c in clients:
        got = await events(c, 4)
        assert [(e["channel"], e["data"]) for e in got] == [
            (base + ":x", {"a": 1}), (base + ":x", "not json \ufffd"),
            (base + ":x", {"a": 1}), (base + ":y", [2])]
        assert all("offset" not in e for e in got)
    got = await events(other, 4)
    assert [e["channel"] for e in got] == [base + ":x"] * 3 + [base + ":y"]
    # nothing more arrives: a marker publication comes next
    await r.publish(base + ":x", b'"end"')
    for c in clients:
        assert (await events(c, 1))[0]["data"] == "end"
    # one pub/sub connection per node, subscribed only to what its clients hold
    assert (await r.pubsub_numsub(base + ":x"))[0][1] == 2
    assert await r.pubsub_numpat() == 3  # unique patterns: base:*, *:x, events:*
    for c in clients + [other]:
        c.close()


async def test_api_publish_on_one_node_reaches_the_other_with_history(
        redis_server, fastws_server):
    n1 = fastws_server("--broker", redis_server.url)
    n2 = fastws_server("--broker", redis_server.url)
    ch = uniq()
    c = await connect(n2.ws_url)
    await sub(c, ch, 1)
    res = [await asyncio.to_thread(n1.publish, ch, {"i": i}) for i in range(3)]
    assert [x["offset"] for x in res] == [1, 2, 3]
    got = await events(c, 3)
    assert [(e["offset"], e["epoch"], e["data"]) for e in got] == [
        (i + 1, res[0]["epoch"], {"i": i}) for i in range(3)]
    # idempotency across nodes
    a = await asyncio.to_thread(n1.publish, ch, "once", idempotency_key="k")
    b = await asyncio.to_thread(n2.publish, ch, "twice", idempotency_key="k")
    assert a == b
    # history and since-recovery through the other node
    d = await connect(n1.ws_url)
    hist = await d.request({"id": 1, "type": "history", "channel": ch, "limit": 10})
    assert [p["offset"] for p in hist["publications"]] == [1, 2, 3, 4]
    reply = await d.request({"id": 2, "type": "subscribe", "channel": ch,
                             "since": {"offset": 2, "epoch": res[0]["epoch"]}})
    assert reply["recovered"] is True
    missed = [d.messages.get_nowait() for _ in range(d.messages.qsize())]
    assert [m["offset"] for m in missed] == [3, 4]
    c.close()
    d.close()


async def test_unsubscribe_releases_redis_and_readyz(redis_server, fastws_server, r):
    n1 = fastws_server("--broker", redis_server.url)
    status, _, _ = http("GET", n1.http_url + "/readyz")
    assert status == 200
    metrics = scrape(n1.http_url)
    assert metrics["fastws_broker_up"] == 1
    assert 0 <= metrics["fastws_broker_lag_seconds"] < 5
    ch = uniq()
    c = await connect(n1.ws_url)
    await sub(c, ch, 1)
    await sub(c, "zz:*", 2)
    assert (await r.pubsub_numsub(ch))[0][1] == 1
    await c.request({"id": 3, "type": "unsubscribe", "channel": ch})
    await c.request({"id": 4, "type": "unsubscribe", "channel": "zz:*"})
    for _ in range(200):
        if (await r.pubsub_numsub(ch))[0][1] == 0 and await r.pubsub_numpat() == 0:
            break
        await asyncio.sleep(0.02)
    assert (await r.pubsub_numsub(ch))[0][1] == 0
    assert await r.pubsub_numpat() == 0
    c.close()


def test_broker_bench_smoke(redis_server, capsys):
    from loadtest.broker_bench import main

    assert main(["--redis", redis_server.url, "--count", "300", "--inflight", "8",
                 "--history", "0,10"]) == 0
    out = capsys.readouterr().out
    assert out.count("publications/s") == 2


async def test_password_and_database_from_the_url():
    import shutil
    import subprocess

    from conftest import free_port, wait_port

    from fastws.broker import create_broker

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port",
                             str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--requirepass", "s3cret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        got: list[bytes] = []
        done = asyncio.Event()

        class Handler:
            def handle_publication(self, channel, data, offset, epoch, accepted):
                got.append(data)
                done.set()

        wrong = create_broker(f"redis://:nope@127.0.0.1:{port}/0")
        await wrong.start(Handler())
        assert not wrong.up
        await wrong.close()
        broker = create_broker(f"redis://:s3cret@127.0.0.1:{port}/3")
        await broker.start(Handler())
        assert broker.up
        await broker.subscribe("events:auth")
        res = await broker.publish("events:auth", b"[1]", history_size=5, history_ttl=60)
        await asyncio.wait_for(done.wait(), 10)
        assert got == [b"[1]"] and res.offset == 1
        r = aioredis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        assert await r.exists("fws:{events:auth}:events:auth:h") == 1   # in db 3
        await r.aclose()
        await broker.close()
    finally:
        proc.terminate()
        proc.wait(10)


PRESENCE = """
[namespaces.chat]
presence = true
"""


async def test_presence_across_nodes(redis_server, fastws_server):
    n1 = fastws_server("--broker", redis_server.url, config=PRESENCE)
    n2 = fastws_server("--broker", redis_server.url, config=PRESENCE)
    room = uniq("chat")
    a = await connect(n1.ws_url)
    await sub(a, room, 1)
    b = await connect(n2.ws_url)
    await sub(b, room, 1)
    join = await a.recv()                       # B's join, from the other node
    assert join["type"] == "join" and join["channel"] == room
    listed = await a.request({"id": 2, "type": "presence", "channel": room})
    clients = {c["client"] for c in listed["clients"]}
    assert len(clients) == 2 and join["client"] in clients
    same = await b.request({"id": 2, "type": "presence", "channel": room})
    assert {c["client"] for c in same["clients"]} == clients
    b.close()
    leave = await a.recv(timeout=2.0)           # within 2 s, across nodes
    assert leave == {**join, "type": "leave"}
    listed = await a.request({"id": 3, "type": "presence", "channel": room})
    assert [c["client"] for c in listed["clients"]] == list(clients - {join["client"]})
    a.close()
