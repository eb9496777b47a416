"""Hostile input against a real server: generated frames and JSON, oversize frames, invalid
UTF-8, garbage HTTP, half-open sockets, a 10,000-subscribe burst, a slow reader among fast
ones.  After each, the server must be alive and serving, with bounded memory."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Iterator

import orjson
import pytest
from conftest import ServerProc, http, scrape, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from syncws import Closed, SyncWS, handshake
from wsclient import connect

# Close codes a server may answer hostile input with (RFC 6455 and SPEC §4).
HOSTILE_CLOSES = {1002, 1003, 1007, 1009, 4029}
HANDSHAKE = handshake()


def rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def alive(srv: ServerProc) -> None:
    """The server answers HTTP, and a new WebSocket can subscribe and receive."""
    assert srv.proc.poll() is None, srv.output()
    assert http("GET", srv.http_url + "/healthz", timeout=10)[0] == 200
    ws = SyncWS(srv.port)
    ws.send_json({"id": 1, "type": "subscribe", "channel": "alive:check"})
    assert ws.recv_json()["type"] == "subscribed"
    srv.publish("alive:check", "ok")
    assert ws.recv_json()["data"] == "ok"
    ws.close()


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[ServerProc]:
    """One server for the generated-input tests (high message limit: the fuzzer is fast)."""
    srv = start_server(config="[limits]\nmessages_per_connection = 1000000\n"
                              "[namespaces.chat]\npublish = \"anyone\"\npresence = true\n")
    yield srv
    srv.stop()
    out = srv.output()
    assert "Traceback" not in out and "internal error" not in out, out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20)
FIELDS = {
    "id": st.integers(-5, 2**64) | JSON,
    "type": st.sampled_from(["subscribe", "unsubscribe", "publish", "history", "presence",
                             "auth", "ping", "nope", ""]) | JSON,
    "channel": st.sampled_from(["chat:a", "chat:*", "wallet:0xAB", "user:x", "a b", "",
                                "x" * 300, "[", "\\", "é"]) | st.text(max_size=12) | JSON,
    "data": JSON,
    "since": st.fixed_dictionaries({"offset": st.integers(-3, 5) | JSON,
                                    "epoch": st.text(max_size=4) | JSON}) | JSON,
    "limit": st.integers(-3, 5000) | JSON,
    "token": st.text(max_size=40) | JSON,
}
MESSAGES = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=7).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(msgs=st.lists(MESSAGES, min_size=1, max_size=8))
def test_generated_json_gets_one_reply_each(hostile_server, msgs) -> None:
    """Every text message gets exactly one reply (or push-free error), never a close."""
    ws = SyncWS(hostile_server.port)
    try:
        for m in msgs:
            ws.send_frame(1, json.dumps(m).encode())   # (big integers, Infinity too)
        ws.send_json({"id": 987654321, "type": "ping"})
        replies, pong = [], False      # (a ping is answered at once, a subscribe once
        while not pong or len(replies) < len(msgs):   # the broker has it: any order)
            r = ws.recv_json()
            if r.get("id") == 987654321 and r["type"] == "pong" and not pong:
                pong = True
            elif r["type"] not in ("event", "join", "leave"):
                replies.append(r)
        assert len(replies) == len(msgs), (msgs, replies)
        for r in replies:
            assert r["type"] != "error" or (r["code"] != 500 and r["message"]), r
    finally:
        ws.close()


FRAMES = st.lists(st.tuples(
    st.sampled_from([0, 1, 2, 3, 8, 9, 10, 11, 15]),          # opcode, reserved ones too
    st.binary(max_size=200) | st.text(max_size=50).map(str.encode),
    st.booleans(),                                            # FIN
    st.sampled_from([0, 0, 0, 1, 4]),                         # RSV bits
), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(frames=FRAMES)
def test_generated_frames_never_hurt_the_server(hostile_server, frames) -> None:
    """Any frame sequence: the connection keeps working or closes with an RFC/SPEC code."""
    ws = SyncWS(hostile_server.port)
    try:
        try:
            for op, payload, fin, rsv in frames:
                ws.send_frame(op, payload, fin, rsv)
            ws.send_json({"id": 55, "type": "ping"})
        except OSError:
            pass                                              # closed already: read why
        try:
            while True:
                r = ws.recv_json()
                if r.get("id") == 55 and r.get("type") == "pong":
                    break
        except Closed as closed:
            assert closed.args[0] in HOSTILE_CLOSES | {1000}, (frames, closed.args)
        except (ConnectionError, OSError):
            pass                                              # dropped after its close
    finally:
        ws.close()


def test_oversize_and_invalid_frames(hostile_server) -> None:
    port = hostile_server.port
    cases = [
        (lambda ws: ws.send_frame(1, b"x" * 10, length=2**62), 1009),      # lies: 4 EiB
        (lambda ws: ws.send_frame(1, b"{" + b" " * 70_000 + b"}"), 1009),  # over 64 KiB
        (lambda ws: [ws.send_frame(1 if i == 0 else 0, b" " * 30_000, fin=False)
                     for i in range(4)], 1009),                            # fragments add up
        (lambda ws: ws.send_frame(9, b"p" * 126), 1002),                   # control > 125
        (lambda ws: ws.send_frame(1, b"\xed\xa0\x80"), 1007),              # UTF-16 surrogate
        (lambda ws: ws.send_frame(1, b"\xc0\xaf"), 1007),                  # overlong
        (lambda ws: (ws.send_frame(1, b'{"type":"ping","x":"\xe2\x82', fin=False),
                     ws.send_frame(0, b'\x28"}')), 1007),                  # bad across frames
        (lambda ws: ws.send_frame(0, b"orphan continuation"), 1002),
        (lambda ws: ws.send_frame(2, b"\x00\x01"), 1003),
    ]
    for act, code in cases:
        ws = SyncWS(port)
        act(ws)
        with pytest.raises(Closed) as closed:
            while True:
                ws.recv_json()
        assert closed.value.args[0] == code
        ws.close()
    # UTF-8 split across fragments at a character boundary inside is fine
    ws = SyncWS(port)
    ws.send_frame(1, b'{"id":1,"type":"ping","x":"\xe2\x82', fin=False)
    ws.send_frame(0, b'\xac"}')
    assert ws.recv_json() == {"id": 1, "type": "pong"}
    ws.close()
    alive(hostile_server)


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",   # TLS
    b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /\r\n\r\n",
    b"BREW /pot HTCPCP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",                        # no key
    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n"
    b"Sec-WebSocket-Version: 99\r\nConnection: Upgrade\r\n\r\n",
    b"GET /ws?token=%ff%fe HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: \x00\r\n\r\n",
    b"\r\n\r\n\r\n\r\n",
]


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=600)
       | st.lists(st.sampled_from([b"GET ", b"POST ", b"/ws", b"/api/publish", b" HTTP/1.1",
                                   b"\r\n", b"Upgrade: websocket", b"Content-Length: 5",
                                   b": ", b"\x00", b"Host: a", b"{}"]), max_size=12).map(
                                       b"".join))
def test_generated_http_garbage(hostile_server, data) -> None:
    """Whatever arrives, the answer (if any) is an HTTP status line, never a crash."""
    out = _exchange(hostile_server.port, data)
    assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:200]


def test_garbage_http_then_alive(hostile_server) -> None:
    for data in GARBAGE:
        out = _exchange(hostile_server.port, data)
        if b"token=%ff" in data:      # a valid upgrade with a bad token: 101, then 4501
            assert out.startswith(b"HTTP/1.1 101") and b"invalid token" in out
            continue
        assert out == b"" or out.startswith(b"HTTP/1.1 4"), (data[:60], out[:200])
    alive(hostile_server)


async def test_half_open_connections(fastws_server) -> None:
    """Hundreds of sockets that stall mid-request, plus silent ones: the server keeps
    serving at once and drops each stalled socket within its head timeout."""
    srv = fastws_server()
    socks = []
    for i in range(600):
        s = socket.create_connection(("127.0.0.1", srv.port))
        if i % 3 == 0:
            s.sendall(b"GET /metrics HT")                     # stalls in the request line
        elif i % 3 == 1:
            s.sendall(HANDSHAKE[:60])                         # stalls in an upgrade
        socks.append(s)                                       # i % 3 == 2: says nothing
    t0 = time.monotonic()
    await asyncio.to_thread(alive, srv)
    assert time.monotonic() - t0 < 5
    # every stalled socket is closed by the server (head timeout 10 s)
    deadline = time.monotonic() + 30
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            assert await asyncio.to_thread(s.recv, 100) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() - t0 < 25
    await asyncio.to_thread(alive, srv)


def test_10000_subscribes_in_one_burst(fastws_server) -> None:
    """10,000 subscribe frames in one write.  With the default limits the connection is
    answered 429 and closed 4029; with limits raised every request is answered (256
    subscriptions, then 429).  Either way the server serves on, in bounded memory."""
    burst = b"".join(_masked(orjson.dumps({"id": i, "type": "subscribe",
                                            "channel": f"burst:{i}"})) for i in range(10_000))
    srv = fastws_server()
    base = rss(srv.proc.pid)
    ws = SyncWS(srv.port)
    ws.sock.sendall(burst)
    answers: dict[str, int] = {}
    try:
        while True:
            r = ws.recv_json()
            answers[r["type"]] = answers.get(r["type"], 0) + 1
    except Closed as closed:
        assert closed.args[0] == 4029
    except ConnectionResetError:   # closed with our unread burst in its buffer: RST
        pass
    ws.close()
    # 200 messages pass, 200 more are refused with 429, then 4029 (a token or two may
    # refill meanwhile); the subscribes' own replies were due after the close
    assert answers.get("error", 0) <= 205 and answers.get("subscribed", 0) <= 205, answers
    values = scrape(srv.http_url)
    assert values['fastws_connections_closed_total{code="4029"}'] == 1
    assert 200 <= values['fastws_rate_limited_total{limit="messages"}'] <= 210
    alive(srv)

    srv2 = fastws_server(config="[limits]\nmessages_per_connection = 100000\n")
    conns = [SyncWS(srv2.port) for _ in range(4)]
    for ws in conns:
        ws.sock.sendall(burst)
    for ws in conns:
        answers = {}
        for _ in range(10_000):
            r = ws.recv_json()
            key = r["type"] if r["type"] != "error" else f"error {r['code']}"
            answers[key] = answers.get(key, 0) + 1
        assert answers == {"subscribed": 256, "error 429": 10_000 - 256}, answers
    values = scrape(srv2.http_url)
    assert values["fastws_subscriptions"] == 4 * 256 and values["fastws_channels"] == 256
    assert rss(srv2.proc.pid) - base < 64 * 2**20
    for ws in conns:
        ws.close()
    for _ in range(100):
        values = scrape(srv2.http_url)
        if values["fastws_subscriptions"] == 0:
            break
        time.sleep(0.05)
    assert values["fastws_subscriptions"] == 0 and values["fastws_channels"] == 0
    alive(srv2)


def _masked(payload: bytes) -> bytes:
    n = len(payload)
    head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81,
                                                                            0x80 | 126, n)
    return head + b"\0\0\0\0" + payload                         # a zero mask is a mask


async def test_slow_reader_next_to_100_fast_ones(fastws_server) -> None:
    """A reader that never reads is cut off at send_buffer (4008) while 100 fast readers
    of the same feed get every event in order with unchanged latency, and the server's
    RSS stays bounded.  (The stalled reader also takes a bulk channel, so that it fills
    the kernel's socket buffers quickly without flooding the fast readers' process.)"""
    srv = fastws_server(config="[server]\ndrain_timeout = 0.5\n"
                               "[limits]\nsend_buffer = 262144\n"
                               "messages_per_connection = 100000\n"
                               "[namespaces.feed]\npublish = \"anyone\"\nhistory_size = 0\n"
                               "[namespaces.bulk]\nhistory_size = 0\n")
    fast = [await connect(srv.ws_url) for _ in range(100)]
    for c in fast:
        await c.request({"id": 1, "type": "subscribe", "channel": "feed:x"})
    publisher = await connect(srv.ws_url)

    async def run(n: int) -> list[float]:
        """Publish n small events, paced; return every fast reader's latencies."""
        lat: list[float] = []

        async def reader(c) -> None:
            for i in range(n):
                ev = await c.recv()
                assert ev["data"]["i"] == i
                lat.append(time.time() - ev["data"]["t"])

        readers = [asyncio.create_task(reader(c)) for c in fast]
        for i in range(n):
            publisher.send({"type": "publish", "channel": "feed:x",
                            "data": {"i": i, "t": time.time()}})
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*readers), 60)
        return sorted(lat)

    baseline = await run(200)
    rss_before = rss(srv.proc.pid)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect: small window
    slow.connect(("127.0.0.1", srv.port))
    slow.sendall(HANDSHAKE)
    await asyncio.to_thread(slow.recv, 4096)
    slow.sendall(_masked(b'{"id":1,"type":"subscribe","channel":"feed:x"}'))
    slow.sendall(_masked(b'{"id":2,"type":"subscribe","channel":"bulk:x"}'))
    for _ in range(100):       # it never reads: watch its subscriptions arrive instead
        if scrape(srv.http_url)["fastws_subscriptions"] == 102:
            break
        await asyncio.sleep(0.02)

    def bulk() -> None:
        for i in range(20):    # 20 x 500 KB: far past 4 MiB of kernel buffers + send_buffer
            srv.publish("bulk:x", {"i": i, "blob": "b" * 500_000})

    with_slow, _ = await asyncio.gather(run(400), asyncio.to_thread(bulk))
    for _ in range(100):
        values = scrape(srv.http_url)
        if values.get('fastws_connections_closed_total{code="4008"}') == 1:
            break
        await asyncio.sleep(0.1)
    assert values["fastws_slow_consumer_disconnects_total"] == 1
    assert values["fastws_connections"] == 101
    p99 = lambda xs: xs[int(len(xs) * 0.99)]  # noqa: E731
    assert p99(with_slow) < max(5 * p99(baseline), 0.25), (p99(baseline), p99(with_slow))
    assert rss(srv.proc.pid) - rss_before < 32 * 2**20
    slow.close()
    await asyncio.to_thread(alive, srv)
    print(f"fast readers' p99 latency: {p99(baseline) * 1e3:.1f} ms alone, "
          f"{p99(with_slow) * 1e3:.1f} ms next to the stalled reader")


def test_fuzz_target_seeds() -> None:
    """The atheris target (fuzz/fuzz_protocol.py) runs its seeds without atheris."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_protocol.py"
    spec = importlib.util.spec_from_file_location("fuzz_protocol", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for seed in mod.SEEDS:
        for cut in range(0, len(seed) + 1, 7):
            mod.TestOneInput(seed[:cut])
