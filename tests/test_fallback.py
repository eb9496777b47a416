"""Fallback transports (SPEC §10) end to end: GET /sse, GET /poll, POST /call.

Real servers on real sockets (and real redis-server for the two-node cases); the SSE
reader below is a plain asyncio stream that parses ``retry:``, ``id:``, ``data:`` and
comment lines as a browser's EventSource does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import uuid

import jwt
import orjson
import pytest
import redis.asyncio as aioredis
from conftest import api, http, scrape
from wsclient import connect

pytestmark = pytest.mark.timeout(90)

SECRET = "a-test-secret-of-at-least-32-bytes!!"
CONFIG = """
[server]
ping_interval = 1
[limits]
max_subscriptions = 3
[namespaces.chat]
publish = "anyone"
history_size = 100
[namespaces.room]
presence = true
"""


def uniq(prefix: str = "events") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


class Sse:
    """One SSE stream read like an EventSource: ``events`` are (id, data) of each
    dispatched event, ``retry`` the last retry field, ``comments`` how many came."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 status: int, headers: dict[str, str]) -> None:
        self.reader, self.writer = reader, writer
        self.status, self.headers = status, headers
        self.retry: int | None = None
        self.comments = 0
        self.last_id: str | None = None

    async def next(self, timeout: float = 10.0) -> dict | None:
        """The next message (a decoded ``data:`` line), None at the end of the stream."""
        data: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if data:
                    return json.loads("\n".join(data))
                continue
            if text.startswith(":"):
                self.comments += 1
                continue
            field, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "id":
                self.last_id = value
            elif field == "retry":
                self.retry = int(value)

    async def until(self, pred, timeout: float = 10.0) -> list[dict]:
        got = []
        while True:
            msg = await self.next(timeout)
            assert msg is not None, f"stream ended; got {got}"
            got.append(msg)
            if pred(msg):
                return got

    def close(self) -> None:
        self.writer.close()


async def open_sse(port: int, query: str, headers: dict[str, str] | None = None,
                   path: str = "/sse") -> Sse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    writer.write((head + "\r\n").encode())
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    hdrs: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return Sse(reader, writer, status, hdrs)


def cursor_of(positions: dict) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(positions)).rstrip(b"=").decode()


def poll(srv, query: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    status, hdrs, body = http("GET", f"{srv.http_url}/poll?{query}", headers=headers,
                              timeout=70)
    return status, hdrs, json.loads(body)


# ---------------------------------------------------------------------- SSE


async def test_sse_streams_channels_and_patterns_with_cursor_ids(fastws_server) -> None:
    srv = fastws_server(config=CONFIG)
    ch = uniq()
    s = await open_sse(srv.port, f"channel={ch}&channel=events:*")
    assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["cache-control"] == "no-store"
    first = await s.until(lambda m: m.get("id") == 2)
    assert [m["type"] for m in first] == ["subscribed", "subscribed"]
    assert 500 <= s.retry <= 5000
    await asyncio.to_thread(srv.publish, ch, {"n": 1})
    await asyncio.to_thread(srv.publish, "events:other", "x")
    ev = await s.next()
    # the same JSON as over WebSocket, one event per publication however many subs match
    assert ev == {"type": "event", "channel": ch, "offset": 1, "epoch": ev["epoch"],
                  "data": {"n": 1}}
    ev2 = await s.next()
    assert ev2["channel"] == "events:other" and ev2["data"] == "x"
    # the id names every subscription's position, in URL-safe characters only
    pos = orjson.loads(base64.urlsafe_b64decode(s.last_id + "=" * (-len(s.last_id) % 4)))
    assert pos == {ch: [1, ev["epoch"]], "events:*": [1, ev2["epoch"], "events:other"]}
    assert set(s.last_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789-_.~")
    # a comment every ping_interval (1 s here), nothing read from the client
    await asyncio.sleep(2.2)
    await asyncio.to_thread(srv.publish, ch, 2)
    assert (await s.next())["data"] == 2
    assert s.comments >= 1
    ws = await connect(srv.ws_url)   # the WebSocket side is unchanged meanwhile
    assert await ws.request({"id": 1, "type": "ping"}) == {"id": 1, "type": "pong"}
    metrics = await asyncio.to_thread(scrape, srv.http_url)
    assert metrics['fastws_transport_connections{transport="sse"}'] == 1
    assert metrics['fastws_transport_connections{transport="websocket"}'] == 1
    assert metrics["fastws_connections"] == 1
    s.close()


@pytest.mark.parametrize("how", ["last-event-id", "cursor", "last_event_id"])
async def test_sse_resumes_from_its_cursor(fastws_server, how) -> None:
    srv = fastws_server(config=CONFIG)
    ch = uniq("chat")
    s = await open_sse(srv.port, f"channel={ch}&channel=chat:*")
    await s.until(lambda m: m.get("id") == 2)
    for i in range(3):
        await asyncio.to_thread(srv.publish, ch, i)
    got = [await s.next() for _ in range(3)]
    assert [m["data"] for m in got] == [0, 1, 2]
    saved = s.last_id
    s.close()
    for i in range(3, 6):
        await asyncio.to_thread(srv.publish, ch, i)
    q = f"channel={ch}&channel=chat:*"
    hdrs = {}
    if how == "last-event-id":
        hdrs["Last-Event-ID"] = saved
        # the header wins over a query cursor
        q += "&cursor=" + cursor_of({ch: None, "chat:*": None})
    else:
        q += f"&{how}={saved}"
    s2 = await open_sse(srv.port, q, hdrs)
    msgs = await s2.until(lambda m: m.get("id") == 2 and m["type"] == "subscribed", 10)
    # each subscription replays what it missed, in order, then `subscribed` recovered
    events = [(m["channel"], m["data"]) for m in msgs if m["type"] == "event"]
    assert events == [(ch, 3), (ch, 4), (ch, 5)] * 2
    assert [m["recovered"] for m in msgs if m["type"] == "subscribed"] == [True, True]
    s2.close()


async def test_sse_cursor_of_other_channels_is_no_cursor(fastws_server) -> None:
    srv = fastws_server(config=CONFIG)
    ch = uniq("chat")
    await asyncio.to_thread(srv.publish, ch, 1)
    s = await open_sse(srv.port, f"channel={ch}&cursor=" + cursor_of({"chat:else": [0, ""]}))
    msg = await s.next()
    assert msg["type"] == "subscribed" and msg["recovered"] is False and msg["offset"] == 1
    s.close()


async def test_sse_bad_input_and_limits(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, config=CONFIG)
    base = srv.http_url
    st, _, body = http("GET", f"{base}/sse?channel=a:b&foo=1&bar=2")
    assert st == 400 and b"unknown query parameters: bar, foo" in body
    st, _, body = http("GET", f"{base}/sse?channel=a:b&cursor=%%%")
    assert st == 400 and b"cursor" in body
    st, _, body = http("GET", f"{base}/sse?channel=a:b&cursor=" + cursor_of([1, 2]))
    assert st == 400
    st, _, body = http("GET", f"{base}/sse?channel=a:1&channel=a:2&channel=a:3&channel=a:4")
    assert st == 400 and b"max_subscriptions" in body
    st, _, body = http("GET", f"{base}/sse")
    assert st == 400 and b"channel is required" in body
    st, _, body = http("GET", f"{base}/sse?channel=bad%20name")
    assert st == 400
    # permissions before any stream, with a JSON error body
    st, _, body = http("GET", f"{base}/sse?channel=user:alice")
    assert st == 401 and json.loads(body)["code"] == 401
    alice = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    st, _, body = http("GET", f"{base}/poll?channel=user:bob&token={alice}")
    assert st == 403 and json.loads(body)["type"] == "error"
    st, _, body = http("GET", f"{base}/sse?channel=user:alice&token=not-a-token")
    assert st == 401
    # ?token= and Bearer both authenticate
    s = await open_sse(srv.port, f"channel=user:alice&token={alice}")
    assert (await s.next())["type"] == "subscribed"
    s.close()
    s = await open_sse(srv.port, "channel=user:alice", {"Authorization": f"Bearer {alice}"})
    assert (await s.next())["type"] == "subscribed"
    await asyncio.to_thread(srv.publish, "user:alice", "hi")
    assert (await s.next())["data"] == "hi"
    s.close()
    st, _, _ = http("GET", f"{base}/poll?channel=a:b&timeout=0")
    assert st == 400


async def test_sse_connections_per_ip_429(fastws_server) -> None:
    srv = fastws_server(config="[limits]\nconnections_per_ip = 1\nconnections_per_ip_window = 60\n")
    # a loopback peer with X-Forwarded-For counts against that client (trusted proxy)
    xff = {"X-Forwarded-For": "203.0.113.7"}
    s = await open_sse(srv.port, "channel=a:b", xff)
    assert s.status == 200
    s2 = await open_sse(srv.port, "channel=a:b", xff)
    assert s2.status == 429 and int(s2.headers["retry-after"]) >= 1
    s.close()
    s2.close()


async def test_sse_presence_disconnect_and_revocation_reach_streams(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, config=CONFIG)
    alice = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    s = await open_sse(srv.port, f"channel=room:1&token={alice}")
    assert (await s.next())["type"] == "subscribed"
    ws = await connect(srv.ws_url)
    await ws.request({"id": 1, "type": "subscribe", "channel": "room:1"})
    join = await s.next()
    assert join["type"] == "join" and join["channel"] == "room:1"
    st, res = await asyncio.to_thread(api, srv.http_url, "/api/disconnect",
                                      {"user": "alice", "code": 4100, "reason": "bye"})
    assert st == 200, res
    msg = await s.next()
    assert msg["type"] == "disconnect" and msg["code"] == 4100
    assert await s.next() is None           # then the end of the stream
    s.close()


async def test_sse_drain_ends_with_disconnect(fastws_server) -> None:
    srv = fastws_server(config="[server]\ndrain_timeout = 3\n")
    s = await open_sse(srv.port, "channel=events:d")
    await s.next()
    for i in range(20):
        await asyncio.to_thread(srv.publish, "events:d", i)
    srv.proc.send_signal(signal.SIGTERM)
    got = [(await s.next())["data"] for _ in range(20)]
    assert got == list(range(20))
    msg = await s.next()
    assert msg["type"] == "disconnect" and msg["code"] == 4001 and msg["reconnect"] is True
    assert s.retry >= 500                   # a plain EventSource waits after_ms too
    assert await s.next() is None
    # a draining node answers a new stream 200 + disconnect (a non-200 would stop an
    # EventSource for good)
    late = await open_sse(srv.port, "channel=events:d")
    assert late.status == 200
    assert (await late.next())["type"] == "disconnect"
    assert await late.next() is None
    late.close()
    # and a long-poll gets its answer at once: the disconnect message
    st, _, res = await asyncio.to_thread(poll, srv, "channel=events:d")
    assert st == 200 and res["messages"][-1]["type"] == "disconnect"
    assert await asyncio.to_thread(srv.proc.wait, 10) == 0


async def test_sse_raw_redis_publish_with_newlines(redis_server, fastws_server) -> None:
    srv = fastws_server("--broker", redis_server.url)
    s = await open_sse(srv.port, "channel=events:raw")
    await s.next()
    r = aioredis.from_url(redis_server.url)
    await r.publish("events:raw", '{"a":\n 1}')
    await r.aclose()
    msg = await s.next()
    assert msg["data"] == {"a": 1}
    s.close()


# ---------------------------------------------------------------------- long-poll


async def test_poll_cursor_timeout_and_wakeup(fastws_server) -> None:
    srv = fastws_server(config=CONFIG)
    ch = uniq("chat")
    st, hdrs, first = await asyncio.to_thread(poll, srv, f"channel={ch}")
    assert st == 200 and hdrs["Cache-Control"] == "no-store"
    assert [m["type"] for m in first["messages"]] == ["subscribed"]
    cur = first["cursor"]
    await asyncio.to_thread(srv.publish, ch, 1)
    st, _, res = await asyncio.to_thread(poll, srv, f"channel={ch}&cursor={cur}")
    assert [m["data"] for m in res["messages"]] == [1]      # at once, from history
    cur = res["cursor"]
    # nothing newer: answered after the timeout, empty, same position
    st, _, res = await asyncio.to_thread(poll, srv, f"channel={ch}&cursor={cur}&timeout=1")
    assert res == {"messages": [], "cursor": cur}
    # a publication while it waits answers it
    waiting = asyncio.create_task(asyncio.to_thread(poll, srv,
                                                    f"channel={ch}&cursor={cur}&timeout=30"))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(srv.publish, ch, 2)
    st, _, res = await asyncio.wait_for(waiting, 10)
    assert [m["data"] for m in res["messages"]] == [2]
    metrics = await asyncio.to_thread(scrape, srv.http_url)
    assert metrics['fastws_transport_connections{transport="poll"}'] == 0


@pytest.mark.parametrize("kind", ["channel", "pattern"])
async def test_poll_across_two_nodes_loses_nothing(redis_server, fastws_server, kind) -> None:
    cfg = "[namespaces.chat]\nhistory_size = 1000\n"
    a = fastws_server("--broker", redis_server.url, config=cfg)
    b = fastws_server("--broker", redis_server.url, config=cfg)
    ch = uniq("chat")
    sub = ch if kind == "channel" else ch[:9] + "*"
    _, _, res = await asyncio.to_thread(poll, a, f"channel={sub}")
    cur = res["cursor"]

    async def publisher() -> None:
        for i in range(60):
            await asyncio.to_thread((a if i % 2 else b).publish, ch, i)

    task = asyncio.create_task(publisher())
    seen: list[int] = []
    turn = 0
    while len(seen) < 60:
        srv = (a, b)[turn % 2]  # no sticky sessions: every poll on the other node
        turn += 1
        _, _, res = await asyncio.to_thread(poll, srv, f"channel={sub}&cursor={cur}&timeout=5")
        seen += [m["data"] for m in res["messages"] if m["type"] == "event"]
        cur = res["cursor"]
        assert turn < 500
    await task
    assert seen == list(range(60))          # every publication once, in order


# ---------------------------------------------------------------------- HTTP calls


def test_call_answers_as_the_websocket(fastws_server) -> None:
    srv = fastws_server(config=CONFIG)
    url = srv.http_url + "/call"
    st, _, body = http("POST", url, {"id": 1, "type": "ping"})
    assert st == 200 and json.loads(body) == {"id": 1, "type": "pong"}
    st, _, body = http("POST", url, {"id": 2, "type": "publish", "channel": "chat:c",
                                     "data": {"t": 1}})
    assert st == 200 and json.loads(body)["type"] == "published"
    st, _, body = http("POST", url, {"id": 3, "type": "history", "channel": "chat:c"})
    assert st == 200 and json.loads(body)["publications"][0]["data"] == {"t": 1}
    st, _, body = http("POST", url, {"id": 4, "type": "publish", "channel": "events:x",
                                     "data": 1})
    assert st == 403 and json.loads(body) == {"id": 4, "type": "error", "code": 403,
                                              "message": json.loads(body)["message"]}
    st, _, body = http("POST", url, {"id": 5, "type": "subscribe", "channel": "chat:c"})
    assert st == 400 and b"stream" in body
    st, _, body = http("POST", url, {"id": 6, "type": "nope"})
    assert st == 404
    st, _, body = http("POST", url, b"{not json")
    assert st == 400
    st, _, body = http("POST", url, {"id": 7, "type": "presence", "channel": "room:1"})
    assert st == 200 and json.loads(body)["clients"] == []
    st, _, body = http("POST", url, {"id": 8, "type": "auth", "token": "x"})
    assert st == 401
    assert http("GET", url)[0] == 405


# ---------------------------------------------------------------------- CORS


async def test_cors_on_all_three(fastws_server) -> None:
    srv = fastws_server(config='[server]\nallow_origins = ["https://app.example"]\n')
    good = {"Origin": "https://app.example"}
    for path, method in (("/sse", "GET"), ("/poll", "GET"), ("/call", "POST")):
        st, hdrs, _ = http("OPTIONS", srv.http_url + path, headers={
            **good, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, last-event-id"})
        assert st == 204
        assert hdrs["Access-Control-Allow-Origin"] == "https://app.example"
        assert method in hdrs["Access-Control-Allow-Methods"]
        assert "Last-Event-ID" in hdrs["Access-Control-Allow-Headers"]
    st, hdrs, _ = http("GET", srv.http_url + "/poll?channel=a:b", headers=good)
    assert st == 200 and hdrs["Access-Control-Allow-Origin"] == "https://app.example"
    st, hdrs, _ = http("POST", srv.http_url + "/call", {"type": "ping"}, headers=good)
    assert st == 200 and hdrs["Access-Control-Allow-Origin"] == "https://app.example"
    s = await open_sse(srv.port, "channel=a:b", good)
    assert s.status == 200 and s.headers["access-control-allow-origin"] == "https://app.example"
    s.close()
    bad = {"Origin": "https://evil.example"}
    assert http("GET", srv.http_url + "/sse?channel=a:b", headers=bad)[0] == 403
    assert http("GET", srv.http_url + "/poll?channel=a:b", headers=bad)[0] == 403
    assert http("POST", srv.http_url + "/call", {"type": "ping"}, headers=bad)[0] == 403


async def test_sse_max_connections_and_slow_consumer(fastws_server) -> None:
    srv = fastws_server(config="[limits]\nmax_connections = 1\nsend_buffer = 65536\n")
    s = await open_sse(srv.port, "channel=big:y")
    assert (await s.next())["type"] == "subscribed"
    st, hdrs, body = await asyncio.to_thread(http, "GET", srv.http_url + "/poll?channel=a:b")
    assert st == 429 and hdrs["Retry-After"] and json.loads(body)["code"] == 429
    # a stream that reads nothing: past send_buffer it is dropped as a slow consumer
    blob = "y" * (256 * 1024)
    for _ in range(64):
        await asyncio.to_thread(srv.publish, "big:y", blob)
        metrics = await asyncio.to_thread(scrape, srv.http_url)
        if metrics["fastws_slow_consumer_disconnects_total"]:
            break
    assert metrics["fastws_slow_consumer_disconnects_total"] == 1
    for _ in range(50):
        metrics = await asyncio.to_thread(scrape, srv.http_url)
        if metrics['fastws_connections_closed_total{code="4008"}']:
            break
        await asyncio.sleep(0.1)
    assert metrics['fastws_connections_closed_total{code="4008"}'] == 1
    assert metrics['fastws_transport_connections{transport="sse"}'] == 0
    s.close()
