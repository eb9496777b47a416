"""Smoke test of the fan-out benchmark harness (loadtest/fanout.py).

Runs ``python -m loadtest.fanout --smoke`` against a fresh fastws server that the
harness starts itself: 1,000 subscribers, a couple of seconds of publishing.  Asserts
exact delivery accounting and that every number is reported, never a speed (the box
is shared and noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.fanout import HIST_BUCKETS, hist_bounds, hist_index, hist_percentile

ROOT = Path(__file__).resolve().parent.parent


def test_histogram_buckets_cover_values_exactly() -> None:
    """Every value falls in the bucket whose bounds contain it; buckets are contiguous."""
    prev_high = -1
    for idx in range(HIST_BUCKETS - 1):
        low, high = hist_bounds(idx)
        assert low == prev_high + 1
        assert high >= low
        prev_high = high
    for us in [*range(0, 5000), 12_345, 999_999, 10**7, 2**30 + 7]:
        low, high = hist_bounds(hist_index(us))
        assert low <= us <= high
        assert high - low <= max(1, us // 16)  # ≤ 6.25 % bucket width
    assert hist_index(-5) == 0
    assert hist_index(1 << 60) == HIST_BUCKETS - 1


def test_histogram_percentiles() -> None:
    """Percentiles come from the bucket holding the rank, capped at the exact max."""
    hist = [0] * HIST_BUCKETS
    for us in range(1, 1001):  # 1..1000 µs, once each
        hist[hist_index(us)] += 1
    p50 = hist_percentile(hist, 0.50, 1000)
    p99 = hist_percentile(hist, 0.99, 1000)
    assert p50 is not None and 500 <= p50 <= 500 * 1.07
    assert p99 is not None and 990 <= p99 <= 1000
    assert hist_percentile(hist, 1.0, 1000) == 1000
    assert hist_percentile([0] * HIST_BUCKETS, 0.5, 0) is None


@pytest.mark.timeout(90)
def test_fanout_smoke_1000_subscribers(tmp_path: Path) -> None:
    """1,000 subscribers on bench:fanout: nothing lost, duplicated or reordered."""
    out = tmp_path / "fanout.json"
    cmd = [sys.executable, "-m", "loadtest.fanout", "--smoke", "--subscribers", "1000",
           "--duration", "2", "--warmup", "0.5", "--rate", "100", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert out.exists(), f"no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    r = json.loads(out.read_text())
    detail = f"\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert r["connected"] == 1000, detail
    assert r["connect_failed"] == 0, detail
    assert r["publications"] > 0, detail
    assert r["publish_rejected"] == 0, detail
    assert not r["publisher_disconnected"], detail
    # exact accounting: every subscriber saw seq 1..N once, in order
    assert r["lost"] == 0, detail
    assert r["duplicates"] == 0, detail
    assert r["out_of_order"] == 0, detail
    assert r["disconnected"] == 0, detail
    assert r["bad_frames"] == 0, detail
    assert r["subscribers_complete"] == 1000, detail
    assert r["deliveries"] == r["expected_deliveries"] == r["publications"] * 1000, detail
    # numbers are reported (values are not asserted: the box is noisy)
    assert r["deliveries_per_s"] > 0, detail
    for key in ("p50", "p99", "max"):
        assert r["latency_ms"][key] is not None and r["latency_ms"][key] >= 0, detail
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"], detail
    assert r["server_rss_per_conn_bytes"] is not None, detail
    assert proc.returncode == 0, detail
    assert "deliveries/s" in proc.stdout and "latency p99" in proc.stdout, detail


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["http", "http-conns", "redis", "client"])
def test_fanout_smoke_on_every_publish_path(tmp_path: Path, path: str) -> None:
    """Each publish path of the benchmark (pipelined and concurrent POST /api/publish,
    raw PUBLISH into a Redis broker, client publish): 200 subscribers, exact accounting,
    server CPU reported (the per-CPU-second figure of docs/benchmarks.md)."""
    out = tmp_path / "fanout.json"
    cmd = [sys.executable, "-m", "loadtest.fanout", "--smoke", "--subscribers", "200",
           "--path", path, "--duration", "1", "--warmup", "0.3", "--quiet",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert out.exists(), f"no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    r = json.loads(out.read_text())
    detail = f"\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, detail
    assert r["params"]["path"] == path, detail
    assert r["connected"] == 200 and r["publications"] > 0, detail
    assert r["publish_rejected"] == 0 and not r["publisher_disconnected"], detail
    assert r["lost"] == r["duplicates"] == r["out_of_order"] == r["disconnected"] == 0, detail
    assert r["deliveries"] == r["publications"] * 200, detail
    assert r["server_cpu_window"] is not None, detail
    if path == "redis":
        assert r["redis_cpu_s_total"] is not None, detail
