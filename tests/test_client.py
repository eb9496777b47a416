"""Tests of the Python client (fastws.client): unit tests, a scripted fake server, a real one.

The fake server (picows, in this process) makes the protocol corner cases deterministic:
close codes, `disconnect` pushes, recovery replays, a silent peer. The tests at the end
run against a real `fastws serve` subprocess (the `fastws_server` fixture).
"""

from __future__ import annotations

import asyncio
import fnmatch
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from fastws import channels
from fastws.client import (
    Client,
    Event,
    backoff_delay,
    connect,
    is_pattern,
    normalize_channel,
    refresh_delay,
    token_claims,
    token_expires_in,
)
from fastws.errors import (
    AuthError,
    ConnectionClosed,
    FastWSError,
    RequestError,
    RequestTimeout,
)

FAST = {"backoff_base": 0.02, "backoff_cap": 0.1, "request_timeout": 5.0}
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- unit tests


def test_backoff_full_jitter_and_cap() -> None:
    # rand() == 1 gives the ceiling: 0.5 * 2**n, capped at 20 s.
    top = [backoff_delay(n, rand=lambda: 1.0) for n in range(10)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0, 20.0]
    assert backoff_delay(3, rand=lambda: 0.0) == 0.0
    assert backoff_delay(2, rand=lambda: 0.25) == 0.5
    assert backoff_delay(10_000, rand=lambda: 1.0) == 20.0  # no overflow
    # An injected cap and base.
    assert backoff_delay(5, base=0.1, cap=1.0, rand=lambda: 1.0) == 1.0
    # Drawn uniformly: a seeded RNG spreads over the whole [0, ceiling] range.
    rng = random.Random(42)
    draws = [backoff_delay(6, rand=rng.random) for _ in range(2000)]
    assert all(0.0 <= d <= 20.0 for d in draws)
    assert min(draws) < 1.0 and max(draws) > 19.0
    assert 8.5 < sum(draws) / len(draws) < 11.5
    assert len(set(draws)) > 1900  # jittered, not a fixed schedule


def _unsigned_jwt(claims: object) -> str:
    """A JWT-shaped string with ``claims`` as payload (the client never verifies it)."""
    import base64

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return b64(b'{"alg":"HS256"}') + "." + b64(orjson.dumps(claims)) + ".sig"


def test_token_claims_decodes_without_verifying() -> None:
    tok = _unsigned_jwt({"sub": "alice", "exp": 1700000000, "n": "é" * 7})
    assert token_claims(tok) == {"sub": "alice", "exp": 1700000000, "n": "é" * 7}
    import jwt

    signed = jwt.encode({"sub": "bob", "exp": 5}, "secret-0123456789abcdef0123456789", "HS256")
    assert token_claims(signed) == {"sub": "bob", "exp": 5}
    # Not a JWT (opaque tokens, garbage): None, never an exception.
    for bad in ("", "opaque-token", "a.b", "a.b.c.d", "x.!!!.y", "x.é.y",
                _unsigned_jwt([1, 2]), "x." + "bm90IGpzb24" + ".y"):
        assert token_claims(bad) is None, bad


def test_token_expires_in_uses_the_clients_clock_checked_by_iat() -> None:
    now = 1_000_000.0
    assert token_expires_in(_unsigned_jwt({"exp": now + 30}), now=now) == 30
    # No exp (or not a number), not a JWT, or expired without iat: nothing to time.
    for claims in ({"sub": "a"}, {"exp": "soon"}, {"exp": True}, {"exp": now - 1}):
        assert token_expires_in(_unsigned_jwt(claims), now=now) is None, claims
    assert token_expires_in("opaque", now=now) is None
    # iat in the client's future: its clock is behind the issuer's; the lifetime counts.
    assert token_expires_in(_unsigned_jwt({"iat": now + 100, "exp": now + 160}), now=now) == 60
    # Past exp but just accepted by the server: the client's clock is ahead.
    assert token_expires_in(_unsigned_jwt({"iat": now - 100, "exp": now - 40}), now=now) == 60
    # Clocks that agree: the time left, not the lifetime.
    assert token_expires_in(_unsigned_jwt({"iat": now - 50, "exp": now + 10}), now=now) == 10
    left = token_expires_in(_unsigned_jwt({"exp": time.time() + 100}))
    assert left is not None and 99 < left <= 100


def test_refresh_delay_margin_share_and_jitter() -> None:
    # An hour: 10 s before exp, moved up to a further 60 s earlier by the jitter.
    assert refresh_delay(3600, rand=lambda: 0.0) == 3590
    assert refresh_delay(3600, rand=lambda: 1.0) == 3530
    # Short tokens: at 80 % of the time left, jitter up to 10 % of it.
    assert refresh_delay(3, rand=lambda: 0.0) == pytest.approx(2.4)
    assert refresh_delay(3, rand=lambda: 1.0) == pytest.approx(2.1)
    assert refresh_delay(30, margin=2, rand=lambda: 0.0) == 28
    assert refresh_delay(0) == 0 and refresh_delay(-5) == 0
    rng = random.Random(7)
    draws = [refresh_delay(600, rand=rng.random) for _ in range(1000)]
    assert all(530 <= d <= 590 for d in draws) and len(set(draws)) > 990


def test_bad_token_options_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="token must be a string, a callable or None"):
        Client("ws://127.0.0.1:1/ws", token=123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token_refresh_margin"):
        Client("ws://127.0.0.1:1/ws", token_refresh_margin=-1)


def test_event_and_pattern_helpers() -> None:
    e = Event("events:x", {"a": 1}, 3, "e1")
    assert (e.channel, e.data, e.offset, e.epoch) == ("events:x", {"a": 1}, 3, "e1")
    assert e.recovered is False and e == Event("events:x", {"a": 1}, 3, "e1", recovered=True)
    assert not hasattr(e, "__dict__")
    assert e == Event("events:x", {"a": 1}, 3, "e1")
    assert "events:x" in repr(e)
    assert is_pattern("events:*") and is_pattern("a?") and is_pattern("[ab]") and is_pattern("a\\*")
    assert not is_pattern("events:bet_placed")
    assert normalize_channel("wallet:0xAbCD") == "wallet:0xabcd"  # as the server names it
    assert normalize_channel("wallet:0xAb*") == "wallet:0xab*"  # patterns too, as the server
    assert normalize_channel is channels.normalize and is_pattern is channels.is_pattern
    assert normalize_channel("market:0xAbCD") == "market:0xAbCD"


def test_error_tree() -> None:
    assert issubclass(AuthError, ConnectionClosed)
    for cls in (ConnectionClosed, RequestError, RequestTimeout):
        assert issubclass(cls, FastWSError)
    exc = ConnectionClosed(4503, "origin not allowed")
    assert (exc.code, exc.reason, exc.final) == (4503, "origin not allowed", True)
    err = RequestError(403, "permission denied")
    assert (err.code, err.message) == (403, "permission denied")
    assert "403" in str(err)


async def test_not_started_client_raises() -> None:
    c = Client("ws://127.0.0.1:1/ws")
    with pytest.raises(FastWSError):
        await c.publish("a", 1)
    with pytest.raises(FastWSError):
        await c.subscribe("a")


# ------------------------------------------------------------------- scripted fake server


class _FakeConn(WSListener):
    def __init__(self, server: FakeServer, request: WSUpgradeRequest) -> None:
        super().__init__()
        self.server = server
        self.request = request
        self.transport: WSTransport | None = None
        self.subs: set[str] = set()
        self.silent = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server.conns.append(self)
        self.server.connected.set()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self in self.server.conns:
            self.server.conns.remove(self)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type == WSMsgType.PING:
            self.server.pings += 1
            if not self.silent:
                transport.send_pong(frame.get_payload_as_bytes())
            return
        if frame.msg_type != WSMsgType.TEXT or self.silent:
            return
        msg = orjson.loads(frame.get_payload_as_bytes())
        self.server.received.append(msg)
        self.server.handle(self, msg)


class FakeServer:
    """A minimal fastws-protocol server with knobs for the cases under test."""

    def __init__(self) -> None:
        self.conns: list[_FakeConn] = []
        self.received: list[dict[str, Any]] = []
        self.upgrades: list[WSUpgradeRequest] = []
        self.connected = asyncio.Event()
        self.reject_status: int | None = None
        self.epoch = "e1"
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.replay_overlap = 0  # replay this many already-delivered events on recovery
        self.ignore_types: set[str] = set()
        self.pings = 0  # WebSocket pings received (answered unless the connection is silent)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> FakeServer:
        def factory(request: WSUpgradeRequest) -> Any:
            self.upgrades.append(request)
            if self.reject_status is not None:
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_error_response(self.reject_status, b"bad token"),
                    None)
            return _FakeConn(self, request)

        self.server = await ws_create_server(factory, "127.0.0.1", port, enable_auto_pong=False)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def stop(self) -> None:
        for c in list(self.conns):
            assert c.transport is not None
            c.transport.disconnect(False)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def wait_conns(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.conns) < n:
                await asyncio.sleep(0.005)

    def handle(self, conn: _FakeConn, msg: dict[str, Any]) -> None:
        kind, rid = msg.get("type"), msg.get("id")
        if kind in self.ignore_types:
            return
        if kind == "subscribe":
            ch = msg["channel"]
            if ch.startswith("private:"):
                conn.send({"id": rid, "type": "error", "code": 403, "message": "permission denied"})
                return
            conn.subs.add(ch)
            reply: dict[str, Any] = {"id": rid, "type": "subscribed", "channel": ch}
            since = msg.get("since")
            if since is not None:
                reply["recovered"] = since.get("epoch") == self.epoch
                if reply["recovered"]:
                    for name, pubs in self.history.items():
                        if not fnmatch.fnmatchcase(name, ch):
                            continue
                        start = since["offset"] - self.replay_overlap
                        for p in pubs:
                            if p["offset"] > start:
                                conn.send(p)
            conn.send(reply)
        elif kind == "unsubscribe":
            conn.subs.discard(msg["channel"])
            conn.send({"id": rid, "type": "unsubscribed", "channel": msg["channel"]})
        elif kind == "ping":
            conn.send({"id": rid, "type": "pong"})
        elif kind == "publish":
            conn.send({"id": rid, "type": "error", "code": 403, "message": "permission denied"})
        elif kind == "history":
            pubs = self.history.get(msg["channel"], [])
            conn.send({"id": rid, "type": "history", "epoch": self.epoch,
                       "offset": pubs[-1]["offset"] if pubs else 0,
                       "publications": [{"offset": p["offset"], "data": p["data"]}
                                        for p in pubs][-msg.get("limit", 100):]})
        else:
            conn.send({"id": rid, "type": "error", "code": 404, "message": "unknown type"})

    def publish(self, channel: str, data: Any) -> dict[str, Any]:
        pubs = self.history.setdefault(channel, [])
        push = {"type": "event", "channel": channel, "offset": len(pubs) + 1,
                "epoch": self.epoch, "data": data}
        pubs.append(push)
        for c in self.conns:
            if any(fnmatch.fnmatchcase(channel, s) for s in c.subs):
                c.send(push)
        return push

    def push_all(self, msg: dict[str, Any]) -> None:
        for c in self.conns:
            c.send(msg)

    def close_all(self, code: int, reason: str = "") -> None:
        for c in list(self.conns):
            assert c.transport is not None
            c.transport.send_close(WSCloseCode(code), reason.encode())
            c.transport.disconnect()

    def drop_all(self) -> None:
        for c in list(self.conns):
            assert c.transport is not None
            c.transport.disconnect(False)


@pytest.fixture
async def fake():
    srv = await FakeServer().start()
    yield srv
    await srv.stop()


async def _take(c: Client, n: int, timeout: float = 5.0) -> list[Event]:
    out = []
    async with asyncio.timeout(timeout):
        async for ev in c:
            out.append(ev)
            if len(out) == n:
                break
    return out


async def test_fake_subscribe_receive_in_order(fake: FakeServer) -> None:
    async with connect(fake.url, **FAST) as c:
        sub = await c.subscribe("events:a")
        assert fake.received[-1]["type"] == "subscribe"
        for i in range(50):
            fake.publish("events:a", {"i": i})
        evs = await _take(c, 50)
        assert [e.data["i"] for e in evs] == list(range(50))
        assert [e.offset for e in evs] == list(range(1, 51))
        assert {e.epoch for e in evs} == {"e1"} and {e.channel for e in evs} == {"events:a"}
        assert (sub.offset, sub.epoch) == (50, "e1")
        assert await c.ping() >= 0


async def test_fake_callback_and_unsubscribe(fake: FakeServer) -> None:
    got: list[Event] = []
    async with connect(fake.url, **FAST) as c:
        sub = await c.subscribe("events:cb", got.append)
        fake.publish("events:cb", 1)
        fake.publish("events:cb", 2)
        async with asyncio.timeout(5):
            while len(got) < 2:
                await asyncio.sleep(0.01)
        assert [e.data for e in got] == [1, 2]
        await sub.unsubscribe()
        assert fake.received[-1] == {"id": fake.received[-1]["id"], "type": "unsubscribe",
                                     "channel": "events:cb"}
        assert "events:cb" not in c.subscriptions
        with pytest.raises(RequestError) as ei:
            await c.subscribe("private:x")
        assert ei.value.code == 403
        assert "private:x" not in c.subscriptions


async def test_fake_error_reply_and_timeout(fake: FakeServer) -> None:
    fake.ignore_types.add("history")
    async with connect(fake.url, **{**FAST, "request_timeout": 0.3}) as c:
        with pytest.raises(RequestError) as ei:
            await c.publish("events:a", {"x": 1})
        assert (ei.value.code, ei.value.message) == (403, "permission denied")
        with pytest.raises(RequestError) as ei:
            await c.request({"type": "nope"})
        assert ei.value.code == 404
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await c.history("events:a", limit=10)
        assert 0.25 < time.monotonic() - t0 < 2
        assert c.connected  # the connection stays open after errors and timeouts


async def test_fake_close_45xx_raises_from_async_for(fake: FakeServer) -> None:
    async with connect(fake.url, **FAST) as c:
        await c.subscribe("events:a")
        fake.publish("events:a", "before")
        await asyncio.sleep(0.05)
        fake.close_all(4504, "connection limit")
        with pytest.raises(ConnectionClosed) as ei:
            async with asyncio.timeout(5):
                async for ev in c:
                    assert ev.data == "before"  # queued events are delivered first
        assert (ei.value.code, ei.value.reason) == (4504, "connection limit")
        assert not isinstance(ei.value, AuthError)
        with pytest.raises(ConnectionClosed):  # later calls raise too
            await c.ping()
        await asyncio.sleep(0.2)
        assert len(fake.upgrades) == 1  # stopped for good: no reconnect


async def test_fake_close_4501_is_auth_error(fake: FakeServer) -> None:
    async with connect(fake.url, **FAST) as c:
        pending = asyncio.ensure_future(c.history("events:a"))
        fake.ignore_types.add("history")
        await asyncio.sleep(0)
        fake.close_all(4501, "invalid token")
        with pytest.raises(AuthError) as ei:
            await c.next_event(timeout=5)
        assert ei.value.code == 4501
        with pytest.raises((AuthError, RequestError)):
            await pending


async def test_fake_disconnect_push_reconnect_false(fake: FakeServer) -> None:
    async with connect(fake.url, **FAST) as c:
        await c.subscribe("events:a")
        fake.push_all({"type": "disconnect", "code": 4001, "reason": "bye",
                       "reconnect": False, "after_ms": 0})
        fake.close_all(4001, "bye")
        with pytest.raises(ConnectionClosed) as ei:
            await c.next_event(timeout=5)
        assert ei.value.code == 4001
        await asyncio.sleep(0.2)
        assert len(fake.upgrades) == 1


async def test_fake_upgrade_rejected_is_auth_error(fake: FakeServer) -> None:
    fake.reject_status = 403
    with pytest.raises(AuthError) as ei:
        async with connect(fake.url, token="nope", **FAST):
            pass
    assert ei.value.code == 403
    assert len(fake.upgrades) == 1
    assert fake.upgrades[0].headers["Authorization"] == "Bearer nope"


async def test_fake_token_callable_called_before_each_connect(fake: FakeServer) -> None:
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        return f"tok{calls}"

    async with connect(fake.url, token=token, **FAST) as c:
        await fake.wait_conns(1)
        fake.drop_all()
        await fake.wait_conns(1)
        await c.ping()
    assert calls == 2
    assert [u.headers["Authorization"] for u in fake.upgrades] == ["Bearer tok1", "Bearer tok2"]


async def test_fake_reconnect_recovers_from_last_position_and_dedupes(fake: FakeServer) -> None:
    fake.replay_overlap = 2  # the server replays two events the client already has
    states: list[str] = []
    async with connect(fake.url, on_state=states.append, **FAST) as c:
        sub = await c.subscribe("events:a")
        for i in range(5):
            fake.publish("events:a", i)
        assert [e.data for e in await _take(c, 5)] == [0, 1, 2, 3, 4]
        fake.drop_all()
        await asyncio.sleep(0.01)
        for i in range(5, 8):  # published while the client is away
            fake.publish("events:a", i)
        await fake.wait_conns(1)
        evs = await _take(c, 3)
        assert [e.data for e in evs] == [5, 6, 7]
        fake.publish("events:a", 8)
        live = await c.next_event(timeout=5)
        assert live.data == 8 and live.recovered is False
        subs = [m for m in fake.received if m["type"] == "subscribe"]
        assert subs[0].get("since") is None
        assert subs[1]["since"] == {"offset": 5, "epoch": "e1"}
        assert sub.recovered is True and sub.subscribed and c.reconnects == 1
        # Nothing more (no duplicates) is queued.
        with pytest.raises(RequestTimeout):
            await c.next_event(timeout=0.1)
    assert states[:2] == ["connecting", "connected"]
    assert "disconnected" in states and states[-1] == "closed"


async def test_fake_disconnect_push_after_ms_is_respected(fake: FakeServer) -> None:
    async with connect(fake.url, **FAST) as c:
        await c.subscribe("events:a")
        fake.push_all({"type": "disconnect", "code": 4001, "reason": "draining",
                       "reconnect": True, "after_ms": 400})
        t0 = time.monotonic()
        fake.close_all(4001, "draining")
        await asyncio.sleep(0.05)
        await fake.wait_conns(1)
        assert time.monotonic() - t0 >= 0.39
        await c.ping()
        assert c.subscriptions.keys() == {"events:a"}


async def test_fake_quiet_connection_is_probed_not_dropped(fake: FakeServer) -> None:
    # A healthy server that has nothing to say answers the client's pings: no reconnect.
    async with connect(fake.url, ping_interval=0.1, ping_timeout=0.1, **FAST) as c:
        await asyncio.sleep(0.8)
        assert fake.pings >= 3 and c.reconnects == 0 and c.connected


async def test_fake_ping_timeout_reconnects(fake: FakeServer) -> None:
    states: list[str] = []
    async with connect(fake.url, ping_interval=0.2, ping_timeout=0.1, on_state=states.append,
                       **FAST) as c:
        await fake.wait_conns(1)
        first = fake.conns[0]
        first.silent = True  # the server goes quiet: no data, no pongs, no replies
        t0 = time.monotonic()
        async with asyncio.timeout(5):
            while fake.conns == [first] or not fake.conns:
                await asyncio.sleep(0.02)
        assert time.monotonic() - t0 >= 0.25  # ping_interval + ping_timeout, not before
        await c.ping()
        assert c.reconnects >= 1 and fake.pings >= 1
        assert "disconnected" in states


async def test_fake_publish_in_flight_resent_with_its_key(fake: FakeServer) -> None:
    """A publish whose connection drops before its reply is sent again on the next
    connection with the same idempotency key (SPEC §13: the server publishes it once)."""
    fake.ignore_types.add("publish")
    async with connect(fake.url, **FAST) as c:
        task = asyncio.ensure_future(c.publish("events:a", 1))
        await asyncio.sleep(0.05)
        fake.ignore_types.discard("publish")
        fake.drop_all()
        with pytest.raises(RequestError):  # the fake answers the resent one with 403
            await task
        sent = [m for m in fake.received if m["type"] == "publish"]
        assert len(sent) == 2 and sent[0]["idempotency_key"] == sent[1]["idempotency_key"]
        await c.ping()  # the client itself carried on


async def test_connect_retries_until_a_server_listens() -> None:
    port = _free_port()
    draws: list[float] = []

    def rand() -> float:
        draws.append(1.0)
        return 1.0

    fake = FakeServer()
    client = connect(f"ws://127.0.0.1:{port}/ws", backoff_base=0.01, backoff_cap=0.05,
                     rand=rand)
    entering = asyncio.ensure_future(client.__aenter__())
    await asyncio.sleep(0.4)
    assert not entering.done()
    assert len(draws) >= 4  # it kept retrying
    await fake.start(port)
    try:
        async with asyncio.timeout(5):
            await entering
        assert client.connected
        await client.ping()
    finally:
        await client.close()
        await fake.stop()


# ---------------------------------------------------------------- real fastws server


async def _publish(srv: Any, channel: str, data: Any) -> dict:
    return await asyncio.to_thread(srv.publish, channel, data)


async def test_real_subscribe_receive_in_order(fastws_server) -> None:
    srv = fastws_server()
    async with connect(srv.ws_url, **FAST) as c:
        await c.subscribe("events:a")
        for i in range(20):
            await _publish(srv, "events:a", {"i": i})
        evs = await _take(c, 20)
        assert [e.data["i"] for e in evs] == list(range(20))
        offsets = [e.offset for e in evs]
        assert offsets == sorted(offsets) and len(set(offsets)) == 20
        assert all(e.channel == "events:a" and e.epoch for e in evs)
        assert await c.ping() >= 0


async def test_real_pattern_subscription(fastws_server) -> None:
    srv = fastws_server()
    async with connect(srv.ws_url, **FAST) as c:
        await c.subscribe("events:*")
        await _publish(srv, "other:x", 0)
        await _publish(srv, "events:bet_placed", 1)
        await _publish(srv, "events:market_created", 2)
        await _publish(srv, "eventsX", 3)
        evs = await _take(c, 2)
        assert [(e.channel, e.data) for e in evs] == [
            ("events:bet_placed", 1), ("events:market_created", 2)]
        with pytest.raises(RequestTimeout):
            await c.next_event(timeout=0.2)


async def test_real_wallet_pattern_named_as_the_server_names_it(fastws_server) -> None:
    """A ``wallet:`` pattern is lower-cased like on the server, so its events are routed."""
    srv = fastws_server(config='[namespaces.wallet]\nsubscribe = "anyone"\n')
    async with connect(srv.ws_url, **FAST) as c:
        sub = await c.subscribe("wallet:0xAB*")
        assert sub.channel == "wallet:0xab*" and list(c.subscriptions) == ["wallet:0xab*"]
        await _publish(srv, "wallet:0xABcd", 1)  # the server lower-cases it too
        ev = await c.next_event(timeout=5)
        assert (ev.channel, ev.data) == ("wallet:0xabcd", 1)
        await c.unsubscribe("wallet:0xAB*")
        assert not c.subscriptions and not sub.active


async def test_real_error_replies(fastws_server) -> None:
    srv = fastws_server()
    async with connect(srv.ws_url, **FAST) as c:
        with pytest.raises(RequestError) as ei:  # clients may not publish by default
            await c.publish("events:a", {"x": 1})
        assert ei.value.code == 403
        with pytest.raises(RequestError) as ei:
            await c.request({"type": "no_such_type"})
        assert ei.value.code == 404
        await c.subscribe("events:a")
        with pytest.raises(RequestError) as ei:
            await c.request({"type": "subscribe", "channel": "events:a"})
        assert ei.value.code == 409
        assert c.connected


async def test_real_server_restart_client_resumes(fastws_server) -> None:
    srv = fastws_server()
    async with connect(srv.ws_url, **FAST) as c:
        sub = await c.subscribe("events:*")
        for i in range(3):
            await _publish(srv, "events:a", i)
        assert [e.data for e in await _take(c, 3)] == [0, 1, 2]
        srv.stop(signal.SIGKILL)
        srv2 = fastws_server(port=srv.port)
        # The client reconnects and resubscribes by itself; wait until it has.
        async with asyncio.timeout(10):
            while c.reconnects < 1 or not sub.subscribed:
                await asyncio.sleep(0.02)
        assert sub.recovered is False  # memory broker: the epoch changed
        for i in range(3, 8):
            await _publish(srv2, "events:a", i)
        evs = await _take(c, 5, timeout=10)
        assert [e.data for e in evs] == [3, 4, 5, 6, 7]


async def test_real_connect_waits_for_server(fastws_server) -> None:
    port = _free_port()
    client = connect(f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2)
    entering = asyncio.ensure_future(client.__aenter__())
    await asyncio.sleep(0.5)
    assert not entering.done()
    srv = await asyncio.to_thread(fastws_server, port=port)
    try:
        async with asyncio.timeout(10):
            await entering
        await client.subscribe("events:a")
        await _publish(srv, "events:a", "hello")
        assert (await client.next_event(timeout=5)).data == "hello"
    finally:
        await client.close()


async def test_real_rejected_token_is_auth_error(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", "s3cret")
    with pytest.raises(AuthError):
        async with connect(srv.ws_url, token="not-a-jwt", **FAST) as c:
            await c.ping()


async def test_real_history_and_presence(fastws_server) -> None:
    srv = fastws_server()
    async with connect(srv.ws_url, **FAST) as c:
        await c.subscribe("events:h")
        for i in range(5):
            await _publish(srv, "events:h", i)
        await _take(c, 5)
        h = await c.history("events:h")
        assert [p["data"] for p in h["publications"]] == [0, 1, 2, 3, 4]
        assert h["epoch"] and h["offset"] == h["publications"][-1]["offset"]
        first = (await c.history("events:h", limit=2, since={"offset": 0, "epoch": h["epoch"]}))
        offs = [p["offset"] for p in first["publications"]]
        nxt = await c.history("events:h", limit=2,
                              since={"offset": offs[-1], "epoch": h["epoch"]})
        assert [p["data"] for p in first["publications"] + nxt["publications"]] == [0, 1, 2, 3]
        with pytest.raises(RequestError):  # presence is off by default
            await c.presence("events:h")


async def test_real_drain_disconnect_then_reconnect(fastws_server) -> None:
    cfg = "[server]\ndrain_timeout = 1\n"
    srv = fastws_server(config=cfg)
    async with connect(srv.ws_url, **FAST) as c:
        sub = await c.subscribe("events:d")
        for i in range(10):
            await _publish(srv, "events:d", i)
        # SIGTERM: every publication accepted before it arrives, then disconnect 4001.
        assert await asyncio.to_thread(srv.stop) == 0
        assert [e.data for e in await _take(c, 10)] == list(range(10))
        srv2 = await asyncio.to_thread(fastws_server, port=srv.port, config=cfg)
        async with asyncio.timeout(10):
            while c.reconnects < 1 or not sub.subscribed:
                await asyncio.sleep(0.02)
        assert sub.recovered is False  # a new memory broker: new epoch
        await _publish(srv2, "events:d", "after")
        assert (await c.next_event(timeout=5)).data == "after"


async def test_real_recovery_after_connection_loss(fastws_server) -> None:
    srv = fastws_server()
    # rand() == 1: the reconnect waits exactly backoff_base, a gap long enough to publish in.
    async with connect(srv.ws_url, backoff_base=0.5, backoff_cap=0.5, rand=lambda: 1.0) as c:
        sub = await c.subscribe("events:r")
        for i in range(3):
            await _publish(srv, "events:r", i)
        assert [e.data for e in await _take(c, 3)] == [0, 1, 2]
        assert c._conn is not None
        c._conn.abort()  # the network drops the connection
        for i in range(3, 6):  # published while the client is away
            await _publish(srv, "events:r", i)
        evs = await _take(c, 3, timeout=10)
        assert [e.data for e in evs] == [3, 4, 5]
        # The replay comes before `subscribed`, possibly in an earlier read: the three
        # events can be in hand while the reply is not, so wait for it (no polling).
        assert await sub.wait_subscribed(timeout=5) is True
        assert c.reconnects == 1 and sub.recovered is True
        await _publish(srv, "events:r", 6)
        assert (await c.next_event(timeout=5)).data == 6
        with pytest.raises(RequestTimeout):  # exactly once: nothing more
            await c.next_event(timeout=0.2)


async def test_real_overlapping_subscriptions_deliver_once(fastws_server) -> None:
    srv = fastws_server()
    seen: list[Event] = []
    async with connect(srv.ws_url, **FAST) as c:
        await c.subscribe("events:*")
        await c.subscribe("events:o")
        await c.subscribe("events:[op]", seen.append)
        for i in range(5):
            await _publish(srv, "events:o", i)
        assert [e.data for e in await _take(c, 5)] == [0, 1, 2, 3, 4]
        with pytest.raises(RequestTimeout):
            await c.next_event(timeout=0.2)
        assert [e.data for e in seen] == [0, 1, 2, 3, 4]


async def test_real_restart_with_redis_broker_recovers_everything(fastws_server,
                                                                 redis_server) -> None:
    """Server crash and restart on a shared Redis: nothing lost, in order, recovered:true.

    What is published while the client's server is down goes through a second node on
    the same Redis; the restarted server replays it from Redis history on resubscribe.
    """
    broker = ("--broker", redis_server.url)
    srv = fastws_server(*broker)
    other = fastws_server(*broker)  # a second node sharing the broker
    states: list[str] = []
    by_pattern: list[Event] = []
    async with connect(srv.ws_url, on_state=states.append, **FAST) as c:
        sub = await c.subscribe("market:0xabc")
        psub = await c.subscribe("market:0x*", by_pattern.append)  # overlapping pattern
        for i in range(5):
            await _publish(srv, "market:0xabc", i)
        first = await _take(c, 5)
        assert [e.data for e in first] == [0, 1, 2, 3, 4]
        srv.stop(signal.SIGKILL)
        for i in range(5, 10):  # published while the client's server is down
            await _publish(other, "market:0xabc", i)
        srv2 = await asyncio.to_thread(fastws_server, *broker, port=srv.port)
        replayed = await _take(c, 5, timeout=10)
        assert await sub.wait_subscribed(timeout=10) is True
        assert await psub.wait_subscribed(timeout=10) is True  # patterns recover too
        assert c.reconnects >= 1 and "disconnected" in states
        for i in range(10, 13):
            await _publish(srv2, "market:0xabc", i)
        live = await _take(c, 3)
        evs = first + replayed + live
        assert [e.data for e in evs] == list(range(13))  # nothing lost, order kept
        assert [e.recovered for e in evs] == [False] * 5 + [True] * 5 + [False] * 3
        offsets = [e.offset for e in evs]
        assert offsets == list(range(offsets[0], offsets[0] + 13))  # no gap, no duplicate
        assert len({e.epoch for e in evs}) == 1  # Redis kept the epoch across the restart
        with pytest.raises(RequestTimeout):
            await c.next_event(timeout=0.2)
        assert [e.data for e in by_pattern] == list(range(13))  # once each, in order


def _jwt(secret: str, sub: str, ttl: float, *, iat: bool = False) -> str:
    import jwt

    now = time.time()
    claims: dict[str, Any] = {"sub": sub, "exp": int(now + ttl)}
    if iat:
        claims["iat"] = int(now)
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_real_token_is_refreshed_on_the_live_connection(fastws_server) -> None:
    """A token callable with short-lived JWTs (3 s) is called before each exp and its
    token sent in an `auth` request: the same connection carries on through several
    refreshes (no reconnect, no 4501), and every event arrives once, in order."""
    secret = "test-secret-0123456789abcdef0123"
    srv = fastws_server("--jwt-secret", secret)
    issued: list[str] = []
    states: list[str] = []

    async def token() -> str:  # an async callable, as a token service would be
        issued.append(_jwt(secret, "alice", 3, iat=len(issued) % 2 == 1))
        return issued[-1]

    async with connect(srv.ws_url, token=token, on_state=states.append, **FAST) as c:
        conn = c._conn
        sub = await c.subscribe("user:alice")
        pat = await c.subscribe("events:*")
        sent = 0
        async with asyncio.timeout(20):
            while c.token_refreshes < 3:  # three tokens in turn outlive the one before
                await _publish(srv, "user:alice", sent)
                await _publish(srv, "events:a" if sent % 2 else "events:b", sent)
                sent += 1
                await asyncio.sleep(0.02)  # pacing the publisher, not waiting for an event
        got = await _take(c, 2 * sent, timeout=10)
        assert [e.data for e in got if e.channel == "user:alice"] == list(range(sent))
        assert [e.data for e in got if e.channel != "user:alice"] == list(range(sent))
        assert not any(e.recovered for e in got)
        assert c._conn is conn and c.connected and c.reconnects == 0
        assert states == ["connecting", "connected"]  # never disconnected
        assert len(issued) == c.token_refreshes + 1 >= 4
        assert sub.subscribed and pat.subscribed and sub.recovered is None
        # The token in force is the newest: private channels still work on it.
        await _publish(srv, "user:alice", "last")
        assert (await c.next_event(timeout=5)).data == "last"
        assert c.reconnects == 0


async def test_real_failed_refresh_falls_back_to_reconnect(fastws_server) -> None:
    """While the token service fails (the callable raises), the refresh is retried until
    exp; then the server closes 4501 "token expired" and the client reconnects with a
    fresh token, the private channel carrying on with recovery."""
    secret = "test-secret-0123456789abcdef0123"
    srv = fastws_server("--jwt-secret", secret)
    issued: list[str] = []
    refused: list[float] = []
    holder: list[Client] = []

    def token() -> str:
        if holder and holder[0].connected:  # a refresh on the live connection: fail
            refused.append(time.monotonic())
            raise RuntimeError("token service down")
        issued.append(_jwt(secret, "alice", 2 if not issued else 60))
        return issued[-1]

    async with connect(srv.ws_url, token=token, **FAST) as c:
        holder.append(c)
        sub = await c.subscribe("user:alice")
        await _publish(srv, "user:alice", "first")
        assert (await c.next_event(timeout=5)).data == "first"
        async with asyncio.timeout(10):  # the first token expires within ~2 s
            while c.reconnects < 1:
                await asyncio.sleep(0.05)
        assert await sub.wait_subscribed(timeout=5) is True
        await _publish(srv, "user:alice", "after refresh")
        assert (await c.next_event(timeout=5)).data == "after refresh"
        # a token per connect attempt (a loaded machine may need more than one attempt
        # to reconnect); none was handed out on the live connection (token() raises)
        assert len(issued) >= 2 and not c.closed
        assert len(refused) >= 2 and c.token_refreshes == 0  # retried, then gave up


async def test_real_manual_auth_reschedules_the_refresh(fastws_server) -> None:
    """A token sent by hand with auth() is the one whose exp the refresh then follows."""
    secret = "test-secret-0123456789abcdef0123"
    srv = fastws_server("--jwt-secret", secret)
    calls: list[float] = []

    def token() -> str:  # long-lived tokens: without auth() no refresh would be due
        calls.append(time.monotonic())
        return _jwt(secret, "dave", 3600)

    async with connect(srv.ws_url, token=token, **FAST) as c:
        await c.subscribe("user:dave")
        with pytest.raises(TypeError, match="non-empty string"):
            await c.auth("")
        short = _jwt(secret, "dave", 3, iat=True)
        assert (await c.auth(short))["user"] == "dave"
        async with asyncio.timeout(10):  # due within ~2.4 s of that short token
            while c.token_refreshes < 1:
                await asyncio.sleep(0.05)
        assert len(calls) == 2 and c.reconnects == 0
        claims = token_claims(short)
        assert claims is not None
        # Nothing to await: that the server does not close at the short token's exp.
        await asyncio.sleep(max(0.0, claims["exp"] - time.time()) + 0.3)
        await _publish(srv, "user:dave", "still here")
        assert (await c.next_event(timeout=5)).data == "still here"
        assert c.reconnects == 0 and c.connected


async def test_real_refresh_can_be_turned_off(fastws_server) -> None:
    """token_refresh=False: a callable is only asked on (re)connects, as before."""
    secret = "test-secret-0123456789abcdef0123"
    srv = fastws_server("--jwt-secret", secret)
    issued: list[str] = []

    def token() -> str:
        issued.append(_jwt(secret, "alice", 1.2 if not issued else 60))
        return issued[-1]

    async with connect(srv.ws_url, token=token, token_refresh=False, **FAST) as c:
        sub = await c.subscribe("user:alice")
        async with asyncio.timeout(10):
            while c.reconnects < 1:
                await asyncio.sleep(0.05)
        await sub.wait_subscribed(timeout=5)
        assert len(issued) == 2 and c.token_refreshes == 0


async def test_real_expired_static_token_stops_the_client(fastws_server) -> None:
    secret = "test-secret-0123456789abcdef0123"
    srv = fastws_server("--jwt-secret", secret)
    async with connect(srv.ws_url, token=_jwt(secret, "bob", 1.2), **FAST) as c:
        await c.subscribe("user:bob")
        with pytest.raises(AuthError) as ei:  # a string cannot be refreshed
            await c.next_event(timeout=10)
        assert (ei.value.code, ei.value.reason) == (4501, "token expired")


async def test_real_ping_timeout_detects_a_frozen_server(fastws_server) -> None:
    """A server that stops answering (SIGSTOP) is detected by the client's probe."""
    srv = fastws_server()
    states: list[str] = []
    opts = {**FAST, "ping_interval": 0.3, "ping_timeout": 0.4, "connect_timeout": 0.5}
    async with connect(srv.ws_url, on_state=states.append, **opts) as c:
        sub = await c.subscribe("events:p")
        await _publish(srv, "events:p", 1)
        assert (await c.next_event(timeout=5)).data == 1
        await asyncio.sleep(1.0)  # quiet but healthy: the server answers the pings
        assert c.reconnects == 0 and c.connected
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            async with asyncio.timeout(5):
                while c.connected:
                    await asyncio.sleep(0.02)
            assert 0.3 <= time.monotonic() - t0 < 2.0
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        assert await sub.wait_subscribed(timeout=10) is True
        assert "disconnected" in states and c.reconnects >= 1
        await _publish(srv, "events:p", 2)
        assert (await c.next_event(timeout=5)).data == 2


def docs_block(marker: str, lang: str) -> str:
    """The first ```lang block after ``marker`` in docs/clients.md."""
    text = (ROOT / "docs" / "clients.md").read_text()
    after = text.split(marker, 1)[1]
    return after.split(f"```{lang}\n", 1)[1].split("\n```", 1)[0]


async def test_docs_siwe_example_opens_the_wallet_channel(fastws_server) -> None:
    """The Python Sign-In with Ethereum example of docs/clients.md, run as written."""
    from eth_account import Account

    srv = fastws_server("--jwt-secret", "test-secret-0123456789abcdef0123")
    ns: dict[str, Any] = {"__name__": "clients_md"}
    code = docs_block("tests/test_client.py runs this block", "python")
    exec(compile(code, "docs/clients.md", "exec"), ns)  # noqa: S102 - our own docs
    ns["HTTP"], ns["WS"] = srv.http_url, srv.ws_url
    acct = Account.create()
    session = await asyncio.to_thread(ns["siwe_login"], acct)
    assert session["sub"] == acct.address and session["exp"] > time.time() + 3000
    async with connect(srv.ws_url, token=ns["wallet_token"](acct), **FAST) as c:
        await c.subscribe(f"wallet:{acct.address}")  # checksummed: the same channel
        await _publish(srv, f"wallet:{acct.address.lower()}", {"balance": 5})
        assert (await c.next_event(timeout=5)).data == {"balance": 5}
        with pytest.raises(RequestError) as ei:  # another wallet's channel stays private
            await c.subscribe(f"wallet:{Account.create().address}")
        assert ei.value.code == 403
