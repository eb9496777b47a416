"""The floor harness keeps working: ``python -m loadtest.floor`` (a smoke run).

docs/benchmarks.md compares fastws' time to reach every subscriber with this floor (one
``send(2)`` per subscriber from plain C); the numbers come from the full-size command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import fanout, floor

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_floor_smoke(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    r = subprocess.run([sys.executable, "-m", "loadtest.floor", "--connections", "200",
                        "--rounds", "2", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "us per delivery" in r.stdout
    report = json.loads(out.read_text())
    send = report["runs"][0]
    assert send["mode"] == "send" and send["connections"] == 200
    assert send["all_received"] is True and send["short_writes"] == 0
    assert send["us_per_send"] > 0


def test_floor_refuses_more_connections_than_descriptors() -> None:
    with pytest.raises(SystemExit) as e:
        floor.main(["--connections", "100000000"])
    assert e.value.code == 2


def test_process_tree_readings_include_children() -> None:
    """CPU and RSS of a ``--workers N`` server are summed over its worker processes."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        for _ in range(100):   # the child is listed once it exists
            if child.pid in fanout.process_tree(me):
                break
        assert child.pid in fanout.process_tree(me)
        own, tree = fanout.rss_kib_one(me), fanout.read_rss_kib(me)
        assert own is not None and tree is not None and tree > own
    finally:
        child.kill()
        child.wait()
