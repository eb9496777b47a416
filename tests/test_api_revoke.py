"""POST /api/revoke: a revoked token is refused on every node sharing one real Redis
(upgrade closed 4501 "token revoked", ``auth`` answered 401), its live connections are
closed with the disconnect push, a token issued after the revocation is accepted,
others are untouched; revocation by jti; a node started later loads the revocations
from Redis; the memory broker; bad bodies 400, no API key 401."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest
from conftest import API_KEY, api, assert_api_guarded
from wsclient import RawClient, connect, connect_with_token

from fastws.broker.base import Revocation
from fastws.broker.memory import MemoryBroker
from fastws.broker.redis import RedisBroker
from fastws.codes import Close
from fastws.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(60)

SECRET = "revoke-test-secret-of-32-bytes-plus-more"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REVOKED = {"type": "disconnect", "code": Close.INVALID_TOKEN, "reason": "token revoked",
           "reconnect": False, "after_ms": 0}


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET,
                      algorithm="HS256")


async def issued_after(at: float, sub: str) -> str:
    """A token of ``sub`` whose ``iat`` (whole seconds, as issuers write it) is later
    than ``at``: waits for the next second (an ``iat`` in the future is refused)."""
    while int(time.time()) <= at:   # (a sleep may end a hair early by the wall clock)
        await asyncio.sleep(max(0.005, int(at) + 1 - time.time()))
    return token(sub)


def revoke(base: str, body: object, headers: dict[str, str] | None = AUTH
           ) -> tuple[int, dict]:
    return api(base, "/api/revoke", body, headers)



async def closed_revoked(c: RawClient) -> None:
    """The connection gets the disconnect push, then close 4501 "token revoked"."""
    assert await c.recv() == REVOKED
    assert await c.wait_closed() == Close.INVALID_TOKEN
    assert c.close_reason == "token revoked"


async def refused(ws_url: str, tok: str) -> None:
    """Opening a connection with ``tok`` is answered by a 4501 "token revoked" close,
    and so is an ``auth`` message carrying it on an anonymous connection (401)."""
    c = await connect(f"{ws_url}?token={tok}")
    await closed_revoked(c)
    anon = await connect(ws_url)
    reply = await anon.request({"id": 1, "type": "auth", "token": tok})
    assert reply["type"] == "error" and reply["code"] == 401, reply
    assert reply["message"] == "token revoked", reply
    anon.close()


async def accepted(ws_url: str, tok: str) -> None:
    c = await connect_with_token(ws_url, tok)
    anon = await connect(ws_url)
    reply = await anon.request({"id": 1, "type": "auth", "token": tok})
    assert reply["type"] == "authed", reply
    c.close()
    anon.close()


async def test_revoke_user_on_every_node(redis_server, fastws_server) -> None:
    a = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    b = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    old = token("0xAbC0000000000000000000000000000000000001")
    conns = [await connect_with_token(a.ws_url, old), await connect_with_token(b.ws_url, old)]
    bob = await connect_with_token(b.ws_url, token("bob"))
    # an address compares case-insensitively: revoking it in lower case is the same user
    status, res = revoke(a.http_url, {"user": "0xabc0000000000000000000000000000000000001"})
    assert status == 200 and res["disconnected"] == 1, res   # node A's own count
    assert res["until"] == pytest.approx(res["at"] + 86400, abs=1)   # revocation_ttl
    for c in conns:
        await closed_revoked(c)
    for node in (a, b):
        await refused(node.ws_url, old)
    # bob is untouched
    assert (await bob.request({"id": 5, "type": "ping"}))["type"] == "pong"
    # a token issued after the revocation (a later iat) is accepted on both nodes
    fresh = await issued_after(res["at"], "0xABC0000000000000000000000000000000000001")
    for node in (a, b):
        await accepted(node.ws_url, fresh)
    # a token without iat counts as issued before: refused
    for node in (a, b):
        await refused(node.ws_url, token("0xabc0000000000000000000000000000000000001",
                                         iat=None))
    # stored in Redis with its expiry (the key's TTL)
    key = "fws:revoked:user:0xabc0000000000000000000000000000000000001"
    ttl = await redis_pttl(redis_server.url, key)
    assert 86_000_000 < ttl <= 86_400_000
    # a node started after the revocation loads it from Redis at start
    c = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    await refused(c.ws_url, old)
    await accepted(c.ws_url, fresh)
    bob.close()


async def test_revoke_by_jti(redis_server, fastws_server) -> None:
    a = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    b = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    leaked, kept = token("carol", jti="leaked-1"), token("carol", jti="kept-2")
    on_b = await connect_with_token(b.ws_url, leaked)
    other = await connect_with_token(b.ws_url, kept)
    # an anonymous connection that authenticated with the token by an auth message
    late = await connect(a.ws_url)
    assert (await late.request({"id": 1, "type": "auth", "token": leaked}))["type"] == "authed"
    status, res = revoke(a.http_url, {"jti": "leaked-1", "ttl": 120})
    assert status == 200 and res["disconnected"] == 1, res
    assert res["until"] == pytest.approx(res["at"] + 120, abs=1)
    await closed_revoked(on_b)
    await closed_revoked(late)
    for node in (a, b):
        await refused(node.ws_url, leaked)
        await accepted(node.ws_url, kept)     # the same user's other token still works
    assert (await other.request({"id": 2, "type": "ping"}))["type"] == "pong"
    assert 0 < await redis_pttl(redis_server.url, "fws:revoked:jti:leaked-1") <= 120_000
    # a user and a jti in one request
    dave = await connect_with_token(a.ws_url, token("dave", iat=int(time.time()) - 5))
    status, res = revoke(b.http_url, {"user": "dave", "jti": "kept-2"})
    assert status == 200
    await closed_revoked(other)
    await closed_revoked(dave)
    other.close()


async def test_a_refreshed_connection_stays(redis_server, fastws_server) -> None:
    a = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    c = await connect_with_token(a.ws_url, token("erin", jti="first"))
    reply = await c.request({"id": 1, "type": "auth", "token": token("erin", jti="second")})
    assert reply["type"] == "authed", reply
    assert revoke(a.http_url, {"jti": "first"})[0] == 200
    assert (await c.request({"id": 2, "type": "ping"}))["type"] == "pong"
    assert not c.closed.is_set()
    c.close()


async def test_memory_broker(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, "--revocation-ttl", "90")
    tok = token("frank")
    frank = await connect_with_token(srv.ws_url, tok)
    grace = await connect_with_token(srv.ws_url, token("grace"))
    anon = await connect(srv.ws_url)
    status, res = revoke(srv.http_url, {"user": "frank", "ttl": 60.5})
    assert status == 200 and res["disconnected"] == 1
    await closed_revoked(frank)
    await refused(srv.ws_url, tok)
    await accepted(srv.ws_url, await issued_after(res["at"], "frank"))
    for c in (grace, anon):
        assert (await c.request({"id": 1, "type": "ping"}))["type"] == "pong"
    # without a ttl: revocation_ttl (90 s here)
    status, res = revoke(srv.http_url, {"user": "grace"})
    assert status == 200 and res["disconnected"] == 1
    assert res["until"] == pytest.approx(res["at"] + 90, abs=0.01)
    await closed_revoked(grace)
    anon.close()


@pytest.mark.parametrize("value", ["0.5", "31622401"])
def test_revocation_ttl_range(value: str) -> None:
    with pytest.raises(ConfigError, match="--revocation-ttl: must be 1 to 31622400 seconds"):
        load_config({"revocation_ttl": value}, {})


def test_bad_requests(server) -> None:
    base = server.http_url
    assert_api_guarded(base, "/api/revoke", {"user": "alice"})
    bad = {
        b"{nope": "body must be JSON",
        b"[1]": "body must be a JSON object",
        b"{}": "give user, jti or both",
        b'{"ttl":5}': "give user, jti or both",
        b'{"user":""}': "user must be a string",
        b'{"user":5}': "user must be a string",
        b'{"user":"' + b"x" * 256 + b'"}': "user must be a string of 1-255",
        b'{"jti":null}': "jti must be a string",
        b'{"jti":"a","ttl":0}': "ttl must be a number",
        b'{"jti":"a","ttl":"60"}': "ttl must be a number",
        b'{"jti":"a","ttl":true}': "ttl must be a number",
        b'{"jti":"a","ttl":1e12}': "ttl must be a number",
        b'{"user":"a","extra":1}': "unknown field 'extra'",
    }
    for body, reason in bad.items():
        status, res = revoke(base, body)
        assert status == 400 and reason in res["error"], (body, status, res)


async def test_broker_records_merge(redis_server) -> None:
    """Both brokers store a record until its expiry, merged with an earlier one (the
    later revocation time, the later expiry), and list the live ones."""
    redis = RedisBroker(redis_server.url)

    class _Handler:
        def handle_publication(self, *args: Any) -> None:
            pass

    for broker in (MemoryBroker(), redis):
        await broker.start(_Handler())  # type: ignore[arg-type]
        now = time.time()
        first = await broker.revoke(Revocation("user", "u1", now, now + 100))
        assert first == Revocation("user", "u1", pytest.approx(now), pytest.approx(now + 100))
        merged = await broker.revoke(Revocation("user", "u1", now + 5, now + 50))
        assert (merged.at, merged.until) == (pytest.approx(now + 5), pytest.approx(now + 100))
        await broker.revoke(Revocation("jti", "j:with:colons", now, now + 0.2))
        got = sorted(await broker.revocations(), key=lambda r: r.kind)
        assert [(r.kind, r.key) for r in got] == [("jti", "j:with:colons"), ("user", "u1")]
        await asyncio.sleep(0.3)
        assert [(r.kind, r.key) for r in await broker.revocations()] == [("user", "u1")]
        await broker.close()


async def redis_pttl(url: str, key: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        return int(await client.pttl(key))
    finally:
        await client.aclose()


async def test_a_node_reloads_after_a_broker_reconnect(redis_server, fastws_server) -> None:
    """A record stored while a node was away from Redis (so it missed the control
    message) is loaded when the node reconnects: its live connections using the token
    are closed then, and the token is refused from then on."""
    import redis.asyncio as aioredis

    node = fastws_server("--broker", redis_server.url, "--jwt-secret", SECRET)
    tok = token("henry")
    live = await connect_with_token(node.ws_url, tok)
    client = aioredis.from_url(redis_server.url)
    try:
        now = time.time()
        await client.set("fws:revoked:user:henry", f"{now} {now + 60}", px=60_000)
        # not told: the node accepts the token until it reconnects (the window)
        (await connect_with_token(node.ws_url, tok)).close()
        assert await client.client_kill_filter(_type="pubsub") >= 1
    finally:
        await client.aclose()
    await closed_revoked(live)
    await refused(node.ws_url, tok)
