"""Backend-integration benchmarks (docs/benchmarks.md, docs/protocol.md §11-12).

    python -m loadtest.backend connect --rate 1000 --seconds 5
    python -m loadtest.backend ingest --connections 1000 --rate 10 --seconds 10
    python -m loadtest.backend rpc --requests 5000

Each run starts what it needs on this machine: a small aiohttp backend in a process of
its own (uvloop), a ``fastws serve`` subprocess and, for ``ingest``, a private
``redis-server``; the client side runs in this process on uvloop with picows.

* ``connect``: a connect storm.  ``--rate`` new WebSocket connections per second for
  ``--seconds``, first with a JWT (no backend call: the baseline), then with an opaque
  token put to the backend through ``[proxy] connect``.  Reported per phase:
  connections/s achieved, connect latency p50/p99 (upgrade sent → accepted), failures,
  server CPU-seconds per connection, and the backend's requests.
* ``ingest``: ``--connections`` connections each publishing ``--rate`` events/s into a
  ``stream = true`` namespace.  Reported: publish → ``published`` latency p50/p99/max,
  errors, and whether every acknowledged event is in ``fastws:stream:ev`` (XLEN).
* ``rpc``: ``--requests`` sequential ``rpc`` calls and as many ``ping`` s on one
  connection.  Reported: round trip p50/p99 of each, the backend's own time per call
  (measured in its handler), and the overhead: rpc − ping − backend.

Numbers depend on the machine: docs/benchmarks.md says where they were taken.
Diagnostics: ``BENCH_SHOW_LOG=1`` prints the server's log at the end,
``BENCH_GC_LOG=1`` makes the server log every garbage collection over 20 ms,
``BENCH_PROFILE=FILE`` runs the server under cProfile (stats written to FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from picows import WSListener, WSMsgType, WSTransport, ws_connect

JWT_SECRET = "bench-secret-0123456789abcdef0123456789"
TICK = 0.01                     # seconds between two connect-storm scheduler ticks
INGEST_TICK = 0.001             # ... of the ingest clients (10 sends per tick at 10k/s)


# ---------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def ms(x: float) -> float:
    return round(x * 1000, 3)


def jwt(user: str) -> str:
    import jwt as pyjwt

    return pyjwt.encode({"sub": user, "exp": int(time.time()) + 3600}, JWT_SECRET,
                        algorithm="HS256")


# ---------------------------------------------------------------------- the backend


def _backend_main(port: int, ready: Any) -> None:
    from aiohttp import web

    async def connect(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"result": {"user": body["token"] or "anon",
                                             "meta": {"plan": "bench"}}})

    async def rpc(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        body = await request.json()
        data = {"price": 42.5, "symbol": (body.get("data") or {}).get("symbol")}
        data["own"] = time.perf_counter() - t0
        return web.Response(body=orjson.dumps({"result": {"data": data}}),
                            content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/connect", connect)
        app.router.add_post("/rpc", rpc)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


_GC_LOG = """\
import gc, sys, time
from fastws.cli import main
_t = [0.0]
def _cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    elif time.perf_counter() - _t[0] > 0.02:
        took = (time.perf_counter() - _t[0]) * 1000
        sys.stderr.write(f"gc gen {info['generation']}: {took:.0f} ms, "
                         f"{len(gc.get_objects())} objects, collected {info['collected']}\\n")
gc.callbacks.append(_cb)
sys.exit(main(sys.argv[1:]))
"""


class Stack:
    """The backend process, a redis-server (optional) and ``fastws serve``."""

    def __init__(self, config: str, *, redis: bool = False) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fastws-bench-")
        self.backend_port = free_port()
        ready = mp.get_context("spawn").Event()
        self.backend = mp.get_context("spawn").Process(
            target=_backend_main, args=(self.backend_port, ready), daemon=True)
        self.backend.start()
        ready.wait(20)
        self.redis: subprocess.Popen | None = None
        args = []
        if redis:
            rport = free_port()
            exe = shutil.which("redis-server") or "redis-server"
            self.redis = subprocess.Popen(
                [exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(rport)
            self.redis_url = f"redis://127.0.0.1:{rport}/0"
            args += ["--broker", self.redis_url]
        self.port = free_port()
        cfg = Path(self.tmp) / "fastws.toml"
        cfg.write_text(config.format(backend=f"http://127.0.0.1:{self.backend_port}"))
        self.log = open(Path(self.tmp) / "server.log", "wb")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        launch = ["-m", "fastws"]
        if os.environ.get("BENCH_GC_LOG"):    # log every collection over 20 ms (stderr)
            launch = ["-c", _GC_LOG]
        if os.environ.get("BENCH_PROFILE"):   # cProfile the server into this file
            launch = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"], "-m", "fastws"]
        self.server = subprocess.Popen(
            [sys.executable, *launch, "serve", "--host", "127.0.0.1", "--port",
             str(self.port), "--config", str(cfg), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_port(self.port)
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if os.environ.get("BENCH_SHOW_LOG"):
            sys.stderr.write((Path(self.tmp) / "server.log").read_text()[-4000:])
        if os.environ.get("BENCH_PROFILE") and self.server.poll() is None:
            self.server.terminate()     # a clean exit writes the profile
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.wait(10)
        for proc in (self.server, self.redis):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.backend.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------- the clients


class Client(WSListener):
    """One connection: replies by id resolve ``pending``; ``t`` when it was opened."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.pending: dict[int, Any] = {}
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            msg = orjson.loads(frame.get_payload_as_bytes())
            cb = self.pending.pop(msg.get("id"), None)
            if cb is not None:
                cb(msg)
        elif frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True

    def send(self, msg: dict[str, Any]) -> None:
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg["id"]] = fut.set_result
        self.send(msg)
        return await fut


async def open_client(url: str) -> Client:
    _, c = await ws_connect(Client, url)
    return c


async def storm(url: str, tokens: list[str], rate: int) -> dict[str, Any]:
    """Open one connection per token at ``rate`` per second; keep them open."""
    lat: list[float] = []
    failed = 0
    clients: list[Client] = []

    async def one(token: str) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            c = await open_client(f"{url}?token={token}")
        except Exception:
            failed += 1
            return
        lat.append(time.perf_counter() - t0)
        clients.append(c)

    tasks = []
    start = time.perf_counter()
    per_tick = max(1, round(rate * TICK))
    for i in range(0, len(tokens), per_tick):
        due = start + (i / rate)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks += [asyncio.ensure_future(one(t)) for t in tokens[i:i + per_tick]]
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in clients:
        c.transport.disconnect()
    return {"connections": len(lat), "failed": failed, "seconds": round(elapsed, 3),
            "per_second": round(len(lat) / elapsed, 1), "p50_ms": ms(pct(lat, 50)),
            "p99_ms": ms(pct(lat, 99)), "max_ms": ms(max(lat) if lat else 0.0)}


CONNECT_CONFIG = f"""\
[server]
jwt_secret = "{JWT_SECRET}"
drain_timeout = 1
[limits]
connections_per_ip = 1000000
[proxy]
connect = "{{backend}}/connect"
"""


async def run_connect(rate: int, seconds: float) -> dict[str, Any]:
    stack = Stack(CONNECT_CONFIG)
    try:
        n = int(rate * seconds)
        out: dict[str, Any] = {"rate": rate, "seconds": seconds}
        for phase, tokens in (("jwt", [jwt(f"u{i}") for i in range(n)]),
                              ("proxy", [f"opaque-{i}" for i in range(n)])):
            cpu0 = cpu_seconds(stack.server.pid)
            res = await storm(stack.url, tokens, rate)
            await asyncio.sleep(0.5)      # the disconnects
            res["server_cpu_ms_per_connection"] = round(
                (cpu_seconds(stack.server.pid) - cpu0) * 1000 / max(1, res["connections"]), 3)
            out[phase] = res
        text = stack.metrics()
        out["backend_calls_ok"] = _metric(text, 'fastws_proxy_requests_total{kind="connect",'
                                                'result="ok"}')
        out["proxy_mean_ms"] = _mean_ms(text, "connect")
        return out
    finally:
        stack.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def _mean_ms(text: str, kind: str) -> float:
    total = _metric(text, f'fastws_proxy_duration_seconds_sum{{kind="{kind}"}}')
    count = _metric(text, f'fastws_proxy_duration_seconds_count{{kind="{kind}"}}')
    return round(total * 1000 / count, 3) if count else 0.0


INGEST_CONFIG = """\
[server]
drain_timeout = 1
[limits]
connections_per_ip = 1000000
messages_per_connection = 1000000
messages_window = 1
[namespaces.ev]
stream = true
publish = "anyone"
history_size = 0
"""


async def run_ingest(connections: int, rate: float, seconds: float,
                     stream: bool = True) -> dict[str, Any]:
    config = INGEST_CONFIG if stream else INGEST_CONFIG.replace("stream = true",
                                                                "stream = false")
    stack = Stack(config, redis=True)
    try:
        clients = []
        for i in range(0, connections, 100):
            clients += await asyncio.gather(*(open_client(stack.url)
                                              for _ in range(min(100, connections - i))))
        lat: list[float] = []
        sent_at: list[float] = []
        errors = 0
        seq = 0
        total = int(connections * rate * seconds)
        per_tick = connections * rate * INGEST_TICK
        done = asyncio.get_running_loop().create_future()

        def on_reply(t0: float, msg: dict[str, Any]) -> None:
            nonlocal errors
            lat.append(time.perf_counter() - t0)
            sent_at.append(t0)
            if msg.get("type") != "published":
                errors += 1
            if len(lat) == total and not done.done():
                done.set_result(None)

        cpu0 = cpu_seconds(stack.server.pid)
        rcpu0 = cpu_seconds(stack.redis.pid)
        ccpu0 = time.process_time()
        start = time.perf_counter()
        owed = 0.0
        k = 0
        while seq < total:
            owed += per_tick
            while owed >= 1 and seq < total:
                owed -= 1
                c = clients[k % connections]
                k += 1
                seq += 1
                t0 = time.perf_counter()
                c.pending[seq] = lambda m, t0=t0: on_reply(t0, m)
                c.send({"id": seq, "type": "publish", "channel": f"ev:site{k % 50}",
                        "data": {"page": "/p", "seq": seq}})
            await asyncio.sleep(max(0.0, start + (seq / (connections * rate))
                                    - time.perf_counter()))
        await asyncio.wait_for(done, 30)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(stack.server.pid) - cpu0
        loop_lag = _metric(stack.metrics(), "fastws_event_loop_lag_seconds")
        rcpu = cpu_seconds(stack.redis.pid) - rcpu0
        ccpu = time.process_time() - ccpu0
        import redis as redis_sync

        xlen = redis_sync.Redis.from_url(stack.redis_url).xlen("fastws:stream:ev")
        for c in clients:
            c.transport.disconnect()
        by_second: dict[int, list[float]] = {}
        for t0, x in zip(sent_at, lat, strict=True):
            by_second.setdefault(int(t0 - start), []).append(x)
        return {"server_loop_lag_ms": ms(loop_lag),
                "p99_ms_by_second": [ms(pct(v, 99)) for _, v in sorted(by_second.items())],
                "connections": connections, "rate_per_connection": rate, "seconds": seconds,
                "published": len(lat) - errors, "errors": errors, "xlen": xlen,
                "stream": stream,
                "all_appended": xlen == len(lat) - errors if stream else None,
                "publishes_per_second": round(len(lat) / elapsed, 1),
                "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99)),
                "max_ms": ms(max(lat)), "server_cpu_us_per_publish":
                    round(cpu * 1e6 / max(1, len(lat)), 1),
                "cpu_share": {"server": round(cpu / elapsed, 2),
                              "redis": round(rcpu / elapsed, 2),
                              "client": round(ccpu / elapsed, 2)}}
    finally:
        stack.stop()


RPC_CONFIG = """\
[server]
drain_timeout = 1
[limits]
messages_per_connection = 1000000
messages_window = 1
[proxy]
connect = "{backend}/connect"
rpc = "{backend}/rpc"
"""


async def run_rpc(requests: int) -> dict[str, Any]:
    stack = Stack(RPC_CONFIG)
    try:
        c = await open_client(stack.url + "?token=bench")
        ping: list[float] = []
        rpc: list[float] = []
        own: list[float] = []
        for i in range(requests):
            t0 = time.perf_counter()
            await c.request({"id": 2 * i + 1, "type": "ping"})
            ping.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = await c.request({"id": 2 * i + 2, "type": "rpc", "method": "get:price",
                                 "data": {"symbol": "ETH"}})
            rpc.append(time.perf_counter() - t0)
            own.append(r["data"]["own"])
        c.transport.disconnect()
        p50 = pct(rpc, 50) - pct(ping, 50) - pct(own, 50)
        return {"requests": requests, "ping_p50_ms": ms(pct(ping, 50)),
                "rpc_p50_ms": ms(pct(rpc, 50)), "rpc_p99_ms": ms(pct(rpc, 99)),
                "backend_own_p50_ms": ms(pct(own, 50)),
                "overhead_p50_ms": ms(p50),
                "proxy_call_mean_ms": _mean_ms(stack.metrics(), "rpc")}
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.backend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("connect")
    c.add_argument("--rate", type=int, default=1000)
    c.add_argument("--seconds", type=float, default=5.0)
    i = sub.add_parser("ingest")
    i.add_argument("--connections", type=int, default=1000)
    i.add_argument("--rate", type=float, default=10.0)
    i.add_argument("--seconds", type=float, default=10.0)
    i.add_argument("--no-stream", action="store_true",
                   help="the same load into a namespace without stream (a baseline)")
    r = sub.add_parser("rpc")
    r.add_argument("--requests", type=int, default=5000)
    for p in (c, i, r):
        p.add_argument("--out", help="also write the result (JSON) to this file")
    args = ap.parse_args(argv)
    if args.mode == "connect":
        res = uvloop.run(run_connect(args.rate, args.seconds))
    elif args.mode == "ingest":
        res = uvloop.run(run_ingest(args.connections, args.rate, args.seconds,
                                    not args.no_stream))
    else:
        res = uvloop.run(run_rpc(args.requests))
    res = {"mode": args.mode, "cpus": os.cpu_count(), **res}
    text = orjson.dumps(res, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
