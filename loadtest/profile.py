"""Where the server's time goes under fan-out load: ``python -m loadtest.profile``.

Starts a fastws server (as :mod:`loadtest.fanout` does), runs a fan-out benchmark
against it and records the server with ``py-spy record --native`` during the measuring
window (Python, Cython and C frames).  Prints the share of samples per leaf function
("self" time) and per selected frame ("inclusive": everything under it), and the
server CPU time per delivery.  The collapsed stacks go to ``--raw FILE`` (feed them to
any flame-graph tool) and an SVG flame graph to ``--svg FILE``.

    python -m loadtest.profile --subscribers 1000 --rate 400 --duration 10
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest import fanout

__all__ = ["main", "summarize_collapsed"]

# frames whose inclusive share is reported (substring of the frame name)
FRAMES = ("broadcast", "flush", "_write_out", "_fast_write", "send", "handle_publication",
          "make_frame", "event_payload", "on_ws_frame", "on_message", "_publish",
          "publish", "match", "_append", "epoll_wait", "buffer_updated", "_run_once",
          "sweep")


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's collapsed (raw) output."""
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_count[frames[-1]] += count
        names = {f.split(" (")[0] for f in frames}
        for key in FRAMES:
            if any(key == name or name.endswith("." + key) or name.endswith(key)
                   for name in names):
                incl[key] += count
    return {
        "samples": total,
        "self": [(f, round(100 * c / total, 1)) for f, c in self_count.most_common(top)]
        if total else [],
        "inclusive": sorted(((k, round(100 * c / total, 1)) for k, c in incl.items()),
                            key=lambda kv: -kv[1]) if total else [],
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: profile the server under fan-out load."""
    p = argparse.ArgumentParser(prog="python -m loadtest.profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=200, help="py-spy samples/s")
    p.add_argument("--raw", metavar="FILE", help="write the collapsed stacks here")
    p.add_argument("--svg", metavar="FILE", help="write a flame graph here")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 1
    port = fanout.free_port()
    server = fanout.ServerProcess(port, args.server_cpu, fanout.SERVER_CONFIG, [])
    tmp = Path(tempfile.mkdtemp(prefix="fastws-profile-"))
    raw = Path(args.raw) if args.raw else tmp / "stacks.txt"
    try:
        fanout.wait_ready("127.0.0.1", port, server.proc, 30)
        bench = ["--url", f"ws://127.0.0.1:{port}/ws", "--server-pid", str(server.pid),
                 "--subscribers", str(args.subscribers), "--inflight", str(args.inflight),
                 "--duration", str(args.duration), "--warmup", str(args.warmup),
                 "--server-cpu", str(args.server_cpu), "--quiet"]
        if args.rate:
            bench += ["--rate", str(args.rate)]
        fargs = fanout.parse_args(bench)
        fargs._argv = bench
        spy: list[subprocess.Popen] = []

        def start_spy() -> None:
            cmd = [pyspy, "record", "--pid", str(server.pid), "--native", "--rate",
                   str(args.sample_rate), "--duration", str(int(args.duration)),
                   "--format", "raw", "-o", str(raw)]
            spy.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE))

        # the harness connects everyone first: record from the end of the warm-up
        import threading

        orig_run_publisher = fanout.run_publisher

        async def run_publisher(*a: Any, **kw: Any) -> dict[str, Any]:
            threading.Timer(0.2 + args.warmup, start_spy).start()
            return await orig_run_publisher(*a, **kw)

        fanout.run_publisher = run_publisher   # type: ignore[assignment]
        r = fanout.run(fargs)
        fanout.run_publisher = orig_run_publisher   # type: ignore[assignment]
        if spy:
            spy[0].wait(args.duration + 30)
        if not spy or not raw.exists():
            err = spy[0].stderr.read().decode() if spy and spy[0].stderr else ""
            print(f"profile: py-spy recorded nothing {err[-500:]}", file=sys.stderr)
            return 1
        summary = summarize_collapsed(raw.read_text())
        if args.svg:
            _flamegraph(raw, Path(args.svg))
        cpu = r["server_cpu_window"]
        per = (cpu / r["deliveries_per_s"] * 1e6) if cpu and r["deliveries_per_s"] else None
        print(f"{r['deliveries_per_s']:,.0f} deliveries/s, server CPU {cpu} cores "
              f"→ {per:.2f} µs of server CPU per delivery" if per else "")
        print(f"py-spy: {summary['samples']} samples over {args.duration:g} s")
        print("inclusive (frame and everything under it):")
        for name, pct in summary["inclusive"]:
            print(f"  {pct:5.1f} %  {name}")
        print("self (leaf frames):")
        for name, pct in summary["self"]:
            print(f"  {pct:5.1f} %  {name}")
        if args.json:
            import orjson

            Path(args.json).write_bytes(orjson.dumps(
                {"bench": r, "profile": summary, "cpu_us_per_delivery": per},
                option=orjson.OPT_INDENT_2))
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _flamegraph(raw: Path, svg: Path) -> None:
    """A minimal SVG icicle chart from collapsed stacks (no external tool needed)."""
    tree: dict[str, Any] = {"n": 0, "c": {}}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        node = tree
        node["n"] += int(n)
        for f in stack.split(";"):
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += int(n)
    width, row = 1600.0, 16
    rects: list[str] = []
    depth_max = [0]

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        for name, child in sorted(node["c"].items(), key=lambda kv: -kv[1]["n"]):
            w = width * child["n"] / tree["n"]
            if w >= 0.5:
                depth_max[0] = max(depth_max[0], depth)
                label = name.replace("&", "&amp;").replace("<", "&lt;")
                short = label[: int(w / 7)]
                rects.append(f'<g><title>{label} ({child["n"]})</title><rect x="{x:.1f}" '
                             f'y="{depth * row}" width="{w:.1f}" height="{row - 1}" '
                             f'fill="hsl({(hash(name) % 40) + 10},80%,60%)"/><text x="'
                             f'{x + 2:.1f}" y="{depth * row + 12}" font-size="11">{short}'
                             "</text></g>")
                walk(child, x, depth + 1)
            x += w

    walk(tree, 0.0, 0)
    svg.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
                   f'height="{(depth_max[0] + 2) * row}" font-family="monospace">'
                   + "".join(rects) + "</svg>")


if __name__ == "__main__":
    sys.exit(main())
