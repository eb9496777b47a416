"""SPEC §11-12 over Redis: stream namespaces (XADD before the ack, once per idempotency
key, a failed append refuses and fans nothing out), the lifecycle stream (connect /
disconnect, "node lost" written by a survivor), the server API over every node, and
the start-up errors of the new options."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import jwt as pyjwt
import pytest
import redis
from conftest import API_KEY, http
from picows import WSCloseCode, WSMsgType
from redis_helpers import until
from wsclient import RawClient, connect

from fastws.config import ConfigError, load_config

JWT_SECRET = "lifecycle-test-secret-of-32-bytes-plus"


def jwt_token(sub: str, ttl: float = 600) -> str:
    return pyjwt.encode({"sub": sub, "exp": time.time() + ttl}, JWT_SECRET, algorithm="HS256")

pytestmark = pytest.mark.asyncio

STREAM_TOML = """
[namespaces.ev]
stream = true
publish = "anyone"
presence = true
[namespaces.bad]
stream = true
publish = "anyone"
"""


def fields(entry: tuple[bytes, dict[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in entry[1].items()}


def api(srv, path: str, body: object) -> tuple[int, dict]:
    import json

    status, _, raw = http("POST", srv.http_url + path, body,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    return status, json.loads(raw)


async def test_stream_namespace_appends_once_before_the_ack(fastws_server,
                                                            redis_server) -> None:
    r = redis.Redis(port=redis_server.port)
    srv = fastws_server("--broker", redis_server.url, config=STREAM_TOML)
    pub = await connect(srv.ws_url)
    sub = await connect(srv.ws_url)
    assert (await sub.request({"id": 1, "type": "subscribe", "channel": "ev:views"}))[
        "type"] == "subscribed"
    msg = {"id": 2, "type": "publish", "channel": "ev:views", "data": {"page": "/"},
           "idempotency_key": "view-1"}
    first = await pub.request(msg)
    assert first["type"] == "published", first
    # acknowledged: already in the stream
    entries = r.xrange("fastws:stream:ev")
    assert len(entries) == 1
    f = fields(entries[0])
    assert f["channel"] == "ev:views" and f["data"] == '{"page":"/"}' and f["user"] == ""
    assert f["client"] and f["offset"] == str(first["offset"]) and f["epoch"] == first["epoch"]
    assert abs(int(f["ts"]) - time.time() * 1000) < 5000
    # a retry with the same key: the same answer, appended once, fanned out once
    assert await pub.request({**msg, "id": 3}) == {**first, "id": 3}
    assert len(r.xrange("fastws:stream:ev")) == 1
    assert (await sub.recv())["data"] == {"page": "/"}
    # the API too, with empty user and client
    status, body = api(srv, "/api/publish", {"channel": "ev:views", "data": 2})
    assert status == 200, body
    last = fields(r.xrange("fastws:stream:ev")[-1])
    assert (last["data"], last["user"], last["client"]) == ("2", "", "")
    assert last["offset"] == str(body["offset"])
    assert (await sub.recv())["data"] == 2
    # the append fails (the key holds a string): 503, nothing fanned out or kept
    r.set("fastws:stream:bad", "not a stream")
    assert (await sub.request({"id": 4, "type": "subscribe", "channel": "bad:x"}))[
        "type"] == "subscribed"
    err = await pub.request({"id": 5, "type": "publish", "channel": "bad:x", "data": 1})
    assert (err["type"], err["code"]) == ("error", 503), err
    status, body = api(srv, "/api/publish", {"channel": "bad:x", "data": 1})
    assert status == 503, body
    hist = await sub.request({"id": 6, "type": "history", "channel": "bad:x"})
    assert hist["publications"] == [] and hist["offset"] == 0, hist
    assert (await sub.request({"id": 7, "type": "ping"}))["type"] == "pong"  # no event came
    assert sub.messages.empty()


async def test_lifecycle_connect_disconnect_and_node_lost(tuned_server, redis_server) -> None:
    r = redis.Redis(port=redis_server.port)
    timings = {"PRESENCE_REFRESH": 0.3, "PRESENCE_EXPIRY": 1.0}
    a = tuned_server(timings, "--broker", redis_server.url, "--lifecycle-stream")
    b = tuned_server(timings, "--broker", redis_server.url, "--lifecycle-stream",
                     "--drain-timeout", "0.2")
    c = await connect(a.ws_url)
    await c.request({"id": 1, "type": "ping"})

    def events() -> list[dict[str, str]]:
        return [fields(e) for e in r.xrange("fastws:lifecycle")]

    await until(lambda: len(events()) == 1, 5)
    conn = events()[0]
    assert conn["event"] == "connect" and conn["ip"] == "127.0.0.1", conn
    assert conn["transport"] == "websocket" and conn["user"] == "" and conn["node"]
    c.close()
    t0 = time.monotonic()
    await until(lambda: len(events()) == 2, 5)
    assert time.monotonic() - t0 < 1.0
    gone = events()[1]
    assert (gone["event"], gone["client"], gone["code"]) == ("disconnect", conn["client"],
                                                             "1000")
    assert gone["reason"] == "normal closure", gone
    # a node dies: a survivor writes its connections' disconnect, once
    held = [await connect(a.ws_url) for _ in range(3)]
    for h in held:
        await h.request({"id": 1, "type": "ping"})
    await until(lambda: len(events()) == 5, 5)
    a.stop(signal.SIGKILL)
    await until(lambda: len(events()) == 8, 10)
    lost = events()[5:]
    assert {e["reason"] for e in lost} == {"node lost"} and {e["code"] for e in lost} == {
        "1006"}
    assert {e["node"] for e in lost} == {conn["node"]}
    await asyncio.sleep(1.0)   # more sweeps: nothing written twice
    evs = events()
    connects = [e["client"] for e in evs if e["event"] == "connect"]
    disconnects = [e["client"] for e in evs if e["event"] == "disconnect"]
    assert sorted(connects) == sorted(disconnects) and len(set(disconnects)) == 4
    # a drain: the node writes its connections' disconnect (4001) before it exits
    d = await connect(b.ws_url)
    await d.request({"id": 1, "type": "ping"})
    await until(lambda: len(events()) == 9, 5)
    assert b.stop() == 0
    last = events()[-1]
    assert (last["event"], last["code"], last["node"]) == ("disconnect", "4001",
                                                           events()[-2]["node"])
    assert last["reason"] == "server draining", last


async def test_lifecycle_disconnect_reasons(fastws_server, redis_server) -> None:
    """Each way a WebSocket ends gives its disconnect record a reason: the client's
    close frame text (else the code's standard description), the server's own close
    reason, "connection lost" for 1006."""
    r = redis.Redis(port=redis_server.port)
    srv = fastws_server("--broker", redis_server.url, "--lifecycle-stream",
                        "--jwt-secret", JWT_SECRET)

    def records(event: str) -> list[dict[str, str]]:
        return [f for f in map(fields, r.xrange("fastws:lifecycle")) if f["event"] == event]

    async def opened(query: str = "") -> tuple[RawClient, str]:
        """A connection and its client id (from its connect record)."""
        n = len(records("connect"))
        c = await connect(srv.ws_url + query)
        assert (await c.request({"id": 1, "type": "ping"}))["type"] == "pong"
        await until(lambda: len(records("connect")) == n + 1, 5)
        return c, records("connect")[-1]["client"]

    async def ended(client: str) -> tuple[str, str]:
        """The code and reason of ``client``'s disconnect record (once written)."""
        await until(lambda: any(f["client"] == client for f in records("disconnect")), 5)
        rec = next(f for f in records("disconnect") if f["client"] == client)
        return rec["code"], rec["reason"]

    # the client's close frame: its reason, else the code's description
    c, cid = await opened()
    c.transport.send_close(WSCloseCode.GOING_AWAY, b"tab closed")
    assert await ended(cid) == ("1001", "tab closed")
    c, cid = await opened()
    c.transport.send_close(WSCloseCode(4000))
    assert await ended(cid) == ("4000", "application close")
    c, cid = await opened()
    c.transport.send(WSMsgType.CLOSE, b"")          # a CLOSE without a code (RFC 6455)
    assert await ended(cid) == ("1005", "no status code")
    # the server's close: the reason it sent
    c, cid = await opened(f"?token={jwt_token('bob')}")
    assert api(srv, "/api/disconnect", {"user": "bob", "code": 4100,
                                        "reason": "kicked by an admin"})[0] == 200
    assert await ended(cid) == ("4100", "kicked by an admin")
    assert c.close_reason == "kicked by an admin"
    c, cid = await opened(f"?token={jwt_token('carol', ttl=1.5)}")
    assert await c.wait_closed() == 4501
    assert await ended(cid) == ("4501", "token expired")
    c, cid = await opened()
    c.transport.send(WSMsgType.BINARY, b"\x00")
    assert await ended(cid) == ("1003", "binary messages are not supported")
    c, cid = await opened()
    c.transport.send(WSMsgType.TEXT, b"\xff")       # a protocol violation: its close
    assert await ended(cid) == ("1007", "invalid UTF-8 in text message")
    # the TCP connection dropped without a close frame
    c, cid = await opened()
    c.transport.underlying_transport.abort()
    assert await ended(cid) == ("1006", "connection lost")


async def test_server_api_over_every_node(fastws_server, redis_server) -> None:
    toml = "[namespaces.chat]\npresence = true\n"
    n1 = fastws_server("--broker", redis_server.url, config=toml)
    n2 = fastws_server("--broker", redis_server.url, config=toml)
    c1, c2 = await connect(n1.ws_url), await connect(n2.ws_url)
    for c, chans in ((c1, ["chat:a"]), (c2, ["chat:a", "chat:b", "chat:*"])):
        for i, ch in enumerate(chans):
            assert (await c.request({"id": i, "type": "subscribe", "channel": ch}))[
                "type"] == "subscribed"
    status, body = api(n1, "/api/channels", {})
    assert status == 200 and body == {"channels": {"chat:a": {"num_clients": 2},
                                                   "chat:b": {"num_clients": 1}}}, body
    assert api(n2, "/api/channels", {"pattern": "*:b"})[1] == {
        "channels": {"chat:b": {"num_clients": 1}}}
    status, body = api(n1, "/api/info", {})
    assert status == 200 and len(body["nodes"]) == 2, body
    assert sorted(n["connections"] for n in body["nodes"]) == [1, 1]
    assert {"name", "version", "connections", "subscriptions", "uptime"} <= set(
        body["nodes"][0])
    status, body = api(n2, "/api/presence", {"channel": "chat:a"})
    assert status == 200 and (body["num_clients"], body["num_users"]) == (2, 0), body
    assert len(body["clients"]) == 2
    assert api(n1, "/api/presence_stats", {"channel": "chat:a"}) == (
        200, {"num_clients": 2, "num_users": 0})
    n1.publish("chat:a", {"n": 1})
    status, body = api(n2, "/api/history", {"channel": "chat:a", "limit": 10})
    assert status == 200 and [p["data"] for p in body["publications"]] == [{"n": 1}], body
    assert api(n2, "/api/history", {"channel": "chat:a", "limit": 10,
                                    "since": {"offset": 1, "epoch": body["epoch"]}})[1][
        "publications"] == []
    assert api(n1, "/api/presence", {"channel": "chat:*"})[0] == 400
    assert api(n1, "/api/presence", {"channel": "other:x"})[0] == 400
    status, _, _ = http("POST", n1.http_url + "/api/info", {})
    assert status == 401


@pytest.mark.parametrize(("text", "message"), [
    ("[proxy]\nconect = 'http://x'\ntimeot = 1\n",
     "[proxy]: unknown keys conect, timeot"),
    ("[namespaces.ev]\nstream = true\n", "namespaces.ev.stream: a stream namespace needs a "
                                         "Redis broker"),
    ("[server]\nlifecycle_stream = true\n", "server.lifecycle_stream: the lifecycle stream "
                                            "needs a Redis broker"),
    ("[namespaces.ev]\nsubscribe = 'proxy'\n", 'namespaces.ev.subscribe: "proxy" needs '
                                               "[proxy] subscribe"),
    ("[proxy]\nrpc = 'ftp://x'\n", "proxy.rpc: must be an http:// or https:// URL"),
])
async def test_startup_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fastws.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config({"config": str(path)}, {})
    assert str(ei.value).startswith(message), str(ei.value)


async def test_stream_namespaces_on_every_redis_broker(tmp_path: Path) -> None:
    """One master and a cluster (two steps there: tests/test_cluster_streams.py)."""
    path = tmp_path / "fastws.toml"
    path.write_text("[namespaces.ev]\nstream = true\n")
    for broker in ("redis+cluster://127.0.0.1:7000", "redis://127.0.0.1:6379/0"):
        cfg = load_config({"config": str(path), "broker": broker}, {})
        assert cfg.namespace("ev").stream and cfg.namespace("ev").stream_maxlen == 1000000
    with pytest.raises(ConfigError, match="needs a Redis broker"):
        load_config({"config": str(path), "broker": "memory://"}, {})
