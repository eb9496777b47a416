"""POST /api/disconnect: every connection of a user, on every node sharing one real
Redis, gets the disconnect push and the close code; others are untouched; bad bodies
answer 400 with a reason, no API key 401; the memory broker disconnects locally."""

from __future__ import annotations

import time

import jwt
import pytest
from conftest import API_KEY, api, assert_api_guarded
from wsclient import RawClient, connect, connect_with_token

from fastws.codes import Close

pytestmark = pytest.mark.timeout(60)

SECRET = "disconnect-test-secret-of-32-bytes-plus"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def disconnect(base: str, body: object, headers: dict[str, str] | None = AUTH
               ) -> tuple[int, dict]:
    return api(base, "/api/disconnect", body, headers)


async def as_user(ws_url: str, user: str) -> RawClient:
    """A connection authenticated as ``user``, proven live by a ping round trip."""
    return await connect_with_token(ws_url, token(user))


async def until_closed(c: RawClient) -> tuple[dict, int | None]:
    """The disconnect push, and the close code that follows it."""
    push = await c.recv()
    code = await c.wait_closed()
    return push, code


async def test_disconnect_user_on_every_node(redis_server, fastws_server) -> None:
    a = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    b = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    alice_a = await as_user(a.ws_url, "alice")
    alice_a2 = await as_user(a.ws_url, "alice")
    alice_b = await as_user(b.ws_url, "alice")
    bob_b = await as_user(b.ws_url, "bob")
    # a pattern matching every name (PSUBSCRIBE * in Redis) hears no control message
    watcher = await as_user(b.ws_url, "dave")
    reply = await watcher.request({"id": 1, "type": "subscribe", "channel": "*"})
    assert reply["type"] == "subscribed", reply
    status, res = disconnect(a.http_url, {"user": "alice"})
    assert status == 200 and res == {"disconnected": 2}   # node A's own count
    for c in (alice_a, alice_a2, alice_b):
        push, code = await until_closed(c)
        assert push == {"type": "disconnect", "code": Close.DISCONNECTED,
                        "reason": "disconnected by the server", "reconnect": False,
                        "after_ms": 0}, push
        assert code == Close.DISCONNECTED
    # bob, on the node that got the control message, is untouched
    assert (await bob_b.request({"id": 5, "type": "ping"}))["type"] == "pong"
    assert not bob_b.closed.is_set()
    assert await watcher.request({"id": 7, "type": "ping"}) == {"id": 7, "type": "pong"}
    assert watcher.messages.empty()
    a.publish("events:seen", 1)   # while a real publication reaches it, once
    assert (await watcher.recv())["channel"] == "events:seen"
    watcher.close()
    # a code of the reconnect range: reconnect true, a randomized after_ms
    status, res = disconnect(b.http_url, {"user": "bob", "code": 4002,
                                          "reason": "please reconnect"})
    assert status == 200 and res == {"disconnected": 1}
    push, code = await until_closed(bob_b)
    assert code == 4002 and push["reconnect"] is True and push["reason"] == "please reconnect"
    assert 0 <= push["after_ms"] <= 5000
    # nobody left: 0, and the nodes are fine
    assert disconnect(a.http_url, {"user": "alice"}) == (200, {"disconnected": 0})
    carol = await as_user(b.ws_url, "carol")
    carol.close()


async def test_memory_broker_disconnects_locally(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET)
    alice, bob = await as_user(srv.ws_url, "alice"), await as_user(srv.ws_url, "bob")
    anon = await connect(srv.ws_url)
    assert disconnect(srv.http_url, {"user": "alice", "code": 4600}) == (
        200, {"disconnected": 1})
    push, code = await until_closed(alice)
    assert code == 4600 and push["reconnect"] is False
    assert (await bob.request({"id": 1, "type": "ping"}))["type"] == "pong"
    assert (await anon.request({"id": 1, "type": "ping"}))["type"] == "pong"
    bob.close()
    anon.close()


def test_bad_requests(server) -> None:
    base = server.http_url
    assert_api_guarded(base, "/api/disconnect", {"user": "alice"})
    bad = {
        b"{nope": "body must be JSON",
        b"[1]": "body must be a JSON object",
        b"{}": "user must be a string",
        b'{"user":""}': "user must be a string",
        b'{"user":5}': "user must be a string",
        b'{"user":"a","code":1000}': "code must be an integer in 4000-4999",
        b'{"user":"a","code":"4001"}': "code must be an integer",
        b'{"user":"a","code":true}': "code must be an integer",
        b'{"user":"a","reason":7}': "reason must be a string",
        b'{"user":"a","reason":"' + b"x" * 124 + b'"}': "at most 123 bytes",
        b'{"user":"a","extra":1}': "unknown field 'extra'",
    }
    for body, reason in bad.items():
        status, res = disconnect(base, body)
        assert status == 400 and reason in res["error"], (body, status, res)
    assert disconnect(base, {"user": "a"}) == (200, {"disconnected": 0})


async def test_disconnect_user_on_a_redis_cluster(fastws_server) -> None:
    """The control message goes by sharded pub/sub (SPUBLISH to its slot's master)."""
    from redis_helpers import start_cluster

    cluster = start_cluster()
    try:
        a = fastws_server("--broker", cluster.url, "--jwt-secret", SECRET)
        b = fastws_server("--broker", cluster.url, "--jwt-secret", SECRET)
        alice_a, alice_b = await as_user(a.ws_url, "alice"), await as_user(b.ws_url, "alice")
        bob_b = await as_user(b.ws_url, "bob")
        assert disconnect(a.http_url, {"user": "alice"}) == (200, {"disconnected": 1})
        for c in (alice_a, alice_b):
            push, code = await until_closed(c)
            assert code == Close.DISCONNECTED and push["reconnect"] is False
        assert (await bob_b.request({"id": 5, "type": "ping"}))["type"] == "pong"
        bob_b.close()
    finally:
        cluster.stop()
