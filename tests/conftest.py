"""Shared fixtures: real fastws servers and real redis-server processes on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"


def pytest_asyncio_loop_factories(config, item):  # noqa: ARG001 - hook signature
    """Run every asyncio test on uvloop, the loop the server itself uses."""
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def http(method: str, url: str, body: object | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One HTTP request; returns (status, headers, body) without raising on 4xx/5xx."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def api(base: str, path: str, body: object,
        headers: dict[str, str] | None = {"Authorization": f"Bearer {API_KEY}"}  # noqa: B006
        ) -> tuple[int, dict]:
    """POST ``body`` to the server API at ``base + path`` (the test API key by default);
    returns (status, the JSON answer)."""
    status, _, raw = http("POST", base + path, body, headers=headers)
    return status, json.loads(raw)


def assert_api_guarded(base: str, path: str, body: object) -> None:
    """The API route ``path`` answers 401 without a valid key and 405 to GET."""
    assert api(base, path, body, headers={})[0] == 401
    status, res = api(base, path, body, headers={"Authorization": "Bearer no"})
    assert status == 401 and "API key" in res["error"]
    assert http("GET", base + path)[0] == 405


@dataclass
class ServerProc:
    """A `fastws serve` subprocess bound to 127.0.0.1:port."""

    port: int
    proc: subprocess.Popen
    api_key: str = API_KEY
    log: Path | None = None
    tmp: list[str] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, channel: str, data: object, **extra: object) -> dict:
        """Publish through POST /api/publish; returns the JSON answer (asserts 200)."""
        status, _, body = http(
            "POST", self.http_url + "/api/publish", {"channel": channel, "data": data, **extra},
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        assert status == 200, (status, body)
        return json.loads(body)

    def output(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> int:
        """Stop the server (SIGTERM by default) and return its exit status."""
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*args: str, config: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, api_key: str | None = API_KEY,
                 wait: bool = True, launch: tuple[str, ...] = ("-m", "fastws")) -> ServerProc:
    """Start `python -m fastws serve` with args; config is TOML text written to a temp file;
    ``launch``: what stands for ``-m fastws`` (e.g. ``-c CODE`` ending in fastws.cli.main)."""
    port = port or free_port()
    tmpdir = tempfile.mkdtemp(prefix="fastws-test-")
    cmd = [sys.executable, *launch, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    if config is not None:
        path = Path(tmpdir) / "fastws.toml"
        path.write_text(config)
        cmd += ["--config", str(path)]
    cmd += list(args)
    log = Path(tmpdir) / "server.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    full_env.update(env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    srv = ServerProc(port=port, proc=proc, api_key=api_key or "", log=log, tmp=[tmpdir])
    if wait:
        try:
            wait_port(port, proc)
        except Exception:
            srv.stop()
            output = srv.output()
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise RuntimeError("server did not start:\n" + output) from None
    return srv


@pytest.fixture
def fastws_server() -> Iterator:
    """Factory fixture: `srv = fastws_server(*args, config=toml)`; all are stopped afterwards."""
    started: list[ServerProc] = []

    def factory(*args: str, **kw) -> ServerProc:
        srv = start_server(*args, **kw)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop(timeout=3.0)  # a drain spreads closes over drain_timeout: don't wait for it
        for d in srv.tmp:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(fastws_server) -> ServerProc:
    """One default server (memory broker, api key `test-key`)."""
    return fastws_server()


@dataclass
class RedisProc:
    """A private redis-server on a free port."""

    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_redis(port: int | None = None) -> RedisProc:
    """Start `redis-server` (Debian's package; `make test` installs it) on a free port."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return RedisProc(port, proc)


@pytest.fixture
def redis_server() -> Iterator[RedisProc]:
    """A fresh redis-server for one test."""
    r = start_redis()
    yield r
    r.stop()


@pytest.fixture
def tuned_server() -> Iterator:
    """Factory fixture: ``srv = tuned_server(constants, *args, config=toml)`` starts
    ``fastws serve`` with constants of ``fastws.broker.redis`` shortened (see
    redis_helpers.start_tuned_server); all are stopped afterwards."""
    from redis_helpers import start_tuned_server

    started: list[ServerProc] = []

    def factory(constants: dict[str, float], *args: str, **kw) -> ServerProc:
        srv = start_tuned_server(constants, *args, **kw)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop(timeout=3.0)
        for d in srv.tmp:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def chain() -> Iterator:
    """A DemoChain (eth-tester, no contract yet) served over HTTP JSON-RPC as
    ``chain.rpc``: one per test module, py-evm taking ~1.5 s to start."""
    from fastws.indexer.demo_chain import DemoChain, RpcServer

    c = DemoChain(contracts=0)
    c.rpc = RpcServer(c).start()   # type: ignore[attr-defined]
    yield c
    c.rpc.stop()                   # type: ignore[attr-defined]


@pytest.fixture
def rpc(chain) -> Iterator:
    """``chain.rpc``, the chain's JSON-RPC server, with no fault injected before or
    after the test (``rpc.fault``)."""
    server = chain.rpc
    server.fault = None
    yield server
    server.fault = None


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisProc]:
    """One redis-server shared by a whole session (for read-only comparisons)."""
    r = start_redis()
    yield r
    r.stop()


def scrape(base_url: str) -> dict[str, float]:
    """GET /metrics and return {'name{labels}': value} for every sample."""
    _, _, body = http("GET", base_url + "/metrics")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_status(url: str, status: int, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """GET url until it answers ``status`` (e.g. /readyz 503 once a SIGTERM is handled)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = http("GET", url)
        if answer[0] == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.01)
