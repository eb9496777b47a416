"""Security end to end on real servers: tokens, expiry, SIWE, permissions, origins, limits."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import jwt
import pytest
from conftest import http, scrape
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from eth_account import Account
from test_auth import sign, siwe_message
from wsclient import RawClient, connect

SECRET = "security-test-secret-of-32-bytes-plus"
UPGRADE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


FAST = "[server]\ndrain_timeout = 0.5\n"   # prepended to configs: quick teardowns


def token(sub: str, key: object = SECRET, alg: str = "HS256", ttl: float | None = 600,
          **claims: object) -> str:
    body: dict[str, object] = {"sub": sub, **claims}
    if ttl is not None:
        body["exp"] = int(time.time() + ttl)
    return jwt.encode(body, key, algorithm=alg)


def raw_request(port: int, head: str) -> tuple[int, dict[str, str]]:
    """Send one request head; return the status and headers of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split(" ")[1]), headers


async def expect(c: RawClient, msg: dict, code: int | None = None) -> dict:
    """Send a request; assert the reply is an error with ``code`` or not an error."""
    msg = {"id": 1, **msg}
    reply = await c.request(msg)
    if code is None:
        assert reply.get("type") != "error", (msg, reply)
    else:
        assert reply.get("type") == "error" and reply["code"] == code, (msg, reply)
    return reply


async def closed_with(c: RawClient, code: int, reason: str | None = None) -> dict:
    """The disconnect push, then the close frame, both with ``code``."""
    push = await c.recv()
    assert push["type"] == "disconnect" and push["code"] == code, push
    assert push["reconnect"] is (not 4500 <= code <= 4999)
    if reason is not None:
        assert push["reason"] == reason
    assert await c.wait_closed() == code
    if reason is not None:
        assert c.close_reason == reason
    return push


# --------------------------------------------------------------------------- tokens


async def test_token_from_query_header_or_auth_message(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, config=FAST)
    tok = token("alice")
    a = await connect(srv.ws_url + "?token=" + tok)
    b = await connect(srv.ws_url, extra_headers={"Authorization": "Bearer " + tok})
    c = await connect(srv.ws_url)
    await expect(c, {"type": "subscribe", "channel": "user:alice"}, 401)
    assert await c.request({"id": 2, "type": "auth", "token": tok}) == {
        "id": 2, "type": "authed", "user": "alice"}
    for conn in (a, b, c):
        await expect(conn, {"id": 3, "type": "subscribe", "channel": "user:alice"})
        await expect(conn, {"id": 4, "type": "subscribe", "channel": "user:bob"}, 403)
    # a bad token in an auth message is an error; on the upgrade it closes 4501
    await expect(c, {"type": "auth", "token": token("alice", key="x" * 40)}, 401)
    for bad in ("?token=garbage", "?token=" + token("alice", key="wrong-secret-" * 4)):
        await closed_with(await connect(srv.ws_url + bad), 4501, "invalid token")
    await closed_with(await connect(srv.ws_url, extra_headers={"Authorization": "Bearer x.y"}),
                      4501)
    await closed_with(await connect(srv.ws_url + "?token=" + token("alice", ttl=-5)),
                      4501, "token expired")


async def test_expiry_closes_4501_unless_refreshed(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, config=FAST)
    short = token("carol", ttl=1.5)
    lapsing = await connect(srv.ws_url + "?token=" + short)
    refreshed = await connect(srv.ws_url + "?token=" + short)
    await expect(lapsing, {"type": "subscribe", "channel": "user:carol"})
    await expect(refreshed, {"type": "subscribe", "channel": "user:carol"})
    assert (await refreshed.request({"id": 5, "type": "auth", "token": token("carol")}))[
        "type"] == "authed"
    # switching users on one connection is refused
    await expect(refreshed, {"type": "auth", "token": token("mallory")}, 403)
    t0 = time.monotonic()
    await closed_with(lapsing, 4501, "token expired")
    assert time.monotonic() - t0 < 5
    await expect(refreshed, {"id": 6, "type": "ping"})
    await asyncio.to_thread(srv.publish, "user:carol", "still here")
    assert (await refreshed.recv())["data"] == "still here"
    values = scrape(srv.http_url)
    assert values['fastws_connections_closed_total{code="4501"}'] == 1


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_public_key_tokens(fastws_server, tmp_path, alg) -> None:
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256"
           else ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "key.pem").write_bytes(_pem(key))
    srv = fastws_server("--jwt-public-key", str(tmp_path / "key.pem"), config=FAST)
    c = await connect(srv.ws_url + "?token=" + token("dave", key, alg))
    await expect(c, {"type": "subscribe", "channel": "user:dave"})
    # an HS256 token, or one signed by another key, is refused
    other = ec.generate_private_key(ec.SECP256R1())
    for bad in (token("dave"), token("dave", other, "ES256")):
        await closed_with(await connect(srv.ws_url + "?token=" + bad), 4501, "invalid token")
    # SIWE needs a secret to sign with: a clear 501
    status, _, body = http("GET", srv.http_url + "/auth/nonce")
    assert status == 501 and b"jwt_secret" in body


# --------------------------------------------------------------------------- SIWE


async def test_siwe_sign_in_end_to_end(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, "--siwe-chain-id", "1",
                        "--siwe-chain-id", "8453", "--siwe-domain", "app.example.com",
                        config=FAST)
    acct = Account.create()
    host = f"127.0.0.1:{srv.port}"

    def sign_in(msg: str, signer=acct) -> tuple[int, dict]:
        status, _, body = http("POST", srv.http_url + "/auth/siwe",
                               {"message": msg, "signature": sign(signer, msg)})
        return status, json.loads(body)

    def nonce() -> str:
        status, headers, body = http("GET", srv.http_url + "/auth/nonce")
        assert status == 200 and headers["Cache-Control"] == "no-store"
        return json.loads(body)["nonce"]

    msg = siwe_message(host, acct.address, nonce())
    status, out = await asyncio.to_thread(sign_in, msg)
    assert status == 200 and out["sub"] == acct.address, out
    assert jwt.decode(out["token"], SECRET, algorithms=["HS256"])["sub"] == acct.address
    # the token opens the wallet's private channel, whatever the letter case
    c = await connect(srv.ws_url + "?token=" + out["token"])
    await expect(c, {"type": "subscribe", "channel": "wallet:" + acct.address})
    await expect(c, {"id": 2, "type": "subscribe", "channel": "user:" + acct.address.lower()})
    await asyncio.to_thread(srv.publish, "wallet:" + acct.address.upper().replace("0X", "0x"),
                            {"balance": 5})
    assert (await c.recv())["data"] == {"balance": 5}
    # the token carries iat and a random jti, which the answer names (POST /api/revoke)
    claims = jwt.decode(out["token"], SECRET, algorithms=["HS256"])
    assert claims["jti"] == out["jti"] and len(out["jti"]) == 32, (claims, out)
    assert claims["iat"] <= time.time() < claims["exp"] == out["exp"]
    # replay, foreign domain, chain id outside the allowlist, wrong signer
    assert (await asyncio.to_thread(sign_in, msg))[0] == 401
    assert (await asyncio.to_thread(
        sign_in, siwe_message("evil.example", acct.address, nonce())))[0] == 403
    assert (await asyncio.to_thread(
        sign_in, siwe_message(host, acct.address, nonce(), chain_id=5)))[0] == 403
    assert (await asyncio.to_thread(
        sign_in, siwe_message("app.example.com", acct.address, nonce(), chain_id=8453)))[0] == 200
    assert (await asyncio.to_thread(
        sign_in, siwe_message(host, acct.address, nonce()), Account.create()))[0] == 401
    assert http("POST", srv.http_url + "/auth/siwe", b"{nope")[0] == 400
    assert http("POST", srv.http_url + "/auth/siwe", {"message": 1})[0] == 400
    assert http("GET", srv.http_url + "/auth/siwe")[0] == 405
    # revoking the token by its jti closes its connection and refuses it from then on
    status, _, body = http("POST", srv.http_url + "/api/revoke", {"jti": out["jti"]},
                           headers={"Authorization": f"Bearer {srv.api_key}"})
    assert status == 200 and json.loads(body)["disconnected"] == 1, body
    assert (await c.recv())["reason"] == "token revoked"
    assert await c.wait_closed() == 4501 and c.close_reason == "token revoked"
    again = await connect(srv.ws_url + "?token=" + out["token"])
    assert await again.wait_closed() == 4501 and again.close_reason == "token revoked"


async def test_siwe_replay_to_another_node_is_refused(fastws_server, redis_server) -> None:
    # two nodes on one Redis: a nonce spent on one is spent on the other
    args = ("--broker", redis_server.url, "--jwt-secret", SECRET,
            "--siwe-domain", "app.example.com")
    a, b = fastws_server(*args, config=FAST), fastws_server(*args, config=FAST)
    acct = Account.create()

    def post(srv, msg: str) -> tuple[int, dict]:
        status, _, body = http("POST", srv.http_url + "/auth/siwe",
                               {"message": msg, "signature": sign(acct, msg)})
        return status, json.loads(body)

    def signed_in_on(first, then) -> tuple[tuple[int, dict], tuple[int, dict]]:
        nonce = json.loads(http("GET", a.http_url + "/auth/nonce")[2])["nonce"]
        msg = siwe_message("app.example.com", acct.address, nonce)
        return post(first, msg), post(then, msg)

    (status, out), (replay, err) = await asyncio.to_thread(signed_in_on, a, b)
    assert status == 200 and out["sub"] == acct.address, out
    assert jwt.decode(out["token"], SECRET, algorithms=["HS256"])["sub"] == acct.address
    assert replay == 401 and "already used" in err["error"], err
    # B accepts A's nonces (they are stateless): the refusal above is the replay's
    (status, out), (replay, _) = await asyncio.to_thread(signed_in_on, b, a)
    assert status == 200 and out["sub"] == acct.address and replay == 401


# --------------------------------------------------------------------------- permissions

PERMISSIONS = """
[limits]
messages_per_connection = 100000
[namespaces.open]
publish = "anyone"
history_size = 10
[namespaces.vip]
subscribe = "authenticated"
publish = "authenticated"
presence = true
[namespaces.secret]
subscribe = "api"
[namespaces.own]
subscribe = "owner"
publish = "owner"
[namespaces.reads]
history_access = "authenticated"
presence = true
presence_access = "api"
"""


async def test_every_permission_rule(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, config=FAST + PERMISSIONS)
    anon = await connect(srv.ws_url)
    alice = await connect(srv.ws_url + "?token=" + token("alice"))
    bob = await connect(srv.ws_url + "?token=" + token("bob"))
    table = [  # (client, request, error code or None)
        (anon, {"type": "subscribe", "channel": "open:x"}, None),
        (anon, {"type": "publish", "channel": "open:x", "data": 1}, None),
        (anon, {"type": "publish", "channel": "events:x", "data": 1}, 403),   # default: api
        (alice, {"type": "publish", "channel": "events:x", "data": 1}, 403),
        (anon, {"type": "subscribe", "channel": "vip:x"}, 401),
        (anon, {"type": "publish", "channel": "vip:x", "data": 1}, 401),
        (anon, {"type": "history", "channel": "vip:x"}, 401),
        (anon, {"type": "presence", "channel": "vip:x"}, 401),
        (alice, {"type": "subscribe", "channel": "vip:x"}, None),
        (alice, {"type": "publish", "channel": "vip:x", "data": 1}, None),
        (alice, {"type": "presence", "channel": "vip:x"}, None),
        (alice, {"type": "subscribe", "channel": "secret:x"}, 403),
        (alice, {"type": "history", "channel": "secret:x"}, 403),
        (alice, {"type": "subscribe", "channel": "own:alice"}, None),
        (alice, {"type": "publish", "channel": "own:alice", "data": 1}, None),
        (bob, {"type": "subscribe", "channel": "own:alice"}, 403),
        (bob, {"type": "publish", "channel": "own:alice", "data": 1}, 403),
        (anon, {"type": "subscribe", "channel": "own:alice"}, 401),
        (alice, {"type": "subscribe", "channel": "own:*"}, 403),   # no patterns in owner ns
        (alice, {"type": "subscribe", "channel": "user:ali*"}, 403),
        (alice, {"type": "history", "channel": "user:alice"}, None),
        (bob, {"type": "history", "channel": "user:alice"}, 403),
        (anon, {"type": "history", "channel": "reads:x"}, 401),
        (anon, {"type": "subscribe", "channel": "reads:x"}, None),
        (bob, {"type": "history", "channel": "reads:x"}, None),
        (bob, {"type": "presence", "channel": "reads:x"}, 403),
        (anon, {"type": "presence", "channel": "open:x"}, 403),    # presence off
        # patterns that span namespaces: not anonymously if they reach vip:
        (anon, {"type": "subscribe", "channel": "*"}, 401),
        (anon, {"type": "subscribe", "channel": "v*"}, 401),
        (anon, {"type": "subscribe", "channel": "*:x"}, 401),
        (anon, {"type": "subscribe", "channel": "o*"}, None),
        (anon, {"type": "subscribe", "channel": "open:*"}, None),
        (bob, {"type": "subscribe", "channel": "*"}, None),
    ]
    for i, (client, req, code) in enumerate(table):
        await expect(client, {**req, "id": 100 + i}, code)
    # bob's "*" gets vip: and open: publications, never api or owner namespaces'
    for ch in ("secret:x", "own:alice", "user:alice", "wallet:0xab", "vip:y", "open:y"):
        await asyncio.to_thread(srv.publish, ch, ch)
    got = []
    while len(got) < 2:
        m = await bob.recv()
        if m["type"] == "event":
            got.append(m["channel"])
    assert got == ["vip:y", "open:y"]
    await expect(bob, {"id": 999, "type": "ping"})
    assert all(m["type"] != "event" for m in _drain(bob))


def _drain(c: RawClient) -> list[dict]:
    out = []
    while not c.messages.empty():
        out.append(c.messages.get_nowait())
    return out


async def test_channels_claim_limits_a_token(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET,
                        config=FAST + '[namespaces.chat]\npublish = "authenticated"\n')
    tok = token("erin", channels=["market:*", "chat:lobby", "user:erin"])
    c = await connect(srv.ws_url + "?token=" + tok)
    for req, code in [
        ({"type": "subscribe", "channel": "market:0xab"}, None),
        ({"type": "subscribe", "channel": "market:0x*"}, None),
        ({"type": "subscribe", "channel": "user:erin"}, None),
        ({"type": "subscribe", "channel": "events:x"}, 403),
        ({"type": "subscribe", "channel": "*"}, 403),
        ({"type": "subscribe", "channel": "chat:*"}, 403),
        ({"type": "publish", "channel": "chat:lobby", "data": 1}, None),
        ({"type": "publish", "channel": "chat:other", "data": 1}, 403),
        ({"type": "history", "channel": "events:x"}, 403),
    ]:
        await expect(c, req, code)
    # a refresh whose claim no longer covers a subscription is refused; a wider one works
    await expect(c, {"type": "auth", "token": token("erin", channels=["user:erin"])}, 403)
    await expect(c, {"type": "auth", "token": token("erin", channels=["*"])})
    await expect(c, {"type": "subscribe", "channel": "events:x"})


# --------------------------------------------------------------------------- origins, limits


async def test_origin_allowlist_4503(fastws_server) -> None:
    srv = fastws_server("--allow-origin", "https://app.example.com", config=FAST)
    ok = await connect(srv.ws_url, extra_headers={"Origin": "https://APP.example.com"})
    await expect(ok, {"type": "ping"})
    no_origin = await connect(srv.ws_url)   # not a browser: nothing for Origin to protect
    await expect(no_origin, {"type": "ping"})
    bad = await connect(srv.ws_url, extra_headers={"Origin": "https://evil.example"})
    await closed_with(bad, 4503, "origin not allowed")


async def test_connection_limit_4504(fastws_server) -> None:
    srv = fastws_server(config=FAST + "[limits]\nmax_connections = 2\n")
    a, b = await connect(srv.ws_url), await connect(srv.ws_url)
    await expect(b, {"type": "ping"})
    await closed_with(await connect(srv.ws_url), 4504, "connection limit reached")
    a.close()
    await a.wait_closed()
    for _ in range(100):   # the server notices the close within a loop pass or two
        if scrape(srv.http_url)["fastws_connections"] == 1:
            break
        await asyncio.sleep(0.02)
    await expect(await connect(srv.ws_url), {"type": "ping"})


def test_new_connections_per_ip_429(fastws_server) -> None:
    srv = fastws_server(config=FAST + "[limits]\nconnections_per_ip = 3\n"
                               "connections_per_ip_window = 60\n")
    xff = "X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n"
    for _ in range(3):
        assert raw_request(srv.port, UPGRADE + xff)[0] == 101
    status, headers = raw_request(srv.port, UPGRADE + xff)
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 20
    assert raw_request(srv.port, UPGRADE + "X-Forwarded-For: 203.0.113.8\r\n")[0] == 101
    for _ in range(10):   # loopback without X-Forwarded-For: local, exempt
        assert raw_request(srv.port, UPGRADE)[0] == 101
    assert scrape(srv.http_url)['fastws_rate_limited_total{limit="connections"}'] == 1


def test_http_requests_per_ip_and_untrusted_proxy(fastws_server) -> None:
    srv = fastws_server(config=FAST + "trusted_proxies = [\"10.0.0.0/8\"]\n"
                               "[limits]\nrequests_per_ip_per_s = 3\n")
    get = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    # the loopback peer is no trusted proxy here: its X-Forwarded-For is ignored, and
    # a loopback peer that sends one is not exempt; each "client" IP is the peer's
    codes = [raw_request(srv.port, get + f"X-Forwarded-For: 203.0.113.{i}\r\n")[0]
             for i in range(8)]
    assert codes.count(200) >= 3 and codes[-1] == 429, codes
    status, headers = raw_request(srv.port, get + "X-Forwarded-For: 1.2.3.4\r\n")
    assert status == 429 and headers["retry-after"] == "1"
    assert all(raw_request(srv.port, get)[0] == 200 for _ in range(10))   # local: exempt


async def test_rate_limits_hold_per_worker(fastws_server, redis_server) -> None:
    # docs/security.md §5: each of N workers has its own buckets, so one IP gets up to
    # N times the configured per-IP limit through the shared port
    srv = fastws_server("--workers", "2", "--broker", redis_server.url,
                        config=FAST + "[limits]\nrequests_per_ip_per_s = 5\n")
    deadline = time.monotonic() + 20
    while scrape(srv.http_url).get("fastws_workers") != 2:   # both listening
        assert time.monotonic() < deadline, "the second worker did not start"
        await asyncio.sleep(0.05)
    get = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"

    def burst() -> list[int]:   # one forwarded IP, a new connection (new port) each
        return [raw_request(srv.port, get + "X-Forwarded-For: 203.0.113.9\r\n")[0]
                for _ in range(40)]

    codes = await asyncio.to_thread(burst)
    # one process would answer 5 (plus a token per 0.2 s of burst); two answer 5 each
    assert 5 < codes.count(200) <= 15 and codes.count(429) >= 25, codes


async def test_message_and_subscribe_rate_limits(fastws_server) -> None:
    srv = fastws_server(config=FAST + "[limits]\nmessages_per_connection = 5\n"
                        "messages_window = 60\n"
                        "subscribes_per_connection = 2\nsubscribes_window = 3600\n")
    c = await connect(srv.ws_url)
    await expect(c, {"type": "subscribe", "channel": "a"})
    await expect(c, {"id": 2, "type": "subscribe", "channel": "b"})
    reply = await expect(c, {"id": 3, "type": "subscribe", "channel": "c"}, 429)
    assert "subscribes" in reply["message"]
    await expect(c, {"id": 4, "type": "ping"})
    await expect(c, {"id": 5, "type": "ping"})
    reply = await expect(c, {"id": 6, "type": "ping"}, 429)   # the 6th message in a minute
    assert "messages" in reply["message"]
    for i in range(10):                                       # persisting: 4029
        c.send({"id": 10 + i, "type": "ping"})
    while (m := await c.recv())["type"] == "error":
        assert m["code"] == 429
    assert m["type"] == "disconnect" and m["code"] == 4029 and m["reconnect"] is True
    assert await c.wait_closed() == 4029
    values = scrape(srv.http_url)
    assert values['fastws_rate_limited_total{limit="subscribes"}'] == 1
    assert values['fastws_rate_limited_total{limit="messages"}'] >= 5
    assert values['fastws_connections_closed_total{code="4029"}'] == 1


async def test_json_depth_limit(fastws_server) -> None:
    srv = fastws_server(config=FAST + '[namespaces.chat]\npublish = "anyone"\n')
    c = await connect(srv.ws_url)

    def nest(n: int) -> object:
        v: object = 1
        for _ in range(n):
            v = [v]
        return v

    await expect(c, {"type": "publish", "channel": "chat:x", "data": nest(64)})
    reply = await expect(c, {"id": 2, "type": "publish", "channel": "chat:x",
                             "data": nest(65)}, 400)
    assert "64" in reply["message"]
    status, _, body = http("POST", srv.http_url + "/api/publish",
                           {"channel": "chat:x", "data": nest(300)},
                           headers={"Authorization": "Bearer " + srv.api_key})
    assert status == 400 and b"deeper" in body
    await expect(c, {"id": 3, "type": "ping"})
