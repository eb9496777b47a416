"""The floor of fan-out on this machine: ``python -m loadtest.floor``.

Compiles ``loadtest/floor.c`` (plain C, no Python) into ``loadtest/build/`` and runs
it: N loopback TCP connections, one frame-sized ``send(2)`` to each per round, the
sender pinned to one CPU and a receiver draining with epoll on the others.  The result
is the cost of one delivery when nothing but the kernel does the work: what no server
that writes each subscriber's frame with its own system call can beat on this machine,
and therefore the yardstick for fastws' "time to reach every subscriber".

With liburing's headers present it also runs the same sends queued on an io_uring
(one ``io_uring_enter`` per 4,096 sends): the difference is what batching the system
calls themselves could win.

    python -m loadtest.floor --connections 9000 --rounds 20 --json docs/bench/floor.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["build", "run", "main"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "floor.c"


def build() -> tuple[Path, bool]:
    """Compile floor.c once per source; returns (binary, has_io_uring)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc) found")
    key = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = HERE / "build" / f"floor-{key}"
    out.mkdir(parents=True, exist_ok=True)
    uring, plain = out / "floor-uring", out / "floor"
    if uring.exists():
        return uring, True
    if plain.exists():
        return plain, False
    tmp = out / "floor-uring.tmp"
    r = subprocess.run([cc, "-O2", "-DFLOOR_URING", "-o", str(tmp), str(SOURCE), "-luring"],
                       capture_output=True)
    if r.returncode == 0:
        tmp.rename(uring)
        return uring, True
    tmp = out / "floor.tmp"
    subprocess.run([cc, "-O2", "-o", str(tmp), str(SOURCE)], check=True, capture_output=True)
    tmp.rename(plain)
    return plain, False


def run(binary: Path, connections: int, rounds: int, size: int, sender_cpu: int,
        mode: str) -> dict[str, Any]:
    """One run of the floor program; its JSON result."""
    cpus = sorted(os.sched_getaffinity(0))
    receivers = [c for c in cpus if c != sender_cpu] or cpus
    mask = sum(1 << c for c in receivers)
    r = subprocess.run([str(binary), str(connections), str(rounds), str(size),
                        str(sender_cpu), hex(mask), mode],
                       capture_output=True, text=True, timeout=600)
    try:
        result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (r.stderr or r.stdout or f"exit {r.returncode}").strip()[-300:]}
    return result


def loopback_rps() -> str:
    """CPUs that receive loopback packets (RPS); "0" = the sender's own CPU does it."""
    try:
        return Path("/sys/class/net/lo/queues/rx-0/rps_cpus").read_text().strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m loadtest.floor",
                                description=__doc__.split("\n\n")[0])
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    most = max(10, (soft - 64) // 2)
    p.add_argument("--connections", type=int, default=min(10000, most),
                   help=f"TCP connections (two descriptors each; at most {most} here)")
    p.add_argument("--rounds", type=int, default=20, help="sends to every connection")
    p.add_argument("--size", type=int, default=150, help="bytes per send (~ a fastws event)")
    p.add_argument("--sender-cpu", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if not 1 <= args.connections <= most:
        p.error(f"--connections must be 1..{most} (the open-file limit is {soft})")
    binary, has_uring = build()
    sys.path.insert(0, str(HERE.parent))
    from loadtest.fanout import machine_info

    rows = []
    for mode in ("send", "uring") if has_uring else ("send",):
        res = run(binary, args.connections, args.rounds, args.size, args.sender_cpu, mode)
        rows.append(res)
        if "error" in res:
            print(f"floor {mode}: {res['error']}", file=sys.stderr)
            continue
        print(f"floor {mode:5}: {res['connections']:,} connections x {res['size']} B: "
              f"{res['us_per_send']:.2f} us per delivery ({res['cpu_us_per_send']:.2f} us of "
              f"the sender's CPU), one round {res['round_ms_mean']:.1f} ms"
              f" (best {res['round_ms_best']:.1f}, worst {res['round_ms_worst']:.1f}); "
              f"10,000 deliveries = {res['us_per_send'] * 10:.0f} ms of one core; "
              f"all received: {res['all_received']}")
    report = {"benchmark": "floor", "command": "python -m loadtest.floor " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": machine_info(),
        "loopback_rps_cpus": loopback_rps(), "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if rows and all("error" not in r and r["all_received"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
