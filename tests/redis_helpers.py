"""Helpers of the Redis tests: polling, redis-cli, raw subscribers, and fastws nodes whose
broker timings are shortened (presence expiry) so that a test of them takes seconds."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from conftest import API_KEY, ROOT, ServerProc, free_port, wait_port
from wsclient import RawClient

__all__ = ["until", "cli", "redis_server_proc", "sub", "events", "start_tuned_server"]


async def until(pred: Callable[[], object], timeout: float = 30.0,
                what: str = "condition") -> None:
    """Poll ``pred`` (run in a thread: it may block, e.g. on HTTP) until it is true."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def cli(port: int, *args: str) -> str:
    """``redis-cli -p PORT ARGS…``: its output, stripped."""
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout.strip()


def redis_server_proc(*args: str) -> subprocess.Popen:
    """A ``redis-server ARGS…`` process (quiet)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
    return subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def sub(c: RawClient, channel: str, rid: int, **extra: object) -> dict:
    """Subscribe ``c`` to ``channel``; returns the ``subscribed`` reply (asserted)."""
    reply = await c.request({"id": rid, "type": "subscribe", "channel": channel, **extra})
    assert reply["type"] == "subscribed", reply
    return reply


async def events(c: RawClient, n: int) -> list[dict]:
    """The next ``n`` event pushes of ``c`` (other pushes are passed over)."""
    out = []
    while len(out) < n:
        m = await c.recv()
        if m.get("type") == "event":
            out.append(m)
    return out


_LAUNCH = """\
import sys
import fastws.broker.redis as broker
for name, value in {constants!r}.items():
    assert hasattr(broker, name), name
    setattr(broker, name, value)
from fastws.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_tuned_server(constants: Mapping[str, float], *args: str,
                       config: str | None = None) -> ServerProc:
    """``fastws serve`` (as conftest.start_server) with constants of
    :mod:`fastws.broker.redis` set first, e.g. ``{"PRESENCE_EXPIRY": 1.0}``: the same
    code with shorter timings (these are constants, not configuration)."""
    port = free_port()
    tmpdir = tempfile.mkdtemp(prefix="fastws-test-")
    code = _LAUNCH.format(constants=dict(constants))
    cmd = [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", API_KEY]
    if config is not None:
        path = Path(tmpdir) / "fastws.toml"
        path.write_text(config)
        cmd += ["--config", str(path)]
    cmd += list(args)
    log = Path(tmpdir) / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    srv = ServerProc(port=port, proc=proc, log=log, tmp=[tmpdir])
    try:
        wait_port(port, proc)
    except Exception:
        srv.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise RuntimeError("server did not start:\n" + srv.output()) from None
    return srv
