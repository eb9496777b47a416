"""Smoke test of the backend-integration benchmarks (loadtest/backend.py): each mode
runs for a second or two against the stack it starts itself (aiohttp backend, fastws,
redis-server).  Asserts the accounting (every connection accepted, every event
acknowledged and appended), never a speed: the box is shared and noisy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "loadtest.backend", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


@pytest.mark.timeout(150)
def test_connect_storm_smoke() -> None:
    res = bench("connect", "--rate", "200", "--seconds", "1")
    for phase in ("jwt", "proxy"):
        assert res[phase]["connections"] == 200 and res[phase]["failed"] == 0, res
        assert res[phase]["p99_ms"] > 0 and res[phase]["server_cpu_ms_per_connection"] > 0
    assert res["backend_calls_ok"] == 200 and res["proxy_mean_ms"] > 0


@pytest.mark.timeout(150)
def test_stream_ingest_smoke() -> None:
    res = bench("ingest", "--connections", "50", "--rate", "10", "--seconds", "1")
    assert res["published"] == 500 and res["errors"] == 0 and res["all_appended"], res
    assert res["xlen"] == 500 and res["p99_ms"] > 0


@pytest.mark.timeout(150)
def test_rpc_overhead_smoke() -> None:
    res = bench("rpc", "--requests", "100")
    assert res["rpc_p50_ms"] > res["ping_p50_ms"] > 0, res
    assert res["backend_own_p50_ms"] > 0 and res["proxy_call_mean_ms"] > 0
