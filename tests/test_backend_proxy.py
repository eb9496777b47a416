"""SPEC §11: the connect, subscribe, publish and rpc proxies against a real aiohttp
backend, presence_stats, and failing closed (backend down, slow, answering garbage)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from backend_helpers import Backend
from conftest import free_port
from wsclient import connect

pytestmark = pytest.mark.asyncio

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


def connect_handler(body: dict[str, Any]) -> Any:
    token = body["token"]
    if token in TOKENS:
        return {"result": {"user": TOKENS[token], "meta": {"plan": "pro", "token": token},
                           "channels": ["room:*", "ev:*", "prices:*"]}}
    if token == "kick":
        return {"disconnect": {"code": 4601, "reason": "account closed"}}
    if token == "garbage":
        return b'{"result": {"no_user": 1}}'
    if token == "html":
        return web.Response(text="<html>oops</html>", status=502)
    if token == "slow":
        return asyncio.sleep(3, {"result": {"user": "late"}})
    return {"error": {"code": 401 if token is None else 403, "message": "bad token"}}


async def upgrade_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a WebSocket upgrade (101 when accepted)."""
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, headers=headers or {})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_connect_proxy_accepts_refuses_and_fails_closed(fastws_server) -> None:
    async with Backend(connect=connect_handler) as be:
        srv = fastws_server(config=be.proxy_toml("connect", timeout=0.5,
                                                 headers=["Authorization", "X-Tenant"]))
        # accepted as the backend's user; the later requests know it
        c = await connect(srv.ws_url + "?token=tok-alice",
                          extra_headers={"X-Tenant": "acme", "X-Secret": "s3"})
        assert (await c.request({"id": 1, "type": "ping"}))["type"] == "pong"
        call = be.calls["connect"][-1]
        assert call["token"] == "tok-alice" and call["transport"] == "websocket"
        assert call["ip"] == "127.0.0.1" and call["client"]
        assert call["headers"] == {"X-Tenant": "acme"}   # only the listed headers
        # the result's channels narrow what the namespace allows, like a JWT claim
        err = await c.request({"id": 2, "type": "subscribe", "channel": "other:x"})
        assert err["code"] == 403, err
        assert (await c.request({"id": 3, "type": "subscribe", "channel": "room:1"}))[
            "type"] == "subscribed"
        c.close()
        # refused with the backend's status; no token → 401
        assert await upgrade_status(srv.ws_url + "?token=nope") == 403
        assert await upgrade_status(srv.ws_url) == 401
        assert await upgrade_status(srv.ws_url, {"Authorization": "Bearer nope"}) == 403
        # disconnect: accepted, then closed with the backend's code
        k = await connect(srv.ws_url + "?token=kick")
        push = await k.recv()
        assert push["type"] == "disconnect" and push["code"] == 4601, push
        assert await k.wait_closed() == 4601
        # garbage, a 502 page, a slow backend: 503, never let in
        for bad in ("garbage", "html", "slow"):
            assert await upgrade_status(srv.ws_url + f"?token={bad}") == 503, bad
    # the backend is gone: 503 as well
    assert await upgrade_status(srv.ws_url + "?token=tok-alice") == 503
    out = srv.output()
    assert "Traceback" not in out
    assert be.url("connect") in out
    assert out.count("proxy backend") <= 2   # once per interval per URL


async def test_subscribe_publish_rpc_proxies(fastws_server) -> None:
    def subscribe(body: dict[str, Any]) -> Any:
        if body["channel"] == "room:secret":
            return {"error": {"code": 403, "message": "not in this room"}}
        if body["channel"] == "room:price":
            return {"result": {"data": {"price": 42.5}}}
        return {"result": {}}

    def publish(body: dict[str, Any]) -> Any:
        if body["data"] == "spam":
            return {"error": {"code": 403, "message": "no spam"}}
        if isinstance(body["data"], dict):
            return {"result": {"data": {**body["data"], "checked": body["user"]}}}
        return {"result": {}}

    async def rpc(body: dict[str, Any]) -> Any:
        if body["method"] == "get:price":
            return {"result": {"data": {"symbol": body["data"]["symbol"], "price": 42.5,
                                        "plan": body["meta"]["plan"]}}}
        if body["method"] == "slow":
            await asyncio.sleep(2)
            return {"result": {"data": 1}}
        if body["method"] == "bye":
            return {"disconnect": {"code": 4700, "reason": "bye"}}
        return {"error": {"code": 404, "message": "unknown method"}}

    async with Backend(connect=connect_handler, subscribe=subscribe, publish=publish,
                       rpc=rpc) as be:
        srv = fastws_server(config=be.proxy_toml("connect", "subscribe", "publish", "rpc",
                                                 timeout=0.5, max_in_flight=2) +
                            '[namespaces.room]\nsubscribe = "proxy"\npublish = "proxy"\n'
                            "presence = true\n")
        c = await connect(srv.ws_url + "?token=tok-alice")
        client_id = be.calls["connect"][-1]["client"]
        r = await c.request({"id": 1, "type": "subscribe", "channel": "room:1"})
        assert r["type"] == "subscribed", r
        call = be.calls["subscribe"][-1]
        assert call == {"client": client_id, "user": "alice", "channel": "room:1",
                        "meta": {"plan": "pro", "token": "tok-alice"}}
        assert "data" not in r
        r = await c.request({"id": 20, "type": "subscribe", "channel": "room:price"})
        assert r == {"id": 20, "type": "subscribed", "channel": "room:price",
                     "data": {"price": 42.5}}, r
        r = await c.request({"id": 2, "type": "subscribe", "channel": "room:secret"})
        assert (r["type"], r["code"], r["message"]) == ("error", 403, "not in this room")
        # history of a proxy namespace: subscribers only (they passed the backend)
        assert (await c.request({"id": 3, "type": "history", "channel": "room:2"}))[
            "code"] == 403
        assert (await c.request({"id": 4, "type": "history", "channel": "room:1"}))[
            "type"] == "history"
        # publish: rewritten by the backend, refused, or as sent
        r = await c.request({"id": 5, "type": "publish", "channel": "room:1",
                             "data": {"text": "hi"}})
        assert r["type"] == "published", r
        ev = await c.recv()
        assert ev["data"] == {"text": "hi", "checked": "alice"}, ev
        r = await c.request({"id": 6, "type": "publish", "channel": "room:1", "data": "spam"})
        assert (r["code"], r["message"]) == (403, "no spam")
        # rpc
        r = await c.request({"id": 7, "type": "rpc", "method": "get:price",
                             "data": {"symbol": "ETH"}})
        assert r == {"id": 7, "type": "rpc", "data": {"symbol": "ETH", "price": 42.5,
                                                      "plan": "pro"}}
        r = await c.request({"id": 8, "type": "rpc", "method": "nope"})
        assert (r["type"], r["code"]) == ("error", 404)
        # slow: 504; beyond max_in_flight: 429 at once
        for i in (10, 11, 12):
            c.send({"id": i, "type": "rpc", "method": "slow"})
        replies = {}
        for _ in range(3):
            m = await c.recv()
            replies[m["id"]] = m
        assert replies[12]["code"] == 429, replies
        assert replies[10]["code"] == replies[11]["code"] == 504, replies
        # presence_stats
        r = await c.request({"id": 13, "type": "presence_stats", "channel": "room:1"})
        assert r == {"id": 13, "type": "presence_stats", "num_clients": 1, "num_users": 1}
        # a backend disconnect closes the connection with its code
        c.send({"id": 14, "type": "rpc", "method": "bye"})
        assert (await c.recv())["code"] == 4700
        assert await c.wait_closed() == 4700
        # metrics per kind and result, with latency histograms
        async with aiohttp.ClientSession() as http, http.get(srv.http_url + "/metrics") as m:
            text = await m.text()
        assert 'fastws_proxy_requests_total{kind="rpc",result="timeout"} 2.0' in text
        assert 'fastws_proxy_requests_total{kind="subscribe",result="error"} 1.0' in text
        assert 'fastws_proxy_requests_total{kind="subscribe",result="ok"} 2.0' in text
        assert 'fastws_proxy_duration_seconds_count{kind="connect"} 1.0' in text
    # the backend is gone: 503 for subscribe/publish/rpc
    async with Backend(connect=connect_handler) as be2:
        srv2 = fastws_server(config=be2.proxy_toml("connect") +
                             f'rpc = "http://127.0.0.1:{free_port()}/rpc"\n')
        c = await connect(srv2.ws_url + "?token=tok-bob")
        r = await c.request({"id": 1, "type": "rpc", "method": "get:price"})
        assert (r["type"], r["code"]) == ("error", 503), r
        c.close()


async def test_rpc_without_backend_is_unknown_method(server) -> None:
    c = await connect(server.ws_url)
    r = await c.request({"id": 8, "type": "rpc", "method": "get:price", "data": {}})
    assert (r["type"], r["code"], r["message"]) == ("error", 404, "unknown method")
    r = await c.request({"id": 9, "type": "rpc"})
    assert r["code"] == 400
    c.close()
