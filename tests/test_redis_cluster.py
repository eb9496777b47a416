"""Redis Cluster: a 3-master cluster started by the test, sharded pub/sub, patterns."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import pytest
from conftest import wait_port
from redis.crc import key_slot
from wsclient import RawClient, connect

pytestmark = pytest.mark.timeout(120)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Cluster:
    """redis-server processes forming one cluster (masters only)."""

    ports: list[int]
    procs: list[subprocess.Popen]
    directory: str
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                              text=True, timeout=10).stdout

    def owner(self, channel: str) -> int:
        """The port of the master owning ``channel``'s slot."""
        slot = key_slot(channel.encode())
        for line in self.cli(self.ports[0], "cluster", "nodes").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for rng in parts[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no owner for slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """The port of a replica of the master on ``master_port``."""
        nodes = [line.split() for line in self.cli(self.ports[0], "cluster", "nodes")
                 .splitlines()]
        ids = {int(p[1].split(":")[1].split("@")[0]): p[0] for p in nodes}
        for p in nodes:
            if "slave" in p[2] and p[3] == ids[master_port]:
                return int(p[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no replica of {master_port}")

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


def start_cluster(masters: int = 3, replicas: int = 0) -> Cluster:
    """Start ``masters`` × (1 + ``replicas``) cluster-enabled redis-servers and join them
    with redis-cli (each master gets ``replicas`` replicas)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed")
    directory = tempfile.mkdtemp(prefix="fastws-cluster-")
    ports: list[int] = []
    while len(ports) < masters * (1 + replicas):  # the bus listens on port + 10000
        p = random.randint(20000, 29999)
        if p not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
    procs = [subprocess.Popen(
        [exe, "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{p}.conf", "--cluster-node-timeout", "2000",
         "--dir", directory, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    cluster = Cluster(ports, procs, directory)
    try:
        for p, proc in zip(ports, procs, strict=True):
            wait_port(p, proc)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas",
                        str(replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
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


@pytest.fixture(scope="module")
def redis_cluster():
    c = start_cluster()
    yield c
    c.stop()


async def events(c: RawClient, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        m = await c.recv()
        if m.get("type") == "event":
            out.append(m)
    return out


async def sub(c: RawClient, channel: str, rid: int) -> None:
    reply = await c.request({"id": rid, "type": "subscribe", "channel": channel})
    assert reply["type"] == "subscribed", reply


async def test_cluster_sharded_fanout_patterns_and_raw_publish(redis_cluster, fastws_server):
    n1 = fastws_server("--broker", redis_cluster.url)
    n2 = fastws_server("--broker", redis_cluster.url)
    base = f"events:{uuid.uuid4().hex[:8]}"
    channels = [f"{base}:{i}" for i in range(6)]        # spread over the masters
    assert len({redis_cluster.owner(ch) for ch in channels}) > 1
    exact = await connect(n2.ws_url)
    for i, ch in enumerate(channels):
        await sub(exact, ch, i)
    both = await connect(n2.ws_url)                     # a channel and a pattern
    await sub(both, channels[0], 1)
    await sub(both, base + ":*", 2)
    pattern = await connect(n1.ws_url)                  # only a pattern, other node
    await sub(pattern, base + ":*", 1)

    results = [await asyncio.to_thread(n1.publish, ch, {"ch": i})
               for i, ch in enumerate(channels)]
    assert all(r["offset"] == 1 and r["epoch"] for r in results)
    got = await events(exact, 6)
    assert [(e["channel"], e["data"], e["offset"]) for e in got] == [
        (ch, {"ch": i}, 1) for i, ch in enumerate(channels)]
    got = await events(pattern, 6)
    assert sorted(e["channel"] for e in got) == sorted(channels)
    got = await events(both, 6)
    assert sorted(e["channel"] for e in got) == sorted(channels)   # once each

    # a raw PUBLISH on any master reaches channel and pattern subscribers once
    other = next(p for p in redis_cluster.ports if p != redis_cluster.owner(channels[0]))
    redis_cluster.cli(other, "publish", channels[0], '{"raw":true}')
    for c in (exact, both, pattern):
        e = (await events(c, 1))[0]
        assert (e["channel"], e["data"]) == (channels[0], {"raw": True})
        assert "offset" not in e
    # a marker: nothing else was queued before it
    await asyncio.to_thread(n1.publish, channels[1], "end")
    for c in (exact, both, pattern):
        assert (await events(c, 1))[0]["data"] == "end"

    # the channel is subscribed on its own shard (SSUBSCRIBE), by n2 only
    owner = redis_cluster.owner(channels[0])
    out = redis_cluster.cli(owner, "pubsub", "shardnumsub", channels[0]).split()
    assert out[-1] == "1"
    # history through the other node
    hist = await pattern.request({"id": 9, "type": "history", "channel": channels[1],
                                  "limit": 10})
    assert [p["data"] for p in hist["publications"]] == [{"ch": 1}, "end"]
    for c in (exact, both, pattern):
        c.close()


async def test_cluster_failover_keeps_every_acknowledged_publication(fastws_server):
    """A graceful CLUSTER FAILOVER of the channel's master while a subscriber listens:
    every publication answered 200 reaches it (live, or after its 4010 through since),
    and offsets never repeat."""
    import orjson
    from conftest import http

    import fastws

    cluster = start_cluster(masters=3, replicas=1)
    try:
        node = fastws_server("--broker", cluster.url)
        channel = f"events:{uuid.uuid4().hex[:8]}"
        master = cluster.owner(channel)
        replica = cluster.replica_of(master)
        received: list[int] = []
        ok: list[int] = []
        results: list[dict] = []
        seq = 0

        def publish() -> bool:
            nonlocal seq
            seq += 1
            status, _, body = http("POST", node.http_url + "/api/publish",
                                   {"channel": channel, "data": seq},
                                   headers={"Authorization": "Bearer test-key"})
            assert status in (200, 503), (status, body)
            if status == 200:
                ok.append(seq)
                results.append(orjson.loads(body))
            return status == 200

        async def until(pred, what: str, timeout: float = 30.0) -> None:
            deadline = time.monotonic() + timeout
            while not await asyncio.to_thread(pred):
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.05)

        async with fastws.connect(node.ws_url) as client:
            await client.subscribe(channel)

            async def consume() -> None:
                async for event in client:
                    received.append(event.data)
            consumer = asyncio.create_task(consume())
            for _ in range(3):
                await until(publish, "a publication before the failover")
            assert cluster.cli(replica, "cluster", "failover").strip() == "OK"
            meta = f"fws:{{{channel}}}:{channel}:m"

            def landed_on_new_master() -> bool:
                return publish() and cluster.cli(replica, "hmget", meta, "e", "o").split() \
                    == [results[-1]["epoch"], str(results[-1]["offset"])]
            await until(landed_on_new_master, "a publication on the promoted replica")
            await until(lambda: set(ok) <= set(received), "every acknowledged event")
            consumer.cancel()
        assert received == sorted(set(received))
        assert {r["epoch"] for r in results} == {results[0]["epoch"]}
        offsets = [r["offset"] for r in results]
        assert offsets == sorted(set(offsets))
    finally:
        cluster.stop()
