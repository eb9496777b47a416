"""Operations on a real `fastws serve` process: SIGHUP reload, SIGTERM drain, logs.

tests/test_server.py checks the drain's ordering (every publication before the
`disconnect` push, close 4001, exit 0); here: what happens around it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path

import orjson
from conftest import ServerProc, http, scrape, wait_status
from wsclient import RawClient, connect


async def sub(c: RawClient, channel: str, id: int = 1) -> dict:
    return await c.request({"id": id, "type": "subscribe", "channel": channel})


def publish(srv: ServerProc, key: str, channel: str, data: object) -> int:
    status, _, _ = http("POST", srv.http_url + "/api/publish",
                        {"channel": channel, "data": data},
                        headers={"Authorization": f"Bearer {key}"})
    return status


async def wait_for_log(srv: ServerProc, text: str, count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while srv.output().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{srv.output()}"
        await asyncio.sleep(0.02)


def _config_path(srv: ServerProc) -> Path:
    return Path(srv.tmp[0]) / "fastws.toml"


# --------------------------------------------------------------------------- SIGHUP


RELOAD_BEFORE = """
[server]
api_keys = ["old-key"]
[limits]
max_subscriptions = 3
"""

RELOAD_AFTER = """
[server]
api_keys = ["new-key"]
[limits]
max_subscriptions = 2
"""


async def test_sighup_applies_keys_and_limits_without_dropping_connections(
        fastws_server) -> None:
    srv = fastws_server(config=RELOAD_BEFORE, api_key=None)
    c = await connect(srv.ws_url)
    assert (await sub(c, "ops:a"))["type"] == "subscribed"
    assert await asyncio.to_thread(publish, srv, "old-key", "ops:a", 1) == 200
    assert (await c.recv())["data"] == 1

    _config_path(srv).write_text(RELOAD_AFTER)
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while await asyncio.to_thread(publish, srv, "new-key", "ops:a", 3) != 200:
        assert time.monotonic() < deadline, srv.output()
        await asyncio.sleep(0.02)

    # the new key works and the old one is refused; the client stayed and receives
    assert (await c.recv())["data"] == 3
    assert await asyncio.to_thread(publish, srv, "old-key", "ops:a", 2) == 401
    # the new limit holds on the connection that was open before the reload
    assert (await sub(c, "ops:b", 2))["type"] == "subscribed"
    over = await sub(c, "ops:c", 3)
    assert over["type"] == "error" and over["code"] == 429, over
    assert await c.request({"id": 4, "type": "ping"}) == {"id": 4, "type": "pong"}
    assert not c.closed.is_set()
    values = scrape(srv.http_url)
    assert values["fastws_connections"] == 1
    assert not [k for k, v in values.items()
                if k.startswith("fastws_connections_closed_total") and v]
    c.close()


async def test_sighup_reload_completes_with_open_connections(fastws_server) -> None:
    srv = fastws_server(config=RELOAD_BEFORE, api_key=None)
    c = await connect(srv.ws_url)
    await sub(c, "ops:a")
    _config_path(srv).write_text(RELOAD_AFTER.replace("[limits]", "[limits]\n"
                                                      "max_message_size = 1024"))
    srv.proc.send_signal(signal.SIGHUP)
    await wait_for_log(srv, "SIGHUP: configuration reloaded", timeout=3)
    assert "Traceback" not in srv.output()
    c.send({"id": 2, "type": "ping", "pad": "x" * 2000})  # over the new limit: 1009
    assert await c.wait_closed() == 1009
    assert srv.proc.poll() is None


async def test_sighup_with_a_bad_file_keeps_the_running_config(fastws_server) -> None:
    srv = fastws_server(config=RELOAD_BEFORE, api_key=None)
    c = await connect(srv.ws_url)
    await sub(c, "ops:a")
    _config_path(srv).write_text("[limits]\nmax_subscriptions = -3\n")
    srv.proc.send_signal(signal.SIGHUP)
    await wait_for_log(srv, "SIGHUP: config not reloaded")
    assert "max_subscriptions" in srv.output()
    assert await asyncio.to_thread(publish, srv, "old-key", "ops:a", 1) == 200
    assert (await c.recv())["data"] == 1
    assert srv.proc.poll() is None and not c.closed.is_set()
    c.close()


# --------------------------------------------------------------------------- SIGTERM


def _stuck_client(port: int, channel: str) -> socket.socket:
    """A WebSocket client that subscribes and then never reads (tiny receive window)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = orjson.dumps({"id": 1, "type": "subscribe", "channel": channel})
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked)
    return s


def _raw_upgrade_status(port: int) -> tuple[str, str]:
    """(status line, Retry-After) of a WebSocket upgrade request on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    lines = head.decode("latin-1").split("\r\n")
    retry = [v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
             if k.lower() == "retry-after"]
    return lines[0], retry[0] if retry else ""


DRAIN = """
[server]
drain_timeout = 3
[limits]
send_buffer = 268435456
[namespaces.big]
history_size = 0
"""


async def test_drain_refuses_new_work_and_exits_0_by_the_deadline(fastws_server) -> None:
    """A client that stops reading cannot hold the process past drain_timeout."""
    srv = fastws_server(config=DRAIN)
    stuck = _stuck_client(srv.port, "big:x")
    reader = await connect(srv.ws_url)
    await sub(reader, "ops:r")
    await asyncio.sleep(0.2)  # the stuck client's subscribe is in
    blob = "x" * (512 * 1024)
    for _ in range(16):  # 8 MiB for a client that reads nothing
        await asyncio.to_thread(srv.publish, "big:x", blob)
    assert scrape(srv.http_url)["fastws_connections"] == 2

    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    status, _, body = await asyncio.to_thread(wait_status, srv.http_url + "/readyz", 503)
    assert status == 503 and json.loads(body) == {"status": "not ready", "reason": "draining"}
    assert (await asyncio.to_thread(http, "GET", srv.http_url + "/healthz"))[0] == 200
    line, retry = await asyncio.to_thread(_raw_upgrade_status, srv.port)
    assert line.startswith("HTTP/1.1 503") and retry, (line, retry)
    values = await asyncio.to_thread(scrape, srv.http_url)  # still scrapeable
    assert values["fastws_connections"] >= 1

    push = await reader.recv()
    assert push["type"] == "disconnect" and push["code"] == 4001
    assert await reader.wait_closed() == 4001
    assert await asyncio.to_thread(srv.proc.wait, 10) == 0
    elapsed = time.monotonic() - t0
    assert 3 - 0.5 <= elapsed <= 3 + 0.5, elapsed  # held by the stuck client until then
    assert "drained" in srv.output()
    stuck.close()


async def test_drain_spreads_disconnects_over_the_window(fastws_server) -> None:
    srv = fastws_server(config="[server]\ndrain_timeout = 2\n")
    clients = [await connect(srv.ws_url) for _ in range(20)]
    srv.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()

    async def disconnect_push(c: RawClient) -> tuple[float, int]:
        push = await c.recv()
        assert push["type"] == "disconnect" and push["code"] == 4001 and push["reconnect"]
        return time.monotonic() - t0, push["after_ms"]

    got = await asyncio.gather(*(disconnect_push(c) for c in clients))
    times = sorted(t for t, _ in got)
    delays = [ms for _, ms in got]
    assert times[-1] - times[0] >= 0.5, times  # batches, not all at once
    assert len({round(t, 2) for t in times}) >= 5, times
    assert times[-1] <= 2.0, times
    assert all(0 <= ms <= 2000 for ms in delays) and len(set(delays)) >= 10, delays
    assert await asyncio.to_thread(srv.proc.wait, 10) == 0


# --------------------------------------------------------------------------- logs


async def test_json_logs_one_line_per_connection_event_none_per_message(
        fastws_server) -> None:
    srv = fastws_server("--log-format", "json", "--log-level", "debug")
    c = await connect(srv.ws_url)
    await sub(c, "ops:log")
    for i in range(50):
        c.send({"id": 100 + i, "type": "ping"})
    for i in range(20):
        await asyncio.to_thread(srv.publish, "ops:log", i)
    for _ in range(70):
        await c.recv()
    c.close()
    await wait_for_log(srv, '"connection closed"')
    assert srv.stop() == 0
    records = [json.loads(line) for line in srv.output().splitlines() if line.strip()]
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r), r
    conn = [r for r in records if r["logger"] == "fastws.conn"]
    assert [r["msg"] for r in conn] == ["connection open", "connection closed"], conn
    assert all(r["level"] == "debug" for r in conn)
    assert conn[0]["client"] == conn[1]["client"] and conn[0]["peer"].startswith("127.0.0.1:")
    assert conn[1]["code"] == 1000
    assert len(records) < 15, records  # nothing per message or per publication


async def test_slow_consumer_is_a_warning(fastws_server) -> None:
    config = "[limits]\nsend_buffer = 65536\n[namespaces.big]\nhistory_size = 0\n"
    srv = fastws_server("--log-format", "json", config=config)
    stuck = _stuck_client(srv.port, "big:y")
    await asyncio.sleep(0.2)
    blob = "y" * (256 * 1024)
    for _ in range(32):
        await asyncio.to_thread(srv.publish, "big:y", blob)
        if srv.output().count("slow consumer"):
            break
    await wait_for_log(srv, "slow consumer")
    records = [json.loads(line) for line in srv.output().splitlines() if line.strip()]
    slow = [r for r in records if "slow consumer" in r["msg"]]
    assert len(slow) == 1 and slow[0]["level"] == "warning" and slow[0]["client"], slow
    stuck.close()


# --------------------------------------------------------------------------- metrics


def test_labelled_counters_list_every_code_from_the_start(server: ServerProc) -> None:
    """protocol.md §8: every close and error code is exported at 0 before it happens (so
    rate() sees its first increment), 4505 (POST /api/disconnect) included."""
    from fastws.codes import CLOSE_CODES, Err

    values = scrape(server.http_url)
    closes = list(CLOSE_CODES)
    errors = [v for k, v in vars(Err).items() if k.isupper() and isinstance(v, int)]
    assert 4505 in closes
    for code in closes:
        assert values[f'fastws_connections_closed_total{{code="{code}"}}'] == 0, code
    for code in errors:
        assert values[f'fastws_errors_total{{code="{code}"}}'] == 0, code
    for limit in ("connections", "messages", "requests", "subscribes", "subscriptions"):
        assert values[f'fastws_rate_limited_total{{limit="{limit}"}}'] == 0, limit
