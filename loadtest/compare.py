"""fastws against the anchors in one run: ``python -m loadtest.compare``.

Runs :mod:`loadtest.fanout` with the same parameters against fastws and each anchor of
:mod:`loadtest.anchors` (nginx+Nchan with one worker, Node ``ws``, python
``websockets``, a bare picows broadcaster), one server at a time, each pinned to
``--server-cpu`` with the subscribers and the publisher on the other CPUs.  With
``--repeat N`` the servers take turns (fastws, nchan, …, fastws, nchan, …) so that a
burst of noise on a shared box hits them alike, and the median run of each is
reported.  Writes a Markdown table to stdout, everything to ``--json``, and a PNG plot
(deliveries/s and p99 latency per server, against subscribers when several
``--subscribers`` are given) to ``--png`` if matplotlib is installed.

``--paths`` runs every server once per publish path of :mod:`loadtest.fanout`
(``--path``): fastws gets its publications through that path, an anchor through its
own publisher (Nchan: ``POST /pub`` pipelined on one connection, or over
``--connections`` connections for ``http-conns``).  Rows are named ``SERVER/PATH``
and each is compared with fastws on the same path, in deliveries per server
CPU-second (server CPU time per delivery, the figure least disturbed by a shared box;
with ``redis`` the server's CPU includes its redis-server's).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

from loadtest import anchors, fanout

__all__ = ["main", "run_one", "summarize"]

SERVERS = ("fastws", *anchors.ANCHORS)


def run_one(server: str, subscribers: int, common: list[str], server_cpu: int | None,
            log: Any, path: str = "client") -> dict[str, Any]:
    """One fanout run against ``server``, publishing through ``path`` (an anchor: its
    own publisher); returns fanout's result dict (or an error)."""
    argv = ["--subscribers", str(subscribers), "--quiet", "--label", f"{server}/{path}",
            "--path", path, *common]
    if server_cpu is not None:
        argv += ["--server-cpu", str(server_cpu)]
    anchor = None
    try:
        if server != "fastws":
            anchor = anchors.start(server, fanout.free_port(), server_cpu)
            argv += ["--url", anchor.sub_url, "--server-pid", str(anchor.pid),
                     "--protocol", "raw", "--pub-url", anchor.pub_url,
                     "--pub-mode", anchor.pub_mode]
        args = fanout.parse_args(argv)
        args._argv = argv
        r = fanout.run(args)
        if anchor is not None:
            r["server_versions"] = anchor.notes
            if anchor.proc.poll() is not None:
                r["server_output"] = anchor.output()
        r["clean"] = (r["lost"] == 0 and r["duplicates"] == 0 and r["out_of_order"] == 0
                      and r["disconnected"] == 0 and r["connect_failed"] == 0
                      and r["publications"] > 0)
        log(f"{server:>10} {path:>10} {subscribers:>6} subs: "
            f"{r['deliveries_per_s']:>10,.0f} deliveries/s"
            f"  p99 {r['latency_ms']['p99']} ms  lost {r['lost']}  "
            f"RSS/conn {r['server_rss_per_conn_bytes']} B  server CPU {r['server_cpu_window']}")
        return r
    except Exception as exc:  # noqa: BLE001 - one failed server must not end the comparison
        log(f"{server}: failed: {exc}")
        out = anchor.output() if anchor is not None else ""
        return {"server": f"{server}/{path}", "error": f"{exc}"[:2000], "server_output": out,
                "params": {"subscribers": subscribers}}
    finally:
        if anchor is not None:
            anchor.stop()


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    ok.sort(key=lambda r: r["deliveries_per_s"])
    return ok[(len(ok) - 1) // 2]


def split_label(label: str) -> tuple[str, str]:
    """``SERVER/PATH`` -> (server, path); a label without a path (files written before
    ``--paths``) is the client-publish path."""
    server, _, path = label.partition("/")
    return server, path or "client"


def summarize(results: dict[str, dict[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per (server/path, subscribers): medians over the repeats."""
    rows = []
    for server, by_n in results.items():
        for n, runs in sorted(by_n.items()):
            ok = [r for r in runs if "error" not in r]
            med = _median_run(runs)
            if med is None:
                rows.append({"server": server, "subscribers": n, "error": runs[0].get("error")})
                continue

            def mid(values: list[float | None]) -> float | None:
                vals = [v for v in values if v is not None]
                return round(statistics.median(vals), 3) if vals else None

            cpu_us = mid([r["server_cpu_window"] / r["deliveries_per_s"] * 1e6
                          if r["server_cpu_window"] and r["deliveries_per_s"] else None
                          for r in ok])
            rows.append({
                "server": server, "name": split_label(server)[0],
                "path": split_label(server)[1], "subscribers": n, "runs": len(ok),
                "deliveries_per_s": mid([r["deliveries_per_s"] for r in ok]),
                "deliveries_per_s_runs": [r["deliveries_per_s"] for r in ok],
                "p50_ms": mid([r["latency_ms"]["p50"] for r in ok]),
                "p99_ms": mid([r["latency_ms"]["p99"] for r in ok]),
                "p99_ms_runs": [r["latency_ms"]["p99"] for r in ok],
                "lost": sum(r["lost"] for r in ok),
                "duplicates": sum(r["duplicates"] for r in ok),
                "disconnected": sum(r["disconnected"] for r in ok),
                "rss_per_conn_bytes": mid([r["server_rss_per_conn_bytes"] for r in ok]),
                "server_cpu": mid([r["server_cpu_window"] for r in ok]),
                # the fairer number on a shared box: server CPU time per delivery
                "cpu_us_per_delivery": cpu_us,
                "deliveries_per_cpu_s": round(1e6 / cpu_us) if cpu_us else None,
                "publisher": med["params"].get("publisher"),
                "reach_all_ms": med.get("reach_all_ms"),
                "client_cpu_s": mid([r["client_cpu_s"] for r in ok]),
                "clean": all(r["clean"] for r in ok),
                "versions": med.get("server_versions", {}),
            })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (medians); ratios against fastws on the same
    path, in deliveries/s and in deliveries per server CPU-second."""
    def base(r: dict[str, Any]) -> dict[str, Any]:
        return next((b for b in rows if b.get("name", split_label(b["server"])[0]) == "fastws"
                     and "error" not in b and b["subscribers"] == r["subscribers"]
                     and b.get("path", "client") == r.get("path", "client")), {})

    out = ["| server/path | subscribers | deliveries/s (median; runs) | fastws ÷ it | "
           "deliveries per server CPU-s | fastws ÷ it | p50 | p99 | lost/dup/dropped | "
           "server CPU (cores) | server CPU per delivery | RSS/conn |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['server']} | {r['subscribers']:,} | failed: "
                       f"{str(r['error'])[:80]} | | | | | | | | | |")
            continue
        b = base(r)
        ratio = (f"{b['deliveries_per_s'] / r['deliveries_per_s']:.2f}×"
                 if b and r["deliveries_per_s"] else "")
        per_cpu = r.get("deliveries_per_cpu_s") or (
            1e6 / r["cpu_us_per_delivery"] if r["cpu_us_per_delivery"] else None)
        b_cpu = b.get("deliveries_per_cpu_s") or (
            1e6 / b["cpu_us_per_delivery"] if b.get("cpu_us_per_delivery") else None)
        cpu_ratio = f"{b_cpu / per_cpu:.2f}×" if b_cpu and per_cpu else ""
        runs = ", ".join(f"{x / 1000:,.0f}k" for x in r["deliveries_per_s_runs"])
        out.append(
            f"| {r['server']} | {r['subscribers']:,} | **{r['deliveries_per_s']:,.0f}** "
            f"({runs}) | {ratio} | {'' if per_cpu is None else f'{per_cpu:,.0f}'} | "
            f"{cpu_ratio} | {r['p50_ms']} ms | {r['p99_ms']} ms | "
            f"{r['lost']}/{r['duplicates']}/{r['disconnected']} | {r['server_cpu']} | "
            f"{r['cpu_us_per_delivery'] or 0:.2f} µs | "
            f"{round(r['rss_per_conn_bytes'] or 0):,} B |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> bool:
    """Deliveries/s and p99 per server (bars, or lines against subscribers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare: matplotlib is not installed; no plot (pip install matplotlib)",
              file=sys.stderr)
        return False
    ok = [r for r in rows if "error" not in r]
    servers = list(dict.fromkeys(r["server"] for r in ok))
    counts = sorted({r["subscribers"] for r in ok})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if len(counts) == 1:
        vals = [next(r for r in ok if r["server"] == s) for s in servers]
        colors = ["#d62728" if split_label(s)[0] == "fastws" else "#7f7f7f" for s in servers]
        ax1.bar(servers, [v["deliveries_per_s"] / 1000 for v in vals], color=colors)
        ax2.bar(servers, [v["p99_ms"] for v in vals], color=colors)
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", rotation=20)
        ax1.set_xlabel(f"{counts[0]:,} subscribers, one channel")
        ax2.set_xlabel(f"{counts[0]:,} subscribers, one channel")
    else:
        for s in servers:
            pts = sorted((r["subscribers"], r) for r in ok if r["server"] == s)
            xs = [p[0] for p in pts]
            ax1.plot(xs, [p[1]["deliveries_per_s"] / 1000 for p in pts], marker="o", label=s)
            ax2.plot(xs, [p[1]["p99_ms"] for p in pts], marker="o", label=s)
        for ax in (ax1, ax2):
            ax.set_xlabel("subscribers (one channel)")
            ax.set_xscale("log")
        ax1.legend()
    ax1.set_ylabel("deliveries/s (thousands, median)")
    ax2.set_ylabel("p99 publish→receive (ms, median)")
    ax2.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit 0 when every run was clean."""
    p = argparse.ArgumentParser(prog="python -m loadtest.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="fastws,nchan",
                   help=f"comma-separated, from {', '.join(SERVERS)}")
    p.add_argument("--paths", default=",".join(fanout.PATHS),
                   help=f"publish paths, comma-separated, from {', '.join(fanout.PATHS)}")
    p.add_argument("--connections", type=int, default=8,
                   help="publishing connections of the http-conns path")
    p.add_argument("--subscribers", default="1000", help="one count or several: 1000,5000")
    p.add_argument("--repeat", type=int, default=3, help="runs per server (median)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0, help="paced publications/s (0: closed "
                   "loop, --inflight outstanding)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client", default="compiled", choices=("compiled", "python", "auto"))
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--png", metavar="FILE")
    p.add_argument("--from-json", metavar="FILE",
                   help="only redraw the table (and --png) from an earlier --json")
    args = p.parse_args(argv)
    if args.from_json:
        saved = orjson.loads(Path(args.from_json).read_bytes())
        runs = {s: {int(n): v for n, v in by_n.items()} for s, by_n in saved["runs"].items()}
        rows = summarize(runs)
        print(f"{saved['command']}\n{saved['date']}, {saved['machine']['cpus']} CPUs "
              f"({saved['machine']['cpu_model']})\n")
        print(markdown(rows))
        if args.png:
            plot(rows, args.png, f"fan-out, ~100 B payloads; {saved['machine']['cpus']} CPUs, "
                 f"server on one core; {saved['date']}")
        return 0
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if bad:
        p.error(f"unknown server(s): {', '.join(bad)}")
    missing = {k: v for k, v in anchors.available().items() if v and k in servers}
    for name, why in missing.items():
        print(f"compare: skipping {name}: {why}", file=sys.stderr)
    servers = [s for s in servers if s not in missing]
    counts = [int(x) for x in args.subscribers.split(",")]
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if any(x not in fanout.PATHS for x in paths):
        p.error(f"unknown path in {args.paths!r}")
    common = ["--duration", str(args.duration), "--warmup", str(args.warmup),
              "--inflight", str(args.inflight), "--client", args.client,
              "--connections", str(args.connections)]
    if args.rate:
        common += ["--rate", str(args.rate)]

    def log(msg: str) -> None:
        print(f"[compare] {msg}", file=sys.stderr, flush=True)

    results: dict[str, dict[int, list[dict[str, Any]]]] = {
        f"{s}/{path}": {} for path in paths for s in servers}
    for n in counts:
        for i in range(args.repeat):
            for path in paths:
                for s in servers:
                    log(f"run {i + 1}/{args.repeat}: {s}/{path}, {n:,} subscribers")
                    results[f"{s}/{path}"].setdefault(n, []).append(
                        run_one(s, n, common, args.server_cpu, log, path))
    rows = summarize(results)
    machine = fanout.machine_info()
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m loadtest.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{cmd}\n{date}, {machine['cpus']} CPUs ({machine['cpu_model']}), "
          f"server pinned to CPU {args.server_cpu}\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(
            {"command": cmd, "date": date, "machine": machine, "rows": rows,
             "runs": results}, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    if args.png:
        mode = f"{args.rate:g} publications/s" if args.rate else \
            f"{args.inflight} publications in flight"
        plot(rows, args.png, f"fan-out, ~100 B payloads, {mode}; {machine['cpus']} CPUs, "
             f"server on one core; {date}")
    clean = all(r.get("clean") for r in rows)
    return 0 if clean else 3


if __name__ == "__main__":
    sys.exit(main())
