"""SPEC §13 app primitives over real servers: ``last`` N on subscribe, ephemeral
publications, ``from`` on client publications, ``echo: false``, ``idempotency_key``
on the protocol's publish.  Memory broker, and two nodes sharing a real Redis (the
sender's meta crosses nodes)."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
from conftest import API_KEY, api
from wsclient import RawClient, connect, connect_with_token

pytestmark = pytest.mark.timeout(90)

SECRET = "primitives-test-secret-of-32-bytes-plus"
CONFIG = """
[namespaces.room]
publish = "anyone"
presence = true
history_size = 50
[namespaces.other]
publish = "anyone"
history_size = 50
"""


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def uniq(ns: str = "room") -> str:
    return f"{ns}:{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "redis"])
def nodes(request, fastws_server):
    """Two nodes sharing a fresh redis-server, or one memory node twice."""
    if request.param == "memory":
        one = fastws_server("--jwt-secret", SECRET, config=CONFIG)
        return one, one
    redis_server = request.getfixturevalue("redis_server")
    return tuple(fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET,
                               config=CONFIG) for _ in range(2))


async def no_more(c: RawClient) -> None:
    """Nothing else is on its way to ``c``: a ping round trip comes back first."""
    pong = await c.request({"id": 777, "type": "ping"})
    assert pong["type"] == "pong"
    assert c.messages.empty(), c.messages.get_nowait()


async def test_last_n_before_subscribed(nodes):
    """``last`` N: the newest N kept publications as events, oldest first, then
    ``subscribed`` with the channel's offset/epoch; live ones follow; ``since`` wins."""
    a, _ = nodes
    ch = uniq()
    for i in range(1, 6):
        a.publish(ch, {"n": i})
    c = await connect(a.ws_url)
    c.send({"id": 1, "type": "subscribe", "channel": ch, "last": 3})
    pushes, sub = await c.until_reply(1)
    assert [p["data"]["n"] for p in pushes] == [3, 4, 5]
    assert [p["offset"] for p in pushes] == [3, 4, 5]
    assert sub["type"] == "subscribed" and sub["offset"] == 5 and sub["epoch"]
    a.publish(ch, {"n": 6})
    assert (await c.recv())["offset"] == 6
    # since wins over last
    d = await connect(a.ws_url)
    d.send({"id": 2, "type": "subscribe", "channel": ch, "last": 100,
            "since": {"offset": 5, "epoch": sub["epoch"]}})
    pushes, sub2 = await d.until_reply(2)
    assert [p["offset"] for p in pushes] == [6] and sub2["recovered"] is True
    # more than kept: what is there
    e = await connect(a.ws_url)
    e.send({"id": 3, "type": "subscribe", "channel": uniq(), "last": 10})
    pushes, sub3 = await e.until_reply(3)
    assert pushes == [] and sub3["type"] == "subscribed"
    for x in (c, d, e):
        x.close()


async def test_last_n_of_a_pattern(fastws_server):
    """A pattern's ``last`` N: the newest N of its namespace's log that it matches."""
    a = fastws_server(config=CONFIG)
    tag = uuid.uuid4().hex[:6]
    for i in range(1, 5):
        a.publish(f"room:{tag}-a", {"n": i})
        a.publish(f"room:zz{tag}", {"skip": i})
    c = await connect(a.ws_url)
    c.send({"id": 1, "type": "subscribe", "channel": f"room:{tag}-*", "last": 2})
    pushes, sub = await c.until_reply(1)
    assert [p["data"] for p in pushes] == [{"n": 3}, {"n": 4}]
    assert sub["offset"] and sub["epoch"]  # the log's position (later recovery)
    c.close()


@pytest.mark.parametrize("msg", [
    {"type": "subscribe", "last": 0}, {"type": "subscribe", "last": 101},
    {"type": "subscribe", "last": "3"}, {"type": "subscribe", "last": True},
    {"type": "subscribe", "last": 1.5},
    {"type": "publish", "data": 1, "ephemeral": "yes"},
    {"type": "publish", "data": 1, "echo": 0},
    {"type": "publish", "data": 1, "idempotency_key": ""},
    {"type": "publish", "data": 1, "idempotency_key": "k" * 256},
])
async def test_bad_options_are_400(server, msg):
    c = await connect(server.ws_url)
    reply = await c.request({"id": 5, "channel": "room:x", **msg})
    assert reply["type"] == "error" and reply["code"] == 400, reply
    await no_more(c)
    c.close()


async def test_ephemeral_reaches_live_subscribers_only(nodes):
    """Ephemeral: the push says so and has no offset; ``published`` answers offset 0;
    history and offsets do not move; a later subscriber with ``last`` never sees it;
    ``/api/publish`` takes it too."""
    a, b = nodes
    ch = uniq()
    first = a.publish(ch, {"n": 1})
    sub = await connect(b.ws_url)
    assert (await sub.request({"id": 1, "type": "subscribe", "channel": ch}))["type"] \
        == "subscribed"
    pub = await connect(a.ws_url)
    r = await pub.request({"id": 2, "type": "publish", "channel": ch,
                           "data": {"typing": True}, "ephemeral": True})
    assert (r["type"], r["offset"], r["epoch"]) == ("published", 0, "")
    push = await sub.recv()
    assert push["ephemeral"] is True and "offset" not in push and "epoch" not in push
    assert push["data"] == {"typing": True} and push["from"]["client"]
    assert a.publish(ch, {"typing": False}, ephemeral=True) == {"offset": 0, "epoch": ""}
    push = await sub.recv()
    assert push["ephemeral"] is True and "from" not in push
    status, batch = api(a.http_url, "/api/publish", [
        {"channel": ch, "data": "eph", "ephemeral": True}, {"channel": ch, "data": "x",
                                                            "ephemeral": "yes"}],
        {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and batch[0] == {"offset": 0, "epoch": ""}, batch
    assert batch[1]["status"] == 400 and "ephemeral" in batch[1]["error"]
    push = await sub.recv()
    assert push["data"] == "eph" and push["ephemeral"] is True
    nxt = a.publish(ch, {"n": 2})
    assert nxt["offset"] == first["offset"] + 1
    assert (await sub.recv())["offset"] == nxt["offset"]
    late = await connect(a.ws_url)
    late.send({"id": 3, "type": "subscribe", "channel": ch, "last": 10})
    pushes, _ = await late.until_reply(3)
    assert [p["data"] for p in pushes] == [{"n": 1}, {"n": 2}]
    h = await late.request({"id": 4, "type": "history", "channel": ch, "limit": 10})
    assert [p["data"] for p in h["publications"]] == [{"n": 1}, {"n": 2}]
    for x in (sub, pub, late):
        x.close()


async def test_from_names_the_sender(nodes):
    """A client's publication carries ``from`` {user, client}: the user of its token
    and the client id presence lists for it; the API's carries none."""
    a, b = nodes
    ch = uniq()
    watcher = await connect_with_token(b.ws_url, token("bob"))
    await watcher.request({"id": 1, "type": "subscribe", "channel": ch})
    alice = await connect_with_token(a.ws_url, token("alice"))
    await alice.request({"id": 1, "type": "subscribe", "channel": ch})
    while (await watcher.recv())["type"] != "join":
        pass
    pres = await watcher.request({"id": 2, "type": "presence", "channel": ch})
    alice_id = [x["client"] for x in pres["clients"] if x["user"] == "alice"]
    await alice.request({"id": 3, "type": "publish", "channel": ch, "data": "hi"})
    push = await watcher.recv()
    assert push["data"] == "hi" and push["from"] == {"user": "alice", "client": alice_id[0]}
    a.publish(ch, "from the api")
    push = await watcher.recv()
    assert push["data"] == "from the api" and "from" not in push
    anon = await connect(a.ws_url)
    await anon.request({"id": 1, "type": "publish", "channel": ch, "data": "anon"})
    push = await watcher.recv()
    assert push["from"]["user"] is None and push["from"]["client"]
    for x in (watcher, alice, anon):
        x.close()


async def test_echo_false_skips_only_the_sender(nodes):
    """``echo: false``: the sending connection does not get its publication; every
    other subscriber (same node, other node) does; the next echo:true one comes back."""
    a, b = nodes
    ch = uniq("other")
    sender = await connect(a.ws_url)
    same = await connect(a.ws_url)
    other = await connect(b.ws_url)
    for i, c in enumerate((sender, same, other)):
        assert (await c.request({"id": i, "type": "subscribe", "channel": ch}))["type"] \
            == "subscribed"
    r = await sender.request({"id": 9, "type": "publish", "channel": ch, "data": "quiet",
                              "echo": False})
    assert r["type"] == "published" and r["offset"] == 1
    for c in (same, other):
        push = await c.recv()
        assert push["data"] == "quiet" and push["offset"] == 1
    await sender.request({"id": 10, "type": "publish", "channel": ch, "data": "loud"})
    push = await sender.recv()
    assert push["data"] == "loud", push  # "quiet" never came
    await no_more(sender)
    for c in (sender, same, other):
        c.close()


async def test_idempotency_key_publishes_once(nodes):
    """The protocol's publish takes ``idempotency_key`` as the API does: a retry (a lost
    reply) answers the first offset and publishes nothing more, through either node."""
    a, b = nodes
    ch = uniq()
    sub = await connect(a.ws_url)
    await sub.request({"id": 1, "type": "subscribe", "channel": ch})
    p1, p2 = await connect(a.ws_url), await connect(b.ws_url)
    r1 = await p1.request({"id": 1, "type": "publish", "channel": ch, "data": "once",
                           "idempotency_key": "k-1"})
    r2 = await p2.request({"id": 2, "type": "publish", "channel": ch, "data": "once",
                           "idempotency_key": "k-1"})
    assert (r1["offset"], r1["epoch"]) == (r2["offset"], r2["epoch"]) == (1, r1["epoch"])
    assert (await sub.recv())["data"] == "once"
    await no_more(sub)
    for c in (sub, p1, p2):
        c.close()
