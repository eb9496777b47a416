"""Smoke test of the SSE fan-out benchmark (loadtest/sse.py): a seconds-long run.

Asserts exact delivery accounting for fastws and that every figure is reported, never a
speed (the box is shared and noisy).  Nchan runs too where nginx and its module are
installed (loadtest/anchors.py says why not otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import anchors

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(240)


def test_sse_benchmark_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.sse", "--subscribers", "100", "--procs", "1",
         "--rate", "20", "--duration", "2", "--memory", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=200, check=True)
    res = json.loads(out.stdout)
    runs = {r["server"]: r for r in res["runs"]}
    fastws = runs["fastws"]
    assert fastws["publications"] > 0
    assert fastws["deliveries"] == fastws["expected"] == fastws["publications"] * 100
    assert fastws["server_cpu_s"] >= 0 and "deliveries_per_cpu_s" in fastws
    if anchors.available().get("nchan") is None:
        assert runs["nchan"]["deliveries"] > 0
        assert "fastws_vs_nchan" in res or runs["nchan"]["server_cpu_s"] == 0
    else:
        assert "nchan" in res
    mem = res["memory"]
    assert mem["sse"]["connections"] == mem["websocket"]["connections"] == 50
    assert isinstance(mem["sse"]["bytes_per_connection"], int)
