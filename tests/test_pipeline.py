"""Pipelined HTTP requests: started without waiting for the previous answer, answered
in request order; publications read together are flushed together (one write per
subscriber); the pipeline stops at a request that closes, before an upgrade, and at
``MAX_PIPELINE`` unanswered requests."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import pytest
from conftest import API_KEY, http
from redis_helpers import events, sub, uniq
from wsclient import connect

from fastws.http import MAX_PIPELINE, HttpFront

pytestmark = pytest.mark.timeout(60)


def post(channel: str, n: int, *, close: bool = False) -> bytes:
    body = json.dumps({"channel": channel, "data": {"n": n}}).encode()
    return (b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (API_KEY.encode(), len(body), b"Connection: close\r\n" if close else b"", body))


def read_answers(s: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` HTTP answers (status, body) read from ``s`` (Content-Length bodies)."""
    buf, out = b"", []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode()
            length = int(re.search(r"(?im)^content-length: *(\d+)", head).group(1))
            if len(buf) >= end + 4 + length:
                out.append((int(head.split(" ")[1]), buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} answers")
        buf += chunk
    return out


def metric(base: str, name: str) -> float:
    _, _, raw = http("GET", base + "/metrics")
    return float(re.search(rf"(?m)^{name} (\S+)", raw.decode()).group(1))


async def test_pipelined_publications_answer_in_order_and_leave_in_one_write(server) -> None:
    ch = uniq()
    c = await connect(server.ws_url)
    await sub(c, ch, 1)
    writes = metric(server.http_url, "fastws_writes_total")
    n = 24
    reqs = [post(ch, i) for i in range(1, n + 1)]
    reqs.insert(10, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")   # a plain answer between
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"".join(reqs))
        answers = await asyncio.to_thread(read_answers, s, n + 1)
    assert answers[10] == (200, b'{"status":"ok"}\n')
    del answers[10]
    assert [(st, json.loads(b)["offset"]) for st, b in answers] == \
        [(200, i) for i in range(1, n + 1)]
    got = await events(c, n)
    assert [e["data"]["n"] for e in got] == list(range(1, n + 1))
    # 24 publications read in one buffer reach the hub in one loop pass: far fewer
    # writes to the subscriber than publications (one when the read was not split)
    assert metric(server.http_url, "fastws_writes_total") - writes <= 4
    c.close()


async def test_a_closing_request_ends_the_pipeline(server) -> None:
    ch = uniq()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(post(ch, 1) + post(ch, 2, close=True) + post(ch, 3))
        answers = await asyncio.to_thread(read_answers, s, 2)
        assert [json.loads(b)["offset"] for _, b in answers] == [1, 2]
        s.settimeout(5)
        assert s.recv(100) == b""                # closed: the third was never read
    _, _, raw = http("POST", server.http_url + "/api/history",
                     {"channel": ch, "limit": 10},
                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert raw.count(b'"n"') in (0, 2)           # history off (0) or the two (2)


async def test_a_malformed_request_after_pending_ones_is_answered_last(server) -> None:
    ch = uniq()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(post(ch, 1) + post(ch, 2) + b"BROKEN\r\n\r\n")
        answers = await asyncio.to_thread(read_answers, s, 3)
        assert [st for st, _ in answers] == [200, 200, 400]
        assert json.loads(answers[1][1])["offset"] == 2


async def test_an_upgrade_waits_for_the_answers_before_it(server) -> None:
    ch = uniq()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(post(ch, 1) + b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        s.settimeout(10)
        got = b""
        while got.count(b"\r\n\r\n") < 2:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200 ")
        assert b"}\nHTTP/1.1 101 " in got          # after the JSON body


async def test_an_sse_stream_starts_after_the_answers_before_it(server) -> None:
    """A pipelined publish then GET /sse on one connection: the publish is answered
    first, then the connection is handed over to the event stream, which delivers."""
    ch = uniq()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(post(ch, 1) + f"GET /sse?channel={ch} HTTP/1.1\r\nHost: x\r\n"
                  "Accept: text/event-stream\r\n\r\n".encode())
        s.settimeout(10)
        got = b""
        while b'"subscribed"' not in got:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200 ") and b'{"offset"' in got
        first, _, stream = got.partition(b"HTTP/1.1 200 ")[2].partition(b"HTTP/1.1 200 ")
        assert b"text/event-stream" in stream
        await asyncio.to_thread(http, "POST", server.http_url + "/api/publish",
                                {"channel": ch, "data": {"n": 2}},
                                {"Authorization": f"Bearer {API_KEY}"})
        while b'{"n":2}' not in got:
            got += s.recv(4096)


class SlowApp:
    """An HttpApp whose answers are futures the test completes, in any order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.read_view = memoryview(bytearray(65536))
        self.futures: list[asyncio.Future] = []
        self.started = asyncio.Event()

    def ip_limit(self, transport, headers, upgrade) -> float:  # noqa: ANN001
        return 0.0

    def handle_http(self, method, path, headers, body):  # noqa: ANN001
        if path == "/now":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnow"
        fut = self.loop.create_future()
        self.futures.append(fut)
        if len(self.futures) >= MAX_PIPELINE - 1:     # and /now: the pipeline is full
            self.started.set()
        return fut

    def make_ws_protocol(self):  # noqa: ANN201
        raise AssertionError("no upgrade here")


def answer(i: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(i)), i)


async def test_answers_completed_out_of_order_go_out_in_order() -> None:
    loop = asyncio.get_running_loop()
    app = SlowApp(loop)
    srv = await loop.create_server(lambda: HttpFront(app), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    total = MAX_PIPELINE + 6
    reqs = [b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(total)]
    reqs.insert(3, b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(reqs))
        await asyncio.wait_for(app.started.wait(), 10)
        await asyncio.sleep(0.05)
        assert len(app.futures) == MAX_PIPELINE - 1  # with /now: the pipeline holds
        for i, fut in reversed(list(enumerate(app.futures))):   # last one first
            fut.set_result(answer(i))
        while len(app.futures) < total:              # the rest start once answered
            await asyncio.sleep(0.01)
        for i in range(MAX_PIPELINE - 1, total):
            app.futures[i].set_result(answer(i))
        bodies = []
        for _ in range(total + 1):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            bodies.append((await reader.readexactly(length)).decode())
        assert bodies == ["0", "1", "2", "now", *map(str, range(3, total))]
        writer.close()
    finally:
        srv.close()
