"""SPEC §13 ``from`` survives storage: a client's publication keeps its sender wherever
it is kept, so the ``history`` reply, ``since`` recovery, ``last`` replays (channels and
patterns), the fallback transports' replays, ``POST /api/history`` and the Python
client's events carry the ``from`` its live push carried; publications of the API carry
none.  Memory broker, and two nodes sharing a real Redis (written through one node,
read through the other)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import jwt
import orjson
import pytest
import redis
from conftest import api, http
from wsclient import RawClient, connect, connect_with_token

from fastws.broker import HistoryResult
from fastws.broker.memory import MemoryBroker
from fastws.client import connect as client_connect
from fastws.config import load_config
from fastws.node import Node
from fastws.protocol import Since
from fastws.session import BufferedSession

pytestmark = pytest.mark.timeout(90)

SECRET = "sender-history-secret-of-32-bytes-plus"
CONFIG = """
[namespaces.room]
publish = "anyone"
history_size = 50
[namespaces.evh]
publish = "anyone"
history_size = 10
stream = true
"""


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture(params=["memory", "redis"])
def nodes(request, fastws_server):
    """Two nodes sharing a fresh redis-server, or one memory node twice."""
    if request.param == "memory":
        one = fastws_server("--jwt-secret", SECRET, config=CONFIG.split("[namespaces.evh]")[0])
        return one, one
    redis_server = request.getfixturevalue("redis_server")
    return tuple(fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET,
                               config=CONFIG) for _ in range(2))


def item(push: dict) -> dict:
    """The ``history`` reply's item for a live ``event`` push: offset, data, from?."""
    return {k: push[k] for k in ("offset", "data", "from") if k in push}


def cursor_of(positions: dict) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(positions)).rstrip(b"=").decode()


async def sse_until_subscribed(port: int, query: str) -> list[dict]:
    """Open ``GET /sse?query`` and return its messages up to ``subscribed``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /sse?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    got: list[dict] = []
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line, got
            if line.startswith(b"data:"):
                got.append(orjson.loads(line[5:]))
                if got[-1]["type"] == "subscribed":
                    return got
    finally:
        writer.close()


async def publish_from_everyone(a, ch: str, watcher: RawClient) -> list[dict]:
    """On node ``a``: alice (a token), an anonymous client and the API publish on
    ``ch``, alice once more ephemerally; returns the live pushes ``watcher`` got for
    the kept ones (the ephemeral one checked and left out)."""
    alice = await connect_with_token(a.ws_url, token("alice"))
    anon = await connect(a.ws_url)
    for c, i, data in ((alice, 1, "hi"), (anon, 2, "anon")):
        r = await c.request({"id": i, "type": "publish", "channel": ch, "data": data})
        assert r["type"] == "published", r
    await asyncio.to_thread(a.publish, ch, "from the api")
    await alice.request({"id": 3, "type": "publish", "channel": ch, "data": "typing",
                         "ephemeral": True})
    await alice.request({"id": 4, "type": "publish", "channel": ch, "data": "bye"})
    pushes = [await watcher.recv() for _ in range(5)]
    assert [p.get("ephemeral", False) for p in pushes] == [False] * 3 + [True, False]
    alice.close()
    anon.close()
    return [p for p in pushes if not p.get("ephemeral")]


async def test_history_since_last_and_api_keep_from(nodes):
    """Published through one node, read through the other: the ``history`` reply (and
    ``POST /api/history``, and ``/call``) list ``from`` exactly for the publications
    whose live push had it; ``last`` and ``since`` replay pushes identical to the live
    ones."""
    a, b = nodes
    ch = f"room:{uuid.uuid4().hex[:10]}"
    watcher = await connect(b.ws_url)
    assert (await watcher.request({"id": 1, "type": "subscribe", "channel": ch}))[
        "type"] == "subscribed"
    live = await publish_from_everyone(a, ch, watcher)
    assert [p["data"] for p in live] == ["hi", "anon", "from the api", "bye"]
    assert live[0]["from"]["user"] == "alice" and live[1]["from"]["user"] is None
    assert "from" not in live[2] and live[3]["from"] == live[0]["from"]
    hist = await watcher.request({"id": 2, "type": "history", "channel": ch, "limit": 10})
    assert hist["publications"] == [item(p) for p in live]
    assert "from" not in hist["publications"][2]            # absent, not null
    status, body = await asyncio.to_thread(api, b.http_url, "/api/history",
                                           {"channel": ch, "limit": 10})
    assert status == 200 and body["publications"] == hist["publications"], body
    st, _, raw = await asyncio.to_thread(http, "POST", a.http_url + "/call",
                                         {"id": 9, "type": "history", "channel": ch})
    assert st == 200 and orjson.loads(raw)["publications"] == hist["publications"]
    late = await connect(b.ws_url)
    late.send({"id": 1, "type": "subscribe", "channel": ch, "last": 3})
    pushes, sub = await late.until_reply(1)
    assert pushes == live[1:] and sub["type"] == "subscribed"
    again = await connect(a.ws_url)
    again.send({"id": 1, "type": "subscribe", "channel": ch,
                "since": {"offset": live[0]["offset"], "epoch": live[0]["epoch"]}})
    pushes, sub = await again.until_reply(1)
    assert pushes == live[1:] and sub["recovered"] is True
    for c in (watcher, late, again):
        c.close()


async def test_pattern_replays_keep_from(nodes):
    """A pattern's ``last`` and ``since`` replay from the namespace log: the pushes are
    the live ones, ``from`` included."""
    a, b = nodes
    tag = uuid.uuid4().hex[:8]
    pattern = f"room:{tag}-*"
    watcher = await connect(b.ws_url)
    assert (await watcher.request({"id": 1, "type": "subscribe", "channel": pattern}))[
        "type"] == "subscribed"
    live = await publish_from_everyone(a, f"room:{tag}-a", watcher)
    late = await connect(b.ws_url)
    late.send({"id": 1, "type": "subscribe", "channel": pattern, "last": 10})
    pushes, _ = await late.until_reply(1)
    assert pushes == live
    again = await connect(a.ws_url)
    since = {"offset": live[1]["offset"], "epoch": live[1]["epoch"],
             "channel": live[1]["channel"]}
    again.send({"id": 1, "type": "subscribe", "channel": pattern, "since": since})
    pushes, sub = await again.until_reply(1)
    assert pushes == live[2:] and sub["recovered"] is True
    for c in (watcher, late, again):
        c.close()


async def test_fallback_replays_keep_from(nodes):
    """``/sse`` and ``/poll`` resuming from a cursor replay the pushes with ``from``."""
    a, b = nodes
    ch = f"room:{uuid.uuid4().hex[:10]}"
    watcher = await connect(a.ws_url)
    await watcher.request({"id": 1, "type": "subscribe", "channel": ch})
    live = await publish_from_everyone(a, ch, watcher)
    cur = cursor_of({ch: [live[0]["offset"], live[0]["epoch"]]})
    msgs = await sse_until_subscribed(b.port, f"channel={ch}&cursor={cur}")
    assert [m for m in msgs if m["type"] == "event"] == live[1:]
    st, _, raw = await asyncio.to_thread(http, "GET", f"{a.http_url}/poll?channel={ch}"
                                         f"&cursor={cur}", None, None, 20)
    assert st == 200
    assert [m for m in orjson.loads(raw)["messages"] if m["type"] == "event"] == live[1:]
    watcher.close()


async def test_python_client_events_have_sender_on_replay(nodes):
    """The Python client's replayed events (``last``) have ``sender`` as live ones do;
    its ``history()`` lists ``from``."""
    a, b = nodes
    ch = f"room:{uuid.uuid4().hex[:10]}"
    async with client_connect(a.ws_url) as pub, client_connect(b.ws_url) as reader:
        await pub.publish(ch, "mine")
        await asyncio.to_thread(a.publish, ch, "api")
        await reader.subscribe(ch, last=5)
        evs = [await reader.next_event(10) for _ in range(2)]
        assert [e.data for e in evs] == ["mine", "api"]
        assert evs[0].sender == evs[0].from_ and evs[0].sender["user"] is None
        assert evs[0].sender["client"] and evs[1].sender is None
        hist = await reader.history(ch)
        assert hist["publications"][0]["from"] == evs[0].sender
        assert "from" not in hist["publications"][1]


async def test_stream_namespace_keeps_from_too(request, fastws_server):
    """A ``stream = true`` namespace with history (Redis): the stream entry names the
    publisher as before and the history keeps ``from``."""
    redis_server = request.getfixturevalue("redis_server")
    srv = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET, config=CONFIG)
    alice = await connect_with_token(srv.ws_url, token("alice"))
    r = await alice.request({"id": 1, "type": "publish", "channel": "evh:x", "data": 1})
    assert r["type"] == "published", r
    entry = redis.Redis(port=redis_server.port).xrange("fastws:stream:evh")[-1][1]
    assert entry[b"user"] == b"alice" and entry[b"client"]
    hist = await alice.request({"id": 2, "type": "history", "channel": "evh:x"})
    assert hist["publications"] == [{"offset": 1, "data": 1, "from": {
        "user": "alice", "client": entry[b"client"].decode()}}]
    alice.close()


class SlowHistoryBroker(MemoryBroker):
    """The memory broker with history reads that answer late, as a Redis read may
    (the one fault injected here): publications then arrive while a replay is read."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.gate = asyncio.Event()

    async def history(self, channel: str, **kw: Any) -> HistoryResult:
        hist = await super().history(channel, **kw)
        self.reading.set()
        await self.gate.wait()
        return hist


async def test_publications_during_a_replay_come_as_their_live_pushes(tmp_path):
    """What arrives while a ``since`` replay is read is sent after it as the live push
    was: ``from`` kept, an ephemeral one still marked ephemeral."""
    path = tmp_path / "fastws.toml"
    path.write_text(CONFIG.split("[namespaces.evh]")[0])
    broker = SlowHistoryBroker()
    node = Node(load_config({"config": str(path)}, {}), broker)
    await node.start()
    try:
        ch = "room:replay"
        sender = b'{"user":"alice","client":"c1"}'
        meta = b'{"f":{"user":"alice","client":"c1"}}'
        await node.publish(ch, "old", meta=meta, sender=sender)
        sess = BufferedSession(node, "c2")
        task = asyncio.create_task(node.recovery.recover(sess, ch, Since(0, "")))
        await broker.reading.wait()
        await node.publish(ch, "new", meta=meta, sender=sender)
        await node.publish(ch, "typing", ephemeral=True,
                           meta=b'{"f":{"user":"alice","client":"c1"},"e":1}')
        await node.publish(ch, "api")
        broker.gate.set()
        assert (await task)["recovered"] is True
    finally:
        await node.close()
    alice = orjson.loads(sender)
    got = [orjson.loads(p) for p in sess.sent]
    assert [(m["data"], m.get("offset"), m.get("from"), m.get("ephemeral")) for m in got] == [
        ("old", 1, alice, None), ("new", 2, alice, None), ("typing", None, alice, True),
        ("api", 3, None, None)]
