"""The server end to end over real loopback sockets: protocol v1, fan-out, limits, closes."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import jwt
import orjson
import picows
import pytest
from conftest import http, scrape
from wsclient import RawClient, connect

PUB_CONFIG = """
[limits]
messages_per_connection = 100000
[namespaces.chat]
publish = "anyone"
history_size = 0
[namespaces.room]
presence = true
"""


async def sub(c: RawClient, channel: str, id: int = 1) -> dict:
    reply = await c.request({"id": id, "type": "subscribe", "channel": channel})
    assert reply == {"id": id, "type": "subscribed", "channel": channel}, reply
    return reply


async def test_subscribe_publish_receive(server) -> None:
    c = await connect(server.ws_url)
    await sub(c, "events:bet_placed")
    res = await asyncio.to_thread(server.publish, "events:bet_placed", {"amount": "10"})
    assert res["offset"] == 1 and isinstance(res["epoch"], str) and res["epoch"]
    ev = await c.recv()
    assert ev == {"type": "event", "channel": "events:bet_placed", "offset": 1,
                  "epoch": res["epoch"], "data": {"amount": "10"}}
    assert await c.request({"id": 2, "type": "unsubscribe", "channel": "events:bet_placed"}) == {
        "id": 2, "type": "unsubscribed", "channel": "events:bet_placed"}
    await asyncio.to_thread(server.publish, "events:bet_placed", {"amount": "11"})
    assert await c.request({"id": 3, "type": "ping"}) == {"id": 3, "type": "pong"}
    assert c.messages.empty()
    c.close()


async def test_root_path_and_pattern_semantics(server) -> None:
    c = await connect(f"ws://127.0.0.1:{server.port}/")
    await sub(c, "market:0x[ab]?")
    await sub(c, "events:*", 2)
    for ch in ("market:0xa1", "market:0xc1", "events:x:y", "market:0xb", "other:x"):
        await asyncio.to_thread(server.publish, ch, ch)
    got = [(await c.recv())["channel"] for _ in range(2)]
    assert got == ["market:0xa1", "events:x:y"]
    assert await c.request({"id": 9, "type": "ping"}) == {"id": 9, "type": "pong"}
    assert c.messages.empty()


async def test_one_delivery_however_many_subscriptions_match(server) -> None:
    c = await connect(server.ws_url)
    c.keep_raw = True
    for i, name in enumerate(["events:x", "events:*", "*", "e*:?"]):
        await sub(c, name, i + 1)
    await asyncio.to_thread(server.publish, "events:x", [1])
    await c.recv()
    assert await c.request({"id": 99, "type": "ping"}) == {"id": 99, "type": "pong"}
    assert c.messages.empty()
    assert c.raw[-2] == b'{"type":"event","channel":"events:x","offset":1,"epoch":"' + \
        orjson.loads(c.raw[-2])["epoch"].encode() + b'","data":[1]}'


async def test_error_replies_keep_the_connection_open(fastws_server) -> None:
    srv = fastws_server(config="[limits]\nmax_subscriptions = 2\n")
    c = await connect(srv.ws_url)
    cases = [
        (b"garbage", 400),
        (b'{"id":1,"type":"nope"}', 404),
        (b'{"id":2,"type":"subscribe","channel":"bad name"}', 400),
        (b'{"id":3,"type":"publish","channel":"events:x","data":1}', 403),
        (b'{"id":4,"type":"subscribe","channel":"wallet:0xabc"}', 401),
        (b'{"id":5,"type":"history","channel":"events:*"}', 400),
        (b'{"id":6,"type":"presence","channel":"events:x"}', 403),
        (b'{"id":7,"type":"auth","token":"x.y.z"}', 401),
    ]
    for payload, code in cases:
        c.send(payload)
        reply = await c.recv()
        assert reply["type"] == "error" and reply["code"] == code, (payload, reply)
        assert isinstance(reply["message"], str) and reply["message"]
    await sub(c, "a", 10)
    assert (await c.request({"id": 11, "type": "subscribe", "channel": "a"}))["code"] == 409
    await sub(c, "b", 12)
    assert (await c.request({"id": 13, "type": "subscribe", "channel": "c"}))["code"] == 429
    assert await c.request({"id": 14, "type": "ping"}) == {"id": 14, "type": "pong"}
    _, _, body = http("GET", srv.http_url + "/metrics")
    text = body.decode()
    for code in (400, 401, 403, 404, 409, 429):
        assert f'fastws_errors_total{{code="{code}"}}' in text


async def test_protocol_abuse_closes_with_rfc_codes(server) -> None:
    c = await connect(server.ws_url)
    c.transport.send(2, b"\x00binary")  # BINARY
    assert await c.wait_closed() == 1003
    c = await connect(server.ws_url)
    c.transport.send(1, b"\xff\xfe not utf-8")
    assert await c.wait_closed() == 1007
    c = await connect(server.ws_url)
    c.send(b'{"type":"ping","pad":"' + b"x" * 70000 + b'"}')
    assert await c.wait_closed() == 1009
    assert http("GET", server.http_url + "/healthz")[0] == 200


async def test_private_wallet_channel_with_jwt(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", "a-test-secret-of-at-least-32-bytes!!")
    addr = "0xAbCdEf0000000000000000000000000000000001"
    token = jwt.encode({"sub": addr}, "a-test-secret-of-at-least-32-bytes!!", algorithm="HS256")
    owner = await connect(srv.ws_url + "?token=" + token)
    await sub(owner, "wallet:" + addr.lower())
    spy = await connect(srv.ws_url)
    await sub(spy, "*")
    other = await connect(srv.ws_url)
    assert (await other.request({"id": 1, "type": "auth", "token": token})) == {
        "id": 1, "type": "authed", "user": addr}
    denied = await other.request({"id": 2, "type": "subscribe",
                                  "channel": "wallet:0x0000000000000000000000000000000000000002"})
    assert denied["code"] == 403
    # published with mixed case: one channel, delivered to the owner only
    await asyncio.to_thread(srv.publish, "wallet:" + addr, {"balance": 1})
    ev = await owner.recv()
    assert ev["channel"] == "wallet:" + addr.lower() and ev["data"] == {"balance": 1}
    assert await spy.request({"id": 5, "type": "ping"}) == {"id": 5, "type": "pong"}
    assert spy.messages.empty()
    bad = await connect(srv.ws_url + "?token=not-a-token")
    push = await bad.recv()
    assert push["type"] == "disconnect" and push["code"] == 4501 and push["reconnect"] is False
    assert await bad.wait_closed() == 4501


async def test_client_publish_history_and_presence(fastws_server) -> None:
    srv = fastws_server(config=PUB_CONFIG)
    a = await connect(srv.ws_url)
    b = await connect(srv.ws_url)
    await sub(a, "chat:lobby")
    reply = await b.request({"id": 1, "type": "publish", "channel": "chat:lobby", "data": "hi"})
    assert reply == {"id": 1, "type": "published", "offset": 0, "epoch": ""}
    push = await a.recv()  # a client's publication names its sender (protocol §13)
    assert push == {"type": "event", "channel": "chat:lobby", "data": "hi",
                    "from": {"user": None, "client": push["from"]["client"]}}
    for i in range(5):
        await asyncio.to_thread(srv.publish, "events:h", i)
    hist = await b.request({"id": 2, "type": "history", "channel": "events:h", "limit": 2,
                            "since": {"offset": 1, "epoch": ""}})
    assert [p["data"] for p in hist["publications"]] == [1, 2] and hist["offset"] == 5
    await sub(a, "room:1", 3)
    await sub(b, "room:1", 4)
    join = await a.recv()
    assert join["type"] == "join" and join["channel"] == "room:1"
    pres = await a.request({"id": 5, "type": "presence", "channel": "room:1"})
    assert len(pres["clients"]) == 2
    b.close()
    leave = await a.recv()
    assert leave["type"] == "leave" and leave["client"] == join["client"]
    # join/leave pushes are delivered but are not publications
    assert scrape(srv.http_url)["fastws_publications_total"] == 6


async def test_recovery_with_since(server) -> None:
    c = await connect(server.ws_url)
    await sub(c, "events:r")
    first = await asyncio.to_thread(server.publish, "events:r", 1)
    await c.recv()
    c.close()
    for i in (2, 3):
        await asyncio.to_thread(server.publish, "events:r", i)
    c = await connect(server.ws_url)
    reply = await c.request({"id": 1, "type": "subscribe", "channel": "events:r",
                             "since": {"offset": 1, "epoch": first["epoch"]}})
    assert reply["recovered"] is True
    c2 = await connect(server.ws_url)
    bad = await c2.request({"id": 1, "type": "subscribe", "channel": "events:r",
                            "since": {"offset": 1, "epoch": "other"}})
    assert bad["recovered"] is False
    got = [(await c.recv())["data"] for _ in range(2)]
    assert got == [2, 3]


class SeqChecker(RawClient):
    """Checks in the frame callback that event data counts 0, 1, 2, … without a gap."""

    def __init__(self) -> None:
        super().__init__()
        self.expect = 0
        self.target = 0
        self.done = asyncio.Event()
        self.bad: list[object] = []

    def on_ws_frame(self, transport, frame) -> None:
        if self.target and frame.msg_type == 1:
            msg = orjson.loads(frame.get_payload_as_bytes())
            if msg.get("type") == "event":
                if msg["data"] != self.expect:
                    self.bad.append((self.expect, msg["data"]))
                self.expect += 1
                if self.expect == self.target:
                    self.done.set()
                return
        super().on_ws_frame(transport, frame)


async def test_burst_ordering_10000_publications_100_subscribers(fastws_server) -> None:
    srv = fastws_server(config=PUB_CONFIG)
    n_subs, n_pubs = 100, 10_000
    subs = [(await picows.ws_connect(SeqChecker, srv.ws_url))[1] for _ in range(n_subs)]
    for i, c in enumerate(subs):
        await sub(c, "chat:burst" if i % 2 else "chat:*")
        c.target = n_pubs
    pub = await connect(srv.ws_url)
    for seq in range(n_pubs):
        pub.send(b'{"type":"publish","channel":"chat:burst","data":%d}' % seq)
    await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in subs)), 120)
    assert [c.bad for c in subs if c.bad] == []
    values = scrape(srv.http_url)
    assert values["fastws_deliveries_total"] == n_subs * n_pubs
    assert values["fastws_publications_total"] == n_pubs
    assert values["fastws_writes_total"] < n_subs * n_pubs / 2, \
        "frames queued in one loop pass must share one write"


async def test_metrics_values(fastws_server) -> None:
    srv = fastws_server()
    c1 = await connect(srv.ws_url)
    c2 = await connect(srv.ws_url)
    await sub(c1, "events:m")
    await sub(c1, "events:*", 2)
    await sub(c2, "events:*")
    await asyncio.to_thread(srv.publish, "events:m", {"k": 1})
    await c1.recv()
    await c2.recv()
    status, headers, body = http("GET", srv.http_url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["fastws_connections"] == 2
    assert values["fastws_connections_accepted_total"] == 2
    assert values["fastws_subscriptions"] == 3
    assert values["fastws_channels"] == 2
    assert values["fastws_messages_received_total"] == 3
    assert values["fastws_publications_total"] == 1
    assert values["fastws_deliveries_total"] == 2
    assert values["fastws_bytes_sent_total"] > 0
    assert values["fastws_delivery_latency_seconds_count"] == 1
    assert values["fastws_broker_up"] == 1
    assert "process_resident_memory_bytes" in values
    c2.close()
    await c2.wait_closed()
    for _ in range(100):
        _, _, body = http("GET", srv.http_url + "/metrics")
        if 'fastws_connections_closed_total{code="1000"} 1.0' in body.decode():
            break
        await asyncio.sleep(0.05)
    assert 'fastws_connections_closed_total{code="1000"} 1.0' in body.decode()
    assert "fastws_connections 1.0" in body.decode()


def test_http_endpoints(server) -> None:
    base = server.http_url
    assert http("GET", base + "/healthz")[::2] == (200, b'{"status":"ok"}\n')
    assert http("GET", base + "/readyz")[0] == 200
    status, headers, body = http("GET", base + "/")
    assert status == 200 and b'id="pattern"' in body and headers["Content-Type"].startswith(
        "text/html")
    status, headers, body = http("GET", base + "/fastws.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"FastWS" in body
    assert http("GET", base + "/nope")[0] == 404
    assert http("DELETE", base + "/healthz")[0] == 405
    assert http("GET", base + "/api/publish")[0] == 405
    key = {"Authorization": "Bearer test-key"}
    ok = {"channel": "events:x", "data": 1}
    assert http("POST", base + "/api/publish", ok)[0] == 401
    assert http("POST", base + "/api/publish", ok, {"Authorization": "Bearer wrong"})[0] == 401
    for bad in (b"{nope", b"[1]", {"data": 1}, {"channel": "events:*", "data": 1},
                {"channel": "events:x"}, {"channel": "a", "data": 1, "extra": 2},
                {"channel": "a", "data": 1, "idempotency_key": 5}):
        status, _, body = http("POST", base + "/api/publish", bad, key)
        assert status == 400 and orjson.loads(body)["error"], bad
    first = http("POST", base + "/api/publish", {**ok, "idempotency_key": "k1"}, key)
    again = http("POST", base + "/api/publish", {**ok, "idempotency_key": "k1"}, key)
    assert first[0] == again[0] == 200 and first[2] == again[2]
    assert orjson.loads(http("POST", base + "/api/publish", ok, key)[2])["offset"] == 2


def test_http_keepalive_and_http10(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), 5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            data += s.recv(4096)
    with socket.create_connection(("127.0.0.1", server.port), 5) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data
    with socket.create_connection(("127.0.0.1", server.port), 5) as s:
        s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert http("GET", server.http_url + "/healthz")[0] == 200


async def test_heartbeat_closes_silent_connections(fastws_server) -> None:
    srv = fastws_server(config="[server]\nping_interval = 1\npong_timeout = 1\n")
    alive = await connect(srv.ws_url)  # picows answers pings: stays open
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    s.settimeout(10)
    assert s.recv(4096).startswith(b"HTTP/1.1 101")
    t0 = time.monotonic()
    data = b""
    while chunk := await asyncio.to_thread(s.recv, 4096):
        data += chunk
    assert 1.5 < time.monotonic() - t0 < 8
    assert b"\x89" in data  # a server PING came first
    s.close()
    assert await alive.request({"id": 1, "type": "ping"}) == {"id": 1, "type": "pong"}


async def test_slow_consumer_is_closed_4008(fastws_server) -> None:
    srv = fastws_server(config="[limits]\nsend_buffer = 65536\n")
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    s.recv(4096)
    frame = b'{"type":"subscribe","channel":"events:big"}'
    s.sendall(bytes([0x81, 0x80 | len(frame)]) + b"\0\0\0\0" + frame)
    fast = await connect(srv.ws_url)
    await sub(fast, "events:big")
    blob = "x" * 50_000
    for i in range(200):
        await asyncio.to_thread(srv.publish, "events:big", {"i": i, "blob": blob})
        ev = await fast.recv()
        assert ev["data"]["i"] == i
    for _ in range(150):  # dropped within 10 s whether or not the client answers
        values = scrape(srv.http_url)
        if values.get('fastws_connections_closed_total{code="4008"}') == 1:
            break
        await asyncio.sleep(0.1)
    assert values["fastws_slow_consumer_disconnects_total"] == 1
    assert values['fastws_connections_closed_total{code="4008"}'] == 1
    assert values["fastws_connections"] == 1
    assert await fast.request({"id": 7, "type": "ping"}) == {"id": 7, "type": "pong"}
    s.close()


async def test_sigterm_drains_in_order_then_exits_0(fastws_server) -> None:
    srv = fastws_server(config="[server]\ndrain_timeout = 2\n")
    clients = [await connect(srv.ws_url) for _ in range(5)]
    for c in clients:
        await sub(c, "events:d")
    for i in range(50):
        await asyncio.to_thread(srv.publish, "events:d", i)
    srv.proc.send_signal(signal.SIGTERM)
    for c in clients:
        got = [(await c.recv())["data"] for _ in range(50)]
        assert got == list(range(50))
        push = await c.recv()
        assert push["type"] == "disconnect" and push["code"] == 4001 and push["reconnect"]
        assert 0 <= push["after_ms"] <= 2000
        assert await c.wait_closed() == 4001
    assert await asyncio.to_thread(srv.proc.wait, 10) == 0


@pytest.mark.parametrize("args", [["--port", "x"], ["--broker", "kafka://x"]])
def test_bad_flags_exit_2_with_one_line(fastws_server, args) -> None:
    srv = fastws_server(*args, wait=False)
    assert srv.proc.wait(20) == 2
    out = srv.output().strip().splitlines()
    assert len(out) == 1 and ("--port" in out[0] or "--broker" in out[0])
