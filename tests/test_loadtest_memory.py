"""Per-connection memory: what fastws trims of picows' state, and the memory harness.

``Conn.transport``'s setter drops picows' handshake leftovers (fastws/_fanout.pyx,
``_trim_transport``).  These tests pin that down against the pinned picows: the fields
are gone after ``on_ws_connected`` and everything that still uses picows' own send
path (pong answers, close frames, heartbeat pings) keeps working.  The RSS harness
(``python -m loadtest.memory``) is checked for reporting numbers, never a size: the
box is shared and noisy (docs/benchmarks.md has the measured ones).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop
from fastws._fanout import Conn, Hub
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOT = Path(__file__).resolve().parent.parent


class _Server(Conn):
    """A bare Conn listener: adopts the transport, echoes TEXT, answers PING, closes."""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if payload == b"close":
                transport.send_close(WSCloseCode.GOING_AWAY, b"bye")
            else:
                self.send_text(payload)


class _Client(WSListener):
    def __init__(self) -> None:
        self.frames: asyncio.Queue[tuple[int, bytes, int]] = asyncio.Queue()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        code = int(frame.get_close_code()) if frame.msg_type == WSMsgType.CLOSE else 0
        self.frames.put_nowait((int(frame.msg_type), frame.get_payload_as_bytes(), code))


async def _session() -> None:
    from picows import ws_create_server

    hub: list[Hub] = []
    servers: list[_Server] = []

    def factory(_request: object) -> _Server:
        c = _Server()
        c.hub = hub[0]
        servers.append(c)
        return c

    hub.append(Hub(1 << 20, asyncio.get_running_loop()))
    srv = await ws_create_server(factory, "127.0.0.1", 0, enable_auto_pong=False)
    port = srv.sockets[0].getsockname()[1]
    clients = []
    for _ in range(3):
        tr, cl = await ws_connect(_Client, f"ws://127.0.0.1:{port}/", enable_auto_pong=False)
        clients.append((tr, cl))
    await asyncio.sleep(0.05)
    assert len(servers) == 3
    for s in servers:
        t = s.transport
        assert t is not None
        assert t.request is None and t.response is None   # handshake leftovers dropped
    # our queue path, picows' own send path (pong) and the close path, on every one
    for i, (tr, cl) in enumerate(clients):
        tr.send(WSMsgType.TEXT, b"hello %d" % i)
        tr.send(WSMsgType.PING, b"p%d" % i)
        assert await asyncio.wait_for(cl.frames.get(), 2) == (int(WSMsgType.TEXT),
                                                              b"hello %d" % i, 0)
        assert await asyncio.wait_for(cl.frames.get(), 2) == (int(WSMsgType.PONG),
                                                              b"p%d" % i, 0)
    # the hub's heartbeat ping is a pre-built frame written through our queue
    for s in servers:
        hub[0].add_connection(s)
    hub[0].sweep(0.0, 60.0)           # marks idle
    hub[0].sweep(0.0, 60.0)           # pings
    for _, cl in clients:
        kind, payload, _ = await asyncio.wait_for(cl.frames.get(), 2)
        assert (kind, payload) == (int(WSMsgType.PING), b"")
    # a broadcast reaches all three in one frame each
    from fastws._fanout import make_frame

    for s in servers:
        hub[0].subscribe("ch", s)
    assert hub[0].broadcast("ch", make_frame(b'{"x":1}'), 0.0) == 3
    for _, cl in clients:
        assert await asyncio.wait_for(cl.frames.get(), 2) == (int(WSMsgType.TEXT),
                                                              b'{"x":1}', 0)
    for tr, cl in clients:
        tr.send(WSMsgType.TEXT, b"close")
        kind, _, code = await asyncio.wait_for(cl.frames.get(), 2)
        assert (kind, code) == (int(WSMsgType.CLOSE), int(WSCloseCode.GOING_AWAY))
        tr.disconnect()
    srv.close()


def test_transport_trimmed_and_still_working() -> None:
    """After on_ws_connected picows' leftovers are gone; pong, ping, close still go out."""
    uvloop.run(_session())


@pytest.mark.timeout(150)
def test_memory_per_connection_stays_small(tmp_path: Path) -> None:
    """`python -m loadtest.memory` at 2,000 connections: ~4.6 KB each when measured; the
    bound is loose (6 KB) so that only a real regression fails (it was 9.3 KB)."""
    out = tmp_path / "mem.json"
    cmd = [sys.executable, "-m", "loadtest.memory", "--connections", "2000", "--procs", "2",
           "--settle", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    run = r["runs"][0]
    assert run["connected"] == 2000 and run["failed"] == 0, r
    assert 0 < r["median_rss_per_conn_bytes"] <= 6000, r
    assert "per idle subscribed connection" in proc.stdout
