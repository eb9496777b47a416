"""Helpers of the Redis tests: polling, redis-cli, raw subscribers, fastws nodes whose
broker timings are shortened (presence expiry) so that a test of them takes seconds,
and Redis Clusters started by the test."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import orjson
import pytest
from conftest import API_KEY, ServerProc, http, start_server, wait_port
from redis.crc import key_slot
from wsclient import RawClient

import fastws
from fastws.broker.redis_scripts import keys_for

__all__ = ["until", "cli", "redis_server_proc", "sub", "events", "uniq", "readyz",
           "api_publish", "stream_top", "ApiPublisher", "listening", "PRESENCE_TUNED",
           "PRESENCE_WINDOW", "presence_of", "start_tuned_server", "Cluster", "start_cluster"]


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


def uniq(prefix: str = "events") -> str:
    """A channel name no other test uses: ``PREFIX:RANDOM``."""
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


def readyz(node: ServerProc) -> int:
    """The status of the node's GET /readyz."""
    return http("GET", node.http_url + "/readyz")[0]


def api_publish(base_url: str, channel: str, data: object) -> tuple[int, bytes]:
    """POST /api/publish with the test API key; (status, body), whatever the status."""
    status, _, body = http("POST", base_url + "/api/publish",
                           {"channel": channel, "data": data},
                           headers={"Authorization": f"Bearer {API_KEY}"})
    return status, body


def stream_top(port: int, channel: str) -> list[str]:
    """[epoch, offset] of ``channel``'s stream as the Redis on ``port`` has it."""
    meta, _, _ = keys_for(channel)
    return cli(port, "hmget", meta, "e", "o").split()


class ApiPublisher:
    """Publishes to one channel through POST /api/publish, across faults: every answer
    must be 200 or 503; remembers the data answered 200 (``ok``, with their ``results``)
    and 503 (``refused``: outcome unknown)."""

    def __init__(self, base_url: str, channel: str) -> None:
        self.base_url, self.channel = base_url, channel
        self.ok: list[object] = []
        self.results: list[dict] = []
        self.refused: list[object] = []

    def publish(self, data: object) -> bool:
        """Publish ``data``; True when it was answered 200."""
        status, body = api_publish(self.base_url, self.channel, data)
        assert status in (200, 503), (status, body)
        if status == 200:
            self.ok.append(data)
            self.results.append(orjson.loads(body))
        else:
            self.refused.append(data)
        return status == 200

    def last_position(self) -> list[str]:
        """[epoch, offset] of the last publication answered 200 (as :func:`stream_top`)."""
        return [self.results[-1]["epoch"], str(self.results[-1]["offset"])]

    def assert_offsets_go_on(self) -> None:
        """One epoch, offsets strictly increasing over every publication answered 200."""
        assert {r["epoch"] for r in self.results} == {self.results[0]["epoch"]}
        offsets = [r["offset"] for r in self.results]
        assert offsets == sorted(set(offsets))


@contextlib.asynccontextmanager
async def listening(ws_url: str, channel: str) -> AsyncIterator[list[fastws.Event]]:
    """A Python client (it reconnects and recovers with ``since`` by itself) subscribed
    to ``channel``; yields the list its events are appended to, in the background."""
    received: list[fastws.Event] = []
    async with fastws.connect(ws_url) as client:
        await client.subscribe(channel)

        async def consume() -> None:
            async for event in client:
                received.append(event)
        consumer = asyncio.create_task(consume())
        try:
            yield received
        finally:
            consumer.cancel()


# presence with short timings (start_tuned_server): refresh and sweep every 0.2 s,
# entries expire 1 s after their node's last refresh, so a dead node's clients leave
# within PRESENCE_WINDOW (1.2 s)
PRESENCE_TUNED = {"PRESENCE_REFRESH": 0.2, "PRESENCE_EXPIRY": 1.0}
PRESENCE_WINDOW = sum(PRESENCE_TUNED.values())


async def presence_of(c: RawClient, channel: str, rid: int) -> set[str]:
    """The client ids a ``presence`` request of ``c`` lists for ``channel``."""
    listed = await c.request({"id": rid, "type": "presence", "channel": channel})
    return {m["client"] for m in listed["clients"]}


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
    return start_server(*args, config=config,
                        launch=("-c", _LAUNCH.format(constants=dict(constants))))


# ---------------------------------------------------------------------- Redis Cluster


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Cluster:
    """cluster-enabled redis-server processes forming one cluster, started by a test."""

    ports: list[int]
    procs: list[subprocess.Popen]
    directory: str
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def cli(self, port: int, *args: str) -> str:
        """``redis-cli -p PORT ARGS…`` on one of its nodes (output not stripped)."""
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                              text=True, timeout=10).stdout

    def _nodes(self) -> list[list[str]]:
        live = next(p for p, proc in zip(self.ports, self.procs, strict=True)
                    if proc.poll() is None)
        return [line.split() for line in self.cli(live, "cluster", "nodes").splitlines()]

    def owner(self, channel: str) -> int:
        """The port of the master owning ``channel``'s slot."""
        slot = key_slot(channel.encode())
        for parts in self._nodes():
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for rng in parts[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no owner for slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """The port of a replica of the master on ``master_port``."""
        nodes = self._nodes()
        ids = {int(p[1].split(":")[1].split("@")[0]): p[0] for p in nodes}
        for p in nodes:
            if "slave" in p[2] and p[3] == ids[master_port]:
                return int(p[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no replica of {master_port}")

    def channels_by_master(self, prefix: str, per_master: int = 1) -> dict[int, list[str]]:
        """``per_master`` channel names ``PREFIX:N`` on each master (port → names)."""
        masters = {int(p[1].split(":")[1].split("@")[0]) for p in self._nodes()
                   if "master" in p[2] and "fail" not in p[2] and len(p) > 8}
        out: dict[int, list[str]] = {m: [] for m in masters}
        i = 0
        while any(len(v) < per_master for v in out.values()):
            name = f"{prefix}:{i}"
            owner = self.owner(name)
            if len(out[owner]) < per_master:
                out[owner].append(name)
            i += 1
        return out

    def holder_of(self, client_name: str) -> int | None:
        """The port of the node on which a connection named ``client_name`` is."""
        for port, proc in zip(self.ports, self.procs, strict=True):
            if proc.poll() is None and f"name={client_name} " in self.cli(port, "client",
                                                                          "list"):
                return port
        return None

    def _spawn(self, port: int) -> subprocess.Popen:
        return redis_server_proc(
            "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "2000",
            "--dir", self.directory, "--save", "", "--appendonly", "no", *self.extra)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``."""
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait(10)

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again (it rejoins from its nodes file)."""
        i = self.ports.index(port)
        self.procs[i] = self._spawn(port)
        wait_port(port, self.procs[i])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_cluster(masters: int = 3, replicas: int = 0, extra: tuple[str, ...] = ()) -> Cluster:
    """Start ``masters`` × (1 + ``replicas``) cluster-enabled redis-servers (``extra``:
    more redis-server arguments) and join them with redis-cli (each master gets
    ``replicas`` replicas)."""
    directory = tempfile.mkdtemp(prefix="fastws-cluster-")
    ports: list[int] = []
    while len(ports) < masters * (1 + replicas):  # the bus listens on port + 10000
        p = random.randint(20000, 29999)
        if p not in ports and _port_free(p) and _port_free(p + 10000):
            ports.append(p)
    cluster = Cluster(ports, [], directory, list(extra))
    try:
        cluster.procs.extend(cluster._spawn(p) for p in ports)
        for p, proc in zip(ports, cluster.procs, strict=True):
            wait_port(p, proc)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas",
                        str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in cluster.cli(p, "cluster", "info") for p in ports):
            assert time.monotonic() < deadline, "cluster did not become ok"
            time.sleep(0.05)
        while replicas and cluster.cli(ports[0], "info", "replication").count(
                "state=online") < replicas and "role:master" in cluster.cli(
                ports[0], "info", "replication"):
            assert time.monotonic() < deadline, "replicas did not sync"
            time.sleep(0.05)
    except BaseException:
        cluster.stop()
        raise
    return cluster
