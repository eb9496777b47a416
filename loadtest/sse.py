"""SSE fan-out benchmark: N EventSource subscribers of one channel, fastws vs nginx+Nchan.

``python -m loadtest.sse`` starts a fastws server (``GET /sse``, SPEC §10) and, when
available, nginx+Nchan (``nchan_subscriber eventsource``, loadtest/anchors.py), opens
``--subscribers`` SSE streams to each (spread over ``--procs`` client processes that
count the ``data:`` lines they read), then publishes ``--rate`` publications per
second for ``--duration`` seconds over one keep-alive HTTP connection: ``POST
/api/publish`` for fastws, ``POST /pub`` for Nchan, one request per publication
(``--batch B``: B publications per write, a JSON array for fastws, B pipelined requests
for Nchan).  Reported per server: deliveries counted by the clients during the window,
the server's CPU seconds over the same window, deliveries per server CPU-second, and
the ratio fastws / Nchan (same run, same load).

``--memory`` also measures the server's RSS per idle subscriber: N SSE streams, then N
WebSocket connections each subscribed to one channel, on fresh fastws servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import orjson
import uvloop

from loadtest import anchors
from loadtest.fanout import ServerProcess, free_port, read_cpu_s, read_rss_kib, wait_ready

__all__ = ["main", "run"]

CHANNEL = "bench:sse"
API_KEY = "bench-key"
SERVER_CONFIG = """\
# written by loadtest.sse
[server]
drain_timeout = 1
[limits]
max_connections = 0
[namespaces.bench]
history_size = 100
"""
MARK = b"\ndata: "


class Counter(asyncio.Protocol):
    """One SSE stream: counts ``data:`` lines (a mark split over two reads counts once)."""

    def __init__(self, totals: list[int], request: bytes) -> None:
        self.totals = totals
        self.request = request
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.tail + data
        self.totals[0] += buf.count(MARK)
        self.tail = buf[-(len(MARK) - 1):]


async def _client(conn: Connection, port: int, path: str, n: int) -> None:
    loop = asyncio.get_running_loop()
    totals = [0]
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    for _ in range(n):
        await loop.create_connection(lambda: Counter(totals, request), "127.0.0.1", port)
    conn.send(("ready", totals[0]))
    while True:
        ready = asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        await ready.wait()
        loop.remove_reader(conn.fileno())
        cmd = conn.recv()
        if cmd == "stop":
            return
        conn.send(("count", totals[0]))


def _client_entry(conn: Connection, port: int, path: str, n: int) -> None:
    uvloop.run(_client(conn, port, path, n))


class Clients:
    """``--procs`` processes holding the SSE streams."""

    def __init__(self, port: int, path: str, total: int, procs: int) -> None:
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        ctx = mp.get_context("fork")
        for i in range(procs):
            n = total // procs + (1 if i < total % procs else 0)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_entry, args=(child, port, path, n), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)
        for pipe in self.pipes:
            if not pipe.poll(120):
                raise TimeoutError("SSE clients did not connect in 120 s")
            pipe.recv()

    def count(self) -> int:
        for pipe in self.pipes:
            pipe.send("count")
        return sum(pipe.recv()[1] for pipe in self.pipes)

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


async def _publish(port: int, path: str, headers: str, rate: float, duration: float,
                   batch: int, fastws: bool) -> int:
    """Publish ``rate`` publications/s for ``duration`` s; returns how many."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def drain_answers() -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    task = asyncio.ensure_future(drain_answers())
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    seq = 0
    while loop.time() - start < duration:
        chunks = []
        if fastws and batch > 1:
            items = []
            for _ in range(batch):
                seq += 1
                items.append({"channel": CHANNEL, "data": {"seq": seq}})
            chunks.append(orjson.dumps(items))
        else:
            for _ in range(batch):
                seq += 1
                chunks.append(orjson.dumps({"channel": CHANNEL, "data": {"seq": seq}} if fastws
                                           else {"seq": seq}))
        out = b"".join(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                       % (path.encode(), headers.encode(), len(c), c) for c in chunks)
        writer.write(out)
        sent += batch
        due = start + sent / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
    await asyncio.sleep(0.5)        # the last answers arrive
    task.cancel()
    writer.close()
    return sent


def measure(name: str, pid: int, port: int, sse_path: str, pub_path: str, headers: str,
            args: argparse.Namespace) -> dict[str, Any]:
    """One server: connect the subscribers, publish, count deliveries and CPU."""
    clients = Clients(port, sse_path, args.subscribers, args.procs)
    try:
        time.sleep(1.0)                 # every stream subscribed
        before, cpu0 = clients.count(), read_cpu_s(pid)
        pubs = uvloop.run(_publish(port, pub_path, headers, args.rate, args.duration,
                                   args.batch, name == "fastws"))
        after, deadline = clients.count(), time.monotonic() + 15
        while after - before < pubs * args.subscribers and time.monotonic() < deadline:
            time.sleep(0.5)             # the clients catch up (the box has 2 cores)
            now = clients.count()
            if now == after:
                break
            after = now
        cpu1 = read_cpu_s(pid)
    finally:
        clients.stop()
    deliveries = after - before
    cpu = (cpu1 or 0.0) - (cpu0 or 0.0)
    return {"server": name, "publications": pubs, "deliveries": deliveries,
            "expected": pubs * args.subscribers, "server_cpu_s": round(cpu, 3),
            "deliveries_per_cpu_s": round(deliveries / cpu) if cpu > 0 else None,
            "us_per_delivery": round(cpu * 1e6 / deliveries, 3) if deliveries else None}


def _fastws(port: int) -> ServerProcess:
    srv = ServerProcess(port, None, SERVER_CONFIG, ["--api-key", API_KEY])
    wait_ready("127.0.0.1", port, srv.proc, 30)
    return srv


def _ws_idle(port: int, n: int) -> list[socket.socket]:
    """n WebSocket connections, each subscribed to its own channel (raw sockets)."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                  b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        payload = orjson.dumps({"id": 1, "type": "subscribe", "channel": f"{CHANNEL}{i}"})
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
        socks.append(s)
    for s in socks:
        s.recv(4096)                    # the subscribed reply
    return socks


def _sse_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /sse?channel={CHANNEL}{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    for s in socks:
        got = b""
        while b"subscribed" not in got:
            got += s.recv(4096)
    return socks


def memory(n: int) -> dict[str, Any]:
    """Server RSS per idle subscriber: SSE streams vs WebSocket connections."""
    out: dict[str, Any] = {}
    for kind, opener in (("sse", _sse_idle), ("websocket", _ws_idle)):
        port = free_port()
        srv = _fastws(port)
        try:
            time.sleep(0.5)
            before = read_rss_kib(srv.pid) or 0
            socks = opener(port, n)
            time.sleep(0.5)
            after = read_rss_kib(srv.pid) or 0
            out[kind] = {"connections": n, "rss_kib_before": before, "rss_kib_after": after,
                         "bytes_per_connection": round((after - before) * 1024 / n)}
            for s in socks:
                s.close()
        finally:
            srv.stop()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (fastws, then Nchan when it is installed)."""
    results: dict[str, Any] = {"subscribers": args.subscribers, "rate": args.rate,
                               "batch": args.batch, "duration": args.duration, "runs": []}
    port = free_port()
    srv = _fastws(port)
    try:
        results["runs"].append(measure("fastws", srv.pid, port, f"/sse?channel={CHANNEL}",
                                       "/api/publish", f"Authorization: Bearer {API_KEY}\r\n",
                                       args))
    finally:
        srv.stop()
    why = anchors.available().get("nchan")
    if why is None and not args.no_nchan:
        port = free_port()
        nchan = anchors.start("nchan", port)
        try:
            results["runs"].append(measure("nchan", nchan.pid, port, "/sse", "/pub", "", args))
        finally:
            nchan.stop()
    else:
        results["nchan"] = why or "skipped (--no-nchan)"
    rates = {r["server"]: r["deliveries_per_cpu_s"] for r in results["runs"]}
    if rates.get("fastws") and rates.get("nchan"):
        results["fastws_vs_nchan"] = round(rates["fastws"] / rates["nchan"], 2)
    if args.memory:
        results["memory"] = memory(args.memory)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.sse",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--rate", type=float, default=100.0, help="publications per second")
    p.add_argument("--batch", type=int, default=1, help="publications per write")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    p.add_argument("--memory", type=int, default=0, metavar="N",
                   help="also measure RSS per idle SSE / WebSocket subscriber with N each")
    p.add_argument("--no-nchan", action="store_true", help="fastws only")
    args = p.parse_args(argv)
    res = run(args)
    sys.stdout.write(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
