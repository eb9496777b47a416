"""SPEC §10 × §11–§12: the backend integration over the fallback transports.

GET /sse, GET /poll and POST /call go through the connect proxy as a WebSocket upgrade
does (the same statuses, failing closed; the backend's user, channels and meta applied
to the session); rpc and presence_stats over /call; the subscribe and publish proxies
over SSE and /call; lifecycle records for SSE streams (and none for long-polls and
calls).  A real aiohttp backend (tests/backend_helpers.py), real servers and sockets.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest
import redis
from backend_helpers import Backend
from conftest import API_KEY, scrape
from redis_helpers import until
from test_backend_proxy import connect_handler
from test_fallback import open_sse

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

SECRET = "a-test-secret-of-at-least-32-bytes!!"
NAMESPACES = """
[namespaces.room]
presence = true
publish = "authenticated"
"""
PROXIED = """
[namespaces.prices]
subscribe = "proxy"
publish = "proxy"
"""


async def request(method: str, url: str, body: Any = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP request without blocking the loop (the backend runs in it): (status,
    headers, decoded JSON body)."""
    async with aiohttp.ClientSession() as http, http.request(
            method, url, json=body, headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=30)) as res:
        return res.status, dict(res.headers), await res.json(content_type=None)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_connect_proxy_admits_sse_poll_and_call(fastws_server) -> None:
    async with Backend(connect=connect_handler) as be:
        srv = fastws_server("--jwt-secret", SECRET,
                            config=be.proxy_toml("connect", timeout=0.5,
                                                 headers=["Authorization", "X-Tenant"])
                            + NAMESPACES)
        port = srv.port
        # /sse: accepted as the backend's user, its meta and client id on the session
        s = await open_sse(port, "channel=room:1&token=tok-alice", {"X-Tenant": "acme"})
        assert s.status == 200
        sub = await s.next()
        assert (sub["type"], sub["channel"]) == ("subscribed", "room:1"), sub
        call = be.calls["connect"][-1]
        assert call["transport"] == "sse" and call["token"] == "tok-alice"
        assert call["ip"] == "127.0.0.1" and call["headers"] == {"X-Tenant": "acme"}
        sse_client = call["client"]
        st, _, body = await request("POST", srv.http_url + "/call",
                                    {"id": 1, "type": "presence", "channel": "room:1"},
                                    bearer("tok-bob"))
        assert st == 200 and body["clients"] == [{"client": sse_client, "user": "alice"}]
        assert be.calls["connect"][-1]["transport"] == "http"
        m = scrape(srv.http_url)
        assert m['fastws_transport_connections{transport="sse"}'] == 1
        # the result's channels narrow what the namespace allows, as over a WebSocket
        s2 = await open_sse(port, "channel=other:x&token=tok-alice")
        assert s2.status == 403
        s2.close()
        # /poll and /call: accepted, with the poll / http transport
        st, _, body = await request("GET", srv.http_url + "/poll?channel=room:2",
                                    headers=bearer("tok-alice"))
        assert st == 200 and body["messages"][0]["type"] == "subscribed", body
        assert be.calls["connect"][-1]["transport"] == "poll"
        st, _, body = await request("POST", srv.http_url + "/call",
                                    {"id": 2, "type": "publish", "channel": "room:1",
                                     "data": {"from": "call"}}, bearer("tok-alice"))
        assert st == 200 and body["type"] == "published", body
        assert (await s.next())["data"] == {"from": "call"}
        # refused with the backend's status (no token: 401), or 503 when it fails
        cases = [("", 401), ("nope", 403), ("garbage", 503), ("html", 503), ("slow", 503)]
        for token, status in cases:
            q = f"&token={token}" if token else ""
            r = await open_sse(port, "channel=room:1" + q)
            assert r.status == status, (token, r.status)
            if status == 503:
                assert r.headers["retry-after"] == "1"
            r.close()
            hdrs = bearer(token) if token else {}
            st, h, body = await request("GET", srv.http_url + "/poll?channel=room:1",
                                        headers=hdrs)
            assert (st, body["type"]) == (status, "error"), (token, st, body)
            st, h, body = await request("POST", srv.http_url + "/call",
                                        {"id": 3, "type": "ping"}, hdrs)
            assert (st, body["type"]) == (status, "error"), (token, st, body)
            if status == 503:
                assert h["Retry-After"] == "1"
        # the backend's disconnect: accepted, then ended with its code
        k = await open_sse(port, "channel=room:1&token=kick")
        assert k.status == 200
        push = await k.next()
        assert (push["type"], push["code"]) == ("disconnect", 4601), push
        assert await k.next() is None
        st, _, body = await request("GET", srv.http_url + "/poll?channel=room:1",
                                    headers=bearer("kick"))
        assert st == 200 and [m["type"] for m in body["messages"]] == ["disconnect"]
        assert body["messages"][0]["code"] == 4601
        st, _, body = await request("POST", srv.http_url + "/call",
                                    {"id": 4, "type": "publish", "channel": "room:1",
                                     "data": "never"}, bearer("kick"))
        assert st == 200 and (body["type"], body["code"]) == ("disconnect", 4601), body
        # a valid JWT skips the backend on every transport
        before = len(be.calls["connect"])
        alice = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
        j = await open_sse(port, f"channel=room:1&token={alice}")
        assert j.status == 200 and (await j.next())["type"] == "subscribed"
        st, _, _ = await request("GET", srv.http_url + "/poll?channel=room:1",
                                 headers=bearer(alice))
        assert st == 200
        st, _, _ = await request("POST", srv.http_url + "/call",
                                 {"id": 5, "type": "ping"}, bearer(alice))
        assert st == 200
        assert len(be.calls["connect"]) == before
        j.close()
        s.close()
        m = scrape(srv.http_url)
        assert m['fastws_proxy_requests_total{kind="connect",result="ok"}'] >= 4
        assert m['fastws_proxy_requests_total{kind="connect",result="timeout"}'] == 3
    # the backend is gone: 503 on all three, nothing accepted
    r = await open_sse(port, "channel=room:1&token=tok-alice")
    assert r.status == 503
    r.close()
    st, _, _ = await request("GET", srv.http_url + "/poll?channel=room:1",
                             headers=bearer("tok-alice"))
    assert st == 503
    st, _, _ = await request("POST", srv.http_url + "/call", {"id": 6, "type": "ping"},
                             bearer("tok-alice"))
    assert st == 503
    assert "Traceback" not in srv.output()


async def test_rpc_and_presence_stats_over_call(fastws_server) -> None:
    async def rpc(body: dict[str, Any]) -> Any:
        if body["method"] == "get:price":
            return {"result": {"data": {"price": 42.5, "user": body["user"],
                                        "client": body["client"], "meta": body["meta"]}}}
        if body["method"] == "private":
            return {"error": {"code": 403, "message": "not for you"}}
        if body["method"] == "slow":
            await asyncio.sleep(2)
            return {"result": {"data": 1}}
        if body["method"] == "bye":
            return {"disconnect": {"code": 4700, "reason": "bye"}}
        return {"error": {"code": 404, "message": "unknown method"}}

    async with Backend(connect=connect_handler, rpc=rpc) as be:
        srv = fastws_server(config=be.proxy_toml("connect", "rpc", timeout=0.5)
                            + NAMESPACES)
        url = srv.http_url + "/call"
        st, _, body = await request("POST", url, {"id": 1, "type": "rpc",
                                                  "method": "get:price", "data": {}},
                                    bearer("tok-alice"))
        client = be.calls["connect"][-1]["client"]
        assert st == 200 and body == {"id": 1, "type": "rpc", "data": {
            "price": 42.5, "user": "alice", "client": client,
            "meta": {"plan": "pro", "token": "tok-alice"}}}, body
        for method, status in (("private", 403), ("nope", 404), ("slow", 504)):
            st, _, body = await request("POST", url, {"id": 2, "type": "rpc",
                                                      "method": method},
                                        bearer("tok-alice"))
            assert (st, body["type"], body["code"]) == (status, "error", status), body
        st, _, body = await request("POST", url, {"id": 3, "type": "rpc", "method": "bye"},
                                    bearer("tok-alice"))
        assert st == 200 and (body["type"], body["code"]) == ("disconnect", 4700), body
        st, _, body = await request("POST", url, {"id": 4, "type": "rpc"},
                                    bearer("tok-alice"))
        assert st == 400, body
        # presence_stats: an SSE stream (admitted by the backend) is in the presence
        s = await open_sse(srv.port, "channel=room:1&token=tok-alice")
        assert (await s.next())["type"] == "subscribed"
        st, _, body = await request("POST", url, {"id": 5, "type": "presence_stats",
                                                  "channel": "room:1"}, bearer("tok-bob"))
        assert st == 200 and body == {"id": 5, "type": "presence_stats", "num_clients": 1,
                                      "num_users": 1}, body
        st, _, body = await request("POST", url, {"id": 6, "type": "presence_stats",
                                                  "channel": "other:1"}, bearer("tok-bob"))
        assert st == 403, body      # no presence in that namespace
        st, _, body = await request("POST", url, {"id": 7, "type": "presence_stats",
                                                  "channel": "room:*"}, bearer("tok-bob"))
        assert st == 400, body
        s.close()
    # the rpc backend is down: 503
    st, _, body = await request("POST", url, {"id": 8, "type": "rpc", "method": "x"},
                                bearer("tok-alice"))
    assert st == 503, body
    # no [proxy] rpc: 404 unknown method, as over a WebSocket
    plain = fastws_server(config=NAMESPACES)
    st, _, body = await request("POST", plain.http_url + "/call",
                                {"id": 9, "type": "rpc", "method": "get:price"})
    assert (st, body["message"]) == (404, "unknown method"), body


async def test_subscribe_proxy_over_sse_and_publish_proxy_over_call(fastws_server) -> None:
    def subscribe(body: dict[str, Any]) -> Any:
        if body["channel"] == "prices:secret":
            return {"error": {"code": 403, "message": "not in this room"}}
        return {"result": {"data": {"price": 42.5}}}

    def publish(body: dict[str, Any]) -> Any:
        if body["data"] == "spam":
            return {"error": {"code": 403, "message": "no spam"}}
        return {"result": {"data": {**body["data"], "checked": body["user"]}}}

    async with Backend(connect=connect_handler, subscribe=subscribe,
                       publish=publish) as be:
        srv = fastws_server(config=be.proxy_toml("connect", "subscribe", "publish")
                            + NAMESPACES + PROXIED)
        s = await open_sse(srv.port, "channel=prices:eth&token=tok-alice")
        assert s.status == 200
        sub = await s.next()
        assert (sub["type"], sub["channel"], sub["data"]) == (
            "subscribed", "prices:eth", {"price": 42.5}), sub
        client = be.calls["connect"][-1]["client"]
        assert be.calls["subscribe"][-1] == {"client": client, "user": "alice",
                                             "channel": "prices:eth",
                                             "meta": {"plan": "pro", "token": "tok-alice"}}
        # refused by the backend: that subscription's error on the stream
        r = await open_sse(srv.port, "channel=prices:secret&token=tok-alice")
        err = await r.next()
        assert (err["type"], err["code"], err["message"]) == ("error", 403,
                                                              "not in this room"), err
        r.close()
        # and a long-poll answers the backend's refusal with its status
        st, _, body = await request("GET", srv.http_url + "/poll?channel=prices:secret",
                                    headers=bearer("tok-bob"))
        assert (st, body["message"]) == (403, "not in this room"), body
        # publish over /call: the backend rewrites the data the stream receives
        st, _, body = await request("POST", srv.http_url + "/call",
                                    {"id": 2, "type": "publish", "channel": "prices:eth",
                                     "data": {"price": 43}}, bearer("tok-bob"))
        assert st == 200 and body["type"] == "published", body
        assert be.calls["publish"][-1]["user"] == "bob"
        ev = await s.next()
        assert ev["data"] == {"price": 43, "checked": "bob"}, ev
        st, _, body = await request("POST", srv.http_url + "/call",
                                    {"id": 3, "type": "publish", "channel": "prices:eth",
                                     "data": "spam"}, bearer("tok-bob"))
        assert (st, body["message"]) == (403, "no spam"), body
        s.close()


async def test_lifecycle_records_sse_streams_not_polls(fastws_server, redis_server) -> None:
    r = redis.Redis(port=redis_server.port)

    def events() -> list[dict[str, str]]:
        return [{k.decode(): v.decode() for k, v in e[1].items()}
                for e in r.xrange("fastws:lifecycle")]

    async with Backend(connect=connect_handler) as be:
        srv = fastws_server("--broker", redis_server.url, "--lifecycle-stream",
                            config=be.proxy_toml("connect") + NAMESPACES)
        s = await open_sse(srv.port, "channel=room:1&token=tok-alice")
        assert (await s.next())["type"] == "subscribed"
        await until(lambda: len(events()) == 1, 5)
        conn = events()[0]
        assert (conn["event"], conn["transport"], conn["user"], conn["ip"]) == (
            "connect", "sse", "alice", "127.0.0.1"), conn
        assert conn["client"] == be.calls["connect"][-1]["client"]
        s.close()
        t0 = time.monotonic()
        await until(lambda: len(events()) == 2, 5)
        assert time.monotonic() - t0 < 1.0
        gone = events()[1]
        assert (gone["event"], gone["client"]) == ("disconnect", conn["client"]), gone
        assert (gone["code"], gone["reason"]) == ("1001", "stream closed by the client"), gone
        # a stream the server ends: one disconnect with its code and reason
        s2 = await open_sse(srv.port, "channel=room:2&token=tok-bob")
        assert (await s2.next())["type"] == "subscribed"
        await until(lambda: len(events()) == 3, 5)
        st, _, _ = await request("POST", srv.http_url + "/api/disconnect",
                                 {"user": "bob", "code": 4100, "reason": "kicked"},
                                 bearer(API_KEY))
        assert st == 200
        assert (await s2.next())["type"] == "disconnect"
        assert await s2.next() is None
        await until(lambda: len(events()) == 4, 5)
        last = events()[3]
        assert last["event"] == "disconnect" and last["client"] == events()[2]["client"]
        assert (last["code"], last["reason"]) == ("4100", "kicked"), last
        # long-polls, calls, a stream the backend disconnects: no records
        for _ in range(3):
            st, _, _ = await request("GET", srv.http_url + "/poll?channel=room:1&timeout=1",
                                     headers=bearer("tok-alice"))
            assert st == 200
        st, _, _ = await request("POST", srv.http_url + "/call",
                                 {"id": 1, "type": "publish", "channel": "room:1",
                                  "data": 1}, bearer("tok-alice"))
        assert st == 200
        k = await open_sse(srv.port, "channel=room:1&token=kick")
        assert (await k.next())["type"] == "disconnect"
        k.close()
        j = await open_sse(srv.port, "channel=room:9&token=tok-alice")   # a marker
        assert (await j.next())["type"] == "subscribed"
        await until(lambda: len(events()) == 5, 5)
        assert events()[4]["event"] == "connect"
        j.close()
        await until(lambda: len(events()) == 6, 5)
        # a drain ends a stream with 4001, and writes its disconnect before the exit
        d = await open_sse(srv.port, "channel=room:1&token=tok-alice")
        assert (await d.next())["type"] == "subscribed"
        await until(lambda: len(events()) == 7, 5)
        assert await asyncio.to_thread(srv.stop) == 0
        assert (await d.next())["code"] == 4001
    evs = events()
    assert (evs[-1]["event"], evs[-1]["code"], evs[-1]["client"], evs[-1]["reason"]) == (
        "disconnect", "4001", evs[-2]["client"], "server draining"), evs[-1]
    connects = [e["client"] for e in evs if e["event"] == "connect"]
    disconnects = [e["client"] for e in evs if e["event"] == "disconnect"]
    assert sorted(connects) == sorted(disconnects) and len(set(connects)) == 4
