"""redis+sentinel://: the node finds the master through Sentinel, and again after a failover."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import orjson
import pytest
from conftest import free_port, http, wait_port

import fastws

pytestmark = pytest.mark.timeout(120)


def _redis(*args: str) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("redis-server") or "redis-server", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=10).stdout.strip()


async def until(pred, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def sentinel_setup():
    """A master, its replica and one Sentinel watching them as ``mymaster``."""
    directory = tempfile.mkdtemp(prefix="fastws-sentinel-")
    master, replica, sentinel = free_port(), free_port(), free_port()
    # --dir: a replica's full sync writes an RDB file, which the next start would load
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
    procs = [_redis("--port", str(master), *base),
             _redis("--port", str(replica), *base, "--replicaof", "127.0.0.1", str(master))]
    conf = Path(directory) / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds mymaster 1000\n"
                    "sentinel failover-timeout mymaster 5000\n")
    try:
        for port, proc in zip((master, replica), procs, strict=True):
            wait_port(port, proc)
        procs.append(_redis(str(conf), "--sentinel"))
        wait_port(sentinel, procs[-1])
        deadline = time.monotonic() + 30
        while "master_link_status:up" not in cli(replica, "info", "replication"):
            assert time.monotonic() < deadline, "replica did not sync"
            time.sleep(0.05)
        yield master, replica, sentinel
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


async def test_sentinel_master_and_failover(sentinel_setup, fastws_server):
    master, replica, sentinel = sentinel_setup
    node = fastws_server("--broker", f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0")
    channel = "events:sentinel"
    received: list[tuple[int, str]] = []
    async with fastws.connect(node.ws_url) as client:
        await client.subscribe(channel)

        async def consume() -> None:
            async for event in client:
                received.append((event.data, event.epoch))
        consumer = asyncio.create_task(consume())
        first = await asyncio.to_thread(node.publish, channel, 1)
        assert first["offset"] == 1
        await until(lambda: [d for d, _ in received] == [1], what="first event")

        # Sentinel learns about the replica from the master's INFO: until then it
        # answers NOGOODSLAVE
        await until(lambda: cli(sentinel, "sentinel", "failover", "mymaster") == "OK",
                    what="Sentinel accepting the failover")
        await until(lambda: "role:master" in cli(replica, "info", "replication"),
                    what="the replica promoted")

        ok = [1]                                   # data of publications answered 200
        results = [first]

        def publish(data: int) -> bool:
            status, _, body = http("POST", node.http_url + "/api/publish",
                                   {"channel": channel, "data": data},
                                   headers={"Authorization": "Bearer test-key"})
            assert status in (200, 503), (status, body)
            if status == 200:
                ok.append(data)
                results.append(orjson.loads(body))
            return status == 200

        # publish until one lands on the promoted replica (the demoted master has no
        # replica left to acknowledge, and answers READONLY once it is one itself)
        meta = "fws:{events:sentinel}:events:sentinel:m"
        n = 1

        def publish_next() -> bool:
            nonlocal n
            n += 1                                 # every attempt its own data
            return publish(n)
        while True:
            await until(publish_next, what="a publication after failover")
            if cli(replica, "hmget", meta, "e", "o").split() == [
                    results[-1]["epoch"], str(results[-1]["offset"])]:
                break
        # a replica acknowledged every publication answered 200 (WAIT), so the promoted
        # one has them all: same epoch, offsets go on, the subscriber gets every one
        # (live, or after its 4010 through since-recovery)
        # (a 503 means "outcome unknown": such a publication may still have happened)
        assert {r["epoch"] for r in results} == {first["epoch"]}
        offsets = [r["offset"] for r in results]
        assert offsets == sorted(set(offsets))
        await until(lambda: set(ok) <= {d for d, _ in received}, what="every acknowledged event")
        consumer.cancel()
    data = [d for d, _ in received]
    assert data == sorted(set(data))
    assert http("GET", node.http_url + "/readyz")[0] == 200


async def test_claim_once_waits_for_a_replica(sentinel_setup):
    # a claim (SIWE nonce) answers once the replica has it, so a failover keeps it
    from fastws.broker import BrokerUnavailable, create_broker

    master, replica, _ = sentinel_setup

    class Quiet:
        def handle_publication(self, *args) -> None: ...
        def handle_gap(self) -> None: ...
        def handle_presence(self, *args) -> None: ...

    broker = create_broker(f"redis://127.0.0.1:{master}/0")
    await broker.start(Quiet())
    try:
        assert await broker.claim_once("siwe:a", 60.0)
        assert cli(replica, "GET", "fws:once:siwe:a") == "1"      # already there
        assert not await broker.claim_once("siwe:a", 60.0)
        cli(replica, "REPLICAOF", "NO", "ONE")                   # no replica acknowledges
        with pytest.raises(BrokerUnavailable):
            await broker.claim_once("siwe:b", 60.0)
    finally:
        await broker.close()
