"""Smoke run of the locust scenarios (loadtest/locustfile.py) against a real server.

300 users for 6 s (subscribers, churn and the publisher mixed, as the documented
10k command runs them), in a locust subprocess: locust monkey-patches with gevent at
import, which must not happen inside pytest.  Checks the verdict line and exact
accounting, not speed.  Skipped when locust is not installed in this environment.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (pip install locust)")


@pytest.mark.timeout(90)
def test_locust_scenarios_smoke(server, tmp_path: Path) -> None:
    """Every user connects and subscribes, deliveries arrive, nothing lost: PASS against
    the target -u sets (300)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTWS_LOCUST_TARGET"}
    env["FASTWS_API_KEY"] = server.api_key
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
           "--headless", "--host", f"ws://127.0.0.1:{server.port}", "-u", "300", "-r", "300",
           "-t", "6s", "--csv", str(out), "--only-summary"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=80)
    text = proc.stdout + proc.stderr
    assert "fastws load test: PASS" in text, text[-3000:]
    assert "(target 300, -u)" in text, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(f"{out}_stats.csv"))}
    assert int(rows[("WS", "connect")]["Request Count"]) >= 300
    assert int(rows[("HTTP", "publish")]["Request Count"]) > 0
    recv = sum(int(r["Request Count"]) for (t, n), r in rows.items() if n.startswith("recv "))
    assert recv > 0
    total = next(r for (_, n), r in rows.items() if n == "Aggregated")
    assert int(total["Failure Count"]) == 0


@pytest.mark.timeout(60)
def test_locust_target_variable_overrides_users(server, tmp_path: Path) -> None:
    """FASTWS_LOCUST_TARGET above -u: the peak cannot reach it, FAIL and exit 1."""
    env = {**os.environ, "FASTWS_API_KEY": server.api_key, "FASTWS_LOCUST_TARGET": "100"}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
           "--headless", "--host", f"ws://127.0.0.1:{server.port}", "-u", "20", "-r", "20",
           "-t", "3s", "--csv", str(tmp_path / "t"), "--only-summary"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=50)
    text = proc.stdout + proc.stderr
    assert "fastws load test: FAIL: peak " in text, text[-3000:]
    assert "(target 100, FASTWS_LOCUST_TARGET)" in text, text[-3000:]
    assert proc.returncode == 1, text[-3000:]
