"""Server memory per idle subscribed connection: ``python -m loadtest.memory``.

Two modes:

* default: starts ``python -m fastws serve`` (as :mod:`loadtest.fanout` does), reads its
  VmRSS, opens ``--connections`` WebSocket connections over ``--procs`` client processes
  (each subscribes to ``bench:fanout`` and waits for ``subscribed``), waits ``--settle``
  seconds, reads VmRSS again and reports (after − before) / connections.  With
  ``--url``/``--server-pid`` it measures any running server instead (an anchor).
* ``--breakdown``: runs the fastws server *inside this process* with ``tracemalloc``
  and prints where the bytes of one connection go (allocation sites, per connection),
  plus the sizes of the Python objects one connection keeps alive.  tracemalloc sees
  ``PyMem_*``/``PyObject_*`` allocations (picows' buffers, uvloop's libuv handles)
  but not plain ``malloc``; RSS also carries allocator overhead and fragmentation.

The client processes are :func:`loadtest.fanout.worker_entry` (picows + uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from loadtest import fanout

__all__ = ["measure_rss", "breakdown", "main"]


def _start_workers(ctx: Any, url: str, n: int, procs: int, batch: int,
                   cpus: list[int] | None, timeout: float,
                   compress: bool = False) -> list[tuple[Any, Any]]:
    share, extra = divmod(n, procs)
    use_source_ips = n > fanout.PORTS_PER_SOURCE_IP
    workers = []
    for k in range(procs):
        parent_end, child_end = ctx.Pipe()
        cfg = {"url": url, "n": share + (1 if k < extra else 0),
               "batch": max(4, batch // procs), "connect_timeout": timeout, "cpus": cpus,
               "source_ip": f"127.0.0.{2 + k}" if use_source_ips else None,
               "client": "python", "compress": compress}
        proc = ctx.Process(target=fanout.worker_entry, args=(child_end, cfg), daemon=True)
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
    return workers


def measure_rss(n: int, procs: int, *, url: str | None = None, server_pid: int | None = None,
                server_cpu: int | None = None, settle: float = 2.0, batch: int = 64,
                timeout: float = 30.0, server_args: list[str] | None = None,
                log: Any = None, compress: bool = False) -> dict[str, Any]:
    """Open ``n`` subscribed connections; return the server's RSS before/after and per conn.

    ``compress``: the clients negotiate permessage-deflate and send their subscribe
    request compressed (so the server inflated one message on each)."""
    server = None
    if url is None:
        port = fanout.free_port()
        server = fanout.ServerProcess(port, server_cpu, fanout.SERVER_CONFIG, server_args or [])
        try:
            fanout.wait_ready("127.0.0.1", port, server.proc, 30)
        except Exception as exc:
            out = server.output()
            server.stop()
            raise RuntimeError(f"server did not start ({exc}):\n{out}") from None
        url, server_pid = f"ws://127.0.0.1:{port}/ws", server.pid
    assert server_pid is not None, "--server-pid is needed with --url"
    cpus = sorted(os.sched_getaffinity(0))
    if server_cpu is not None:
        cpus = [c for c in cpus if c != server_cpu] or cpus
    ctx = mp.get_context("fork")
    workers: list[tuple[Any, Any]] = []
    try:
        time.sleep(0.5)
        before = fanout.read_rss_kib(server_pid)
        t0 = time.monotonic()
        workers = _start_workers(ctx, url, n, procs, batch, cpus, timeout, compress)
        connected, failed, errors = fanout.collect_ready(workers, timeout * 4 + 120)
        connect_s = time.monotonic() - t0
        if log:
            log(f"{connected} connected+subscribed ({failed} failed) in {connect_s:.1f} s")
        time.sleep(settle)
        after = fanout.read_rss_kib(server_pid)
        per = None
        if before is not None and after is not None and connected:
            per = round((after - before) * 1024 / connected)
        return {"connections": n, "procs": procs, "connected": connected, "failed": failed,
                "errors": errors[:3], "connect_s": round(connect_s, 2), "compress": compress,
                "rss_before_kib": before, "rss_after_kib": after, "rss_per_conn_bytes": per}
    finally:
        fanout.stop_workers(workers)
        if server is not None:
            server.stop()


# ------------------------------------------------------------------------- breakdown


def _sizes_of_one(conn: Any) -> list[tuple[str, int]]:
    """``sys.getsizeof`` of the objects one fastws connection keeps alive."""
    out: list[tuple[str, int]] = []
    tr = conn.transport
    uv = tr.underlying_transport if tr is not None else None
    proto = uv.get_protocol() if uv is not None else None
    items: list[tuple[str, Any]] = [
        ("Connection (our listener: Conn cdef fields + __slots__)", conn),
        ("MessageAssembler", getattr(conn, "assembler", None)),
        ("client_id str", getattr(conn, "client_id", None)),
        ("subs set", getattr(conn, "subs", None)),
        ("picows WSTransport", tr),
        ("picows WSProtocol", proto),
        ("uvloop TCPTransport", uv),
    ]
    if tr is not None:
        items += [("WSTransport.request (WSUpgradeRequest)", tr.request),
                  ("WSTransport.response (WSUpgradeResponse)", tr.response)]
        for name in ("headers",):
            with contextlib.suppress(Exception):
                items.append((f"request.{name}", getattr(tr.request, name)))
            with contextlib.suppress(Exception):
                items.append((f"response.{name}", getattr(tr.response, name)))
    for label, obj in items:
        if obj is not None:
            out.append((label, sys.getsizeof(obj)))
    return out


async def _breakdown_main(n: int, procs: int, batch: int, frames: int, top: int,
                          extra_flags: dict[str, Any]) -> dict[str, Any]:
    from fastws.config import load_config
    from fastws.server import Server

    tmp = Path(tempfile.mkdtemp(prefix="fastws-mem-"))
    cfg_file = tmp / "fastws.toml"
    cfg_file.write_text(fanout.SERVER_CONFIG)
    port = fanout.free_port()
    config = load_config({"host": "127.0.0.1", "port": str(port), "config": str(cfg_file),
                          "log_level": "warning", **extra_flags}, env={})
    server = Server(config)
    await server.startup()
    url = f"ws://127.0.0.1:{port}/ws"
    ctx = mp.get_context("spawn")   # this process runs a loop: do not fork it
    gc.collect()
    tracemalloc.start(frames)
    snap0 = tracemalloc.take_snapshot()
    rss0 = fanout.rss_kib_one(os.getpid())
    workers = _start_workers(ctx, url, n, procs, batch, None, 60.0)
    connected = 0
    try:
        for _, conn in workers:
            ready = await fanout._recv(conn)
            connected += ready["ready"]
        await asyncio.sleep(1.0)
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
        rss1 = fanout.rss_kib_one(os.getpid())
        conns = server.node.hub.connections()
        sizes = _sizes_of_one(conns[0]) if conns else []
        stats = snap1.compare_to(snap0, "traceback" if frames > 1 else "lineno")
        total = sum(s.size_diff for s in stats)
        rows = []
        for s in stats[:top]:
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                for f in list(s.traceback)[:frames])
            rows.append({"bytes_per_conn": round(s.size_diff / max(1, connected), 1),
                         "blocks_per_conn": round(s.count_diff / max(1, connected), 2),
                         "where": where})
        return {"connections": connected, "traced_bytes_per_conn":
                round(total / max(1, connected), 1),
                "rss_per_conn_bytes_under_tracemalloc":
                round((rss1 - rss0) * 1024 / max(1, connected)) if rss0 and rss1 else None,
                "sites": rows, "object_sizes": sizes}
    finally:
        tracemalloc.stop()
        fanout.stop_workers(workers)
        server.node.draining = True
        await server.shutdown()


def breakdown(n: int, procs: int, batch: int = 64, frames: int = 1, top: int = 25,
              extra_flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the server in-process under tracemalloc; return per-connection allocation sites."""
    import uvloop

    return uvloop.run(_breakdown_main(n, procs, batch, frames, top, extra_flags or {}))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m loadtest.memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle before reading RSS")
    p.add_argument("--server-cpu", type=int, default=None)
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--url", help="measure a running server (ws://…); needs --server-pid")
    p.add_argument("--server-pid", type=int)
    p.add_argument("--repeat", type=int, default=1, help="runs; the median is reported")
    p.add_argument("--breakdown", action="store_true",
                   help="in-process server under tracemalloc: where the bytes go")
    p.add_argument("--frames", type=int, default=1, help="traceback depth for --breakdown")
    p.add_argument("--compression", action="store_true",
                   help="clients negotiate permessage-deflate and subscribe compressed")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[memory] {msg}", file=sys.stderr, flush=True)

    import orjson

    if args.breakdown:
        r = breakdown(args.connections, args.procs, frames=args.frames)
        print(f"{r['connections']} connections: {r['traced_bytes_per_conn']} B/conn traced "
              f"by tracemalloc, {r['rss_per_conn_bytes_under_tracemalloc']} B/conn RSS "
              "(RSS includes tracemalloc's own bookkeeping)")
        for row in r["sites"]:
            print(f"  {row['bytes_per_conn']:>8.1f} B  {row['blocks_per_conn']:>6.2f} blocks  "
                  f"{row['where']}")
        print("object sizes (sys.getsizeof) of one connection:")
        for label, size in r["object_sizes"]:
            print(f"  {size:>6} B  {label}")
    else:
        runs = []
        for i in range(args.repeat):
            r = measure_rss(args.connections, args.procs, url=args.url,
                            server_pid=args.server_pid, server_cpu=args.server_cpu,
                            settle=args.settle, server_args=args.server_arg, log=log,
                            compress=args.compression)
            log(f"run {i + 1}: {r['rss_per_conn_bytes']} B/conn "
                f"({r['rss_before_kib']} → {r['rss_after_kib']} KiB)")
            runs.append(r)
        per = sorted(x["rss_per_conn_bytes"] or 0 for x in runs)
        r = {"runs": runs, "median_rss_per_conn_bytes": per[len(per) // 2],
             "command": "python -m loadtest.memory " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
             "machine": fanout.machine_info()}
        print(f"server RSS per idle subscribed connection at {args.connections:,}: "
              f"median {r['median_rss_per_conn_bytes']:,} B over {len(runs)} run(s) "
              f"({', '.join(f'{x:,}' for x in per)})")
        if any(x["failed"] for x in runs):
            print("connect failures: " + "; ".join(str(x["errors"]) for x in runs))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(r, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
