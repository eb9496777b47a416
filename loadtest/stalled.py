"""Server memory with stalled readers: ``python -m loadtest.stalled``.

Starts ``python -m fastws serve`` (``--send-buffer`` bytes per connection), subscribes
``--fast`` picows readers and ``--stalled`` raw sockets that never read after their
``subscribed`` reply (a small ``SO_RCVBUF``, so the kernel absorbs little), then
publishes ``--publications`` messages of ``--size`` bytes from a WebSocket publisher
with ``--inflight`` in flight.  It samples the server's VmRSS every 20 ms and reports:
the RSS before, its peak while publishing, the growth per stalled reader (against
``send_buffer``), how many stalled readers got the 4008 close, whether every fast
reader got every publication, and the RSS once the stalled readers are closed.
A stalled reader that starts reading within 2 s of its 4008 CLOSE gets that frame
(behind what was queued for it); later, the server has dropped the socket.

Each stalled reader is closed by the server (4008) when its queue passes
``send_buffer``; until then the server holds up to ``send_buffer`` bytes for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import socket
import struct
import sys
import time
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from loadtest.fanout import SERVER_CONFIG, ServerProcess, free_port, read_rss_kib, wait_ready

__all__ = ["main", "run"]

CHANNEL = "bench:stalled"
HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Fast(WSListener):
    """A reader that keeps up: counts the publications it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0
        self.subscribed: asyncio.Future[None] | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        if self.subscribed is not None and not self.subscribed.done():
            self.subscribed.set_result(None)
            return
        self.received += 1


class Publisher(WSListener):
    """Keeps ``inflight`` publish requests outstanding until ``total`` are accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.sent = self.accepted = 0
        self.total = 0
        self.body = b""
        self.done: asyncio.Future[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send_next(self) -> None:
        self.sent += 1
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, b'{"id":%d,"type":"publish","channel":"%s",'
                            b'"data":"%s"}' % (self.sent, CHANNEL.encode(), self.body))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        self.accepted += 1
        if self.sent < self.total:
            self.send_next()
        elif self.accepted >= self.total and self.done is not None and not self.done.done():
            self.done.set_result(None)


def _stalled(port: int, rcvbuf: int) -> socket.socket:
    """A subscriber that reads its ``subscribed`` reply and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(HANDSHAKE)
    msg = orjson.dumps({"id": 1, "type": "subscribe", "channel": CHANNEL})
    sock.sendall(struct.pack("!BB", 0x81, 0x80 | len(msg)) + b"\0\0\0\0" + msg)
    got = b""
    while b'"subscribed"' not in got:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before subscribed")
        got += chunk
    return sock


def _drain(socks: list[socket.socket],
           timeout: float = 10.0) -> tuple[list[int | None], int]:
    """Read every socket until EOF (or a reset, or ``timeout``): the code of the CLOSE
    frame each one received (None: none, e.g. dropped with a reset), and how many ended
    (EOF or reset) before ``timeout``."""
    bufs = {s: bytearray() for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            try:
                chunk = s.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                bufs[s] += chunk
            else:
                sel.unregister(s)
    ended = len(socks) - len(sel.get_map())
    sel.close()
    return [_close_code(bufs[s]) for s in socks], ended


def _close_code(buf: bytearray) -> int | None:
    i = 0
    while i + 2 <= len(buf):
        op, n = buf[i] & 0x0F, buf[i + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = struct.unpack("!H", buf[i + 2:i + 4])[0], 4
        elif n == 127:
            n, head = struct.unpack("!Q", buf[i + 2:i + 10])[0], 10
        if op == 8 and i + head + 2 <= len(buf):
            return struct.unpack("!H", buf[i + head:i + head + 2])[0]
        i += head + n
    return None


async def _publish(port: int, fast_n: int, total: int, size: int, inflight: int,
                   pid: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/ws"
    fast: list[Fast] = []
    loop = asyncio.get_running_loop()
    for _ in range(fast_n):
        tr, lst = await ws_connect(Fast, url)
        lst.subscribed = loop.create_future()
        tr.send(WSMsgType.TEXT, orjson.dumps({"id": 1, "type": "subscribe",
                                              "channel": CHANNEL}))
        await lst.subscribed
        fast.append(lst)
    ptr, pub = await ws_connect(Publisher, url)
    pub.total, pub.body = total, b"x" * size
    pub.done = loop.create_future()
    peak = read_rss_kib(pid) or 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, read_rss_kib(pid) or 0)
            await asyncio.sleep(0.02)

    sampler = loop.create_task(sample())
    t0 = time.monotonic()
    for _ in range(min(inflight, total)):
        pub.send_next()
    await asyncio.wait_for(pub.done, 120)
    deadline = time.monotonic() + 30
    while any(f.received < total for f in fast) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.3)
    sampler.cancel()
    ptr.disconnect()
    return {"peak_kib": peak, "publish_s": round(elapsed, 2),
            "fast_complete": sum(1 for f in fast if f.received >= total)}


def run(stalled: int = 100, fast: int = 50, publications: int = 3000, size: int = 2048,
        send_buffer: int = 1 << 20, inflight: int = 32, rcvbuf: int = 4096,
        server_args: list[str] | None = None) -> dict[str, Any]:
    """One measurement; returns the figures (RSS in KiB)."""
    port = free_port()
    config = SERVER_CONFIG.replace("[limits]\n", f"[limits]\nsend_buffer = {send_buffer}\n")
    server = ServerProcess(port, None, config, server_args or [])
    try:
        wait_ready("127.0.0.1", port, server.proc, 30)
        socks = [_stalled(port, rcvbuf) for _ in range(stalled)]
        time.sleep(0.5)
        before = read_rss_kib(server.pid) or 0
        pub = uvloop.run(_publish(port, fast, publications, size, inflight, server.pid))
        during = read_rss_kib(server.pid) or 0
        codes, ended = _drain(socks)    # the server closed them: read to EOF (or reset)
        for s in socks:
            s.close()
        time.sleep(1.0)
        after = read_rss_kib(server.pid) or 0
        growth = (pub["peak_kib"] - before) * 1024
        return {
            "stalled": stalled, "fast": fast, "publications": publications, "size": size,
            "send_buffer": send_buffer, "rss_before_kib": before,
            "rss_peak_kib": pub["peak_kib"], "rss_end_kib": during,
            "rss_after_close_kib": after,
            "growth_bytes": growth,
            "growth_per_stalled_bytes": round(growth / stalled) if stalled else None,
            "growth_per_stalled_in_send_buffers": round(growth / stalled / send_buffer, 3)
            if stalled else None,
            "closed_4008": sum(1 for c in codes if c == 4008),
            "ended": ended,
            "close_codes": sorted({c for c in codes if c is not None}),
            "fast_complete": pub["fast_complete"], "publish_s": pub["publish_s"],
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m loadtest.stalled", description=__doc__)
    p.add_argument("--stalled", type=int, default=100)
    p.add_argument("--fast", type=int, default=50)
    p.add_argument("--publications", type=int, default=3000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--send-buffer", type=int, default=1 << 20)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of stalled readers")
    p.add_argument("--server-arg", action="append", default=[])
    a = p.parse_args(argv)
    r = run(a.stalled, a.fast, a.publications, a.size, a.send_buffer, a.inflight, a.rcvbuf,
            a.server_arg)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
