"""Publications/s through one Redis, at the broker level (no WebSocket, no HTTP).

    python -m loadtest.broker_bench --redis redis://127.0.0.1:6379/0 [--count 50000]
                                  [--inflight 256] [--history 0,100] [--redis-pid PID]
                                  [--rate R]

One :class:`RedisBroker` subscribes to a channel and publishes ``--count`` 80-byte
publications to it with ``--inflight`` of them awaiting Redis at once, then waits until
every one came back through pub/sub.  It prints publications/s, the time until all
were delivered back, the accepted→delivered latency (p50/p99) and, with
``--redis-pid``, the CPU redis-server spent per publication.  With ``--rate R`` one
publisher paces R publications/s instead (open loop): the latency is then the Redis hop
itself (script, pub/sub, parsing), not queueing.  The latency end to end
through a node (WebSocket publish → Redis → subscribers) is measured by
``python -m loadtest.fanout --server-arg=--broker --server-arg=redis://…``
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import orjson
import uvloop

from fastws.broker.redis import RedisBroker

__all__ = ["main"]


class _Counter:
    def __init__(self, want: int) -> None:
        self.want = want
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def handle_publication(self, channel: str, data: bytes, offset: int, epoch: str,
                           accepted: float) -> None:
        self.latencies.append(time.monotonic() - accepted)
        if len(self.latencies) >= self.want:
            self.done.set()

    def handle_gap(self) -> None:
        raise RuntimeError("the Redis connection dropped during the benchmark")


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run(url: str, count: int, inflight: int, history: int, pid: int | None,
               rate: float = 0.0) -> str:
    counter = _Counter(count)
    broker = RedisBroker(url)
    await broker.start(counter)
    if not broker.up:
        raise SystemExit(f"cannot connect to {url}")
    channel = f"bench:broker:{os.getpid()}:{history}"
    await broker.subscribe(channel)
    data = orjson.dumps({"seq": 0, "pad": "x" * 60})
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await broker.publish(channel, data, history_size=history, history_ttl=300)

    async def paced() -> None:
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            asyncio.ensure_future(broker.publish(channel, data, history_size=history,
                                                 history_ttl=300))

    cpu0, t0 = _cpu(pid), time.perf_counter()
    if rate:
        inflight = 0
        await paced()
    else:
        await asyncio.gather(*(worker() for _ in range(inflight)))
    t1 = time.perf_counter()
    await asyncio.wait_for(counter.done.wait(), 120)
    t2, cpu1 = time.perf_counter(), _cpu(pid)
    await broker.close()
    lat = sorted(counter.latencies)
    line = (f"history_size={history:<4} inflight={inflight:<4} {count / (t1 - t0):>9,.0f} "
            f"publications/s, all delivered back after {t2 - t0:.2f} s, accepted->delivered "
            f"p50 {1000 * lat[len(lat) // 2]:.2f} ms p99 {1000 * lat[int(len(lat) * 0.99)]:.2f} ms")
    if pid is not None:
        line += f", redis-server CPU {1e6 * (cpu1 - cpu0) / count:.1f} us/publication"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.broker_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--redis", required=True, help="redis://host:port/db")
    p.add_argument("--count", type=int, default=50000)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--history", default="0,100", help="history sizes to run, comma-separated")
    p.add_argument("--redis-pid", type=int, default=None, help="for redis-server CPU use")
    p.add_argument("--rate", type=float, default=0.0,
                   help="paced publications/s (open loop) instead of --inflight")
    args = p.parse_args(argv)
    for size in (int(x) for x in args.history.split(",")):
        print(uvloop.run(_run(args.redis, args.count, args.inflight, size, args.redis_pid,
                              args.rate)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
