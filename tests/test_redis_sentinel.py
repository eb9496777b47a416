"""redis+sentinel://: the node finds the master through Sentinel, and again after a failover."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_port
from redis_helpers import (
    ApiPublisher,
    cli,
    listening,
    readyz,
    redis_server_proc,
    stream_top,
    until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sentinel_setup():
    """A master, its replica and one Sentinel watching them as ``mymaster``."""
    directory = tempfile.mkdtemp(prefix="fastws-sentinel-")
    master, replica, sentinel = free_port(), free_port(), free_port()
    # --dir: a replica's full sync writes an RDB file, which the next start would load
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
    procs = [redis_server_proc("--port", str(master), *base),
             redis_server_proc("--port", str(replica), *base,
                               "--replicaof", "127.0.0.1", str(master))]
    conf = Path(directory) / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                    "sentinel down-after-milliseconds mymaster 1000\n"
                    "sentinel failover-timeout mymaster 5000\n")
    try:
        for port, proc in zip((master, replica), procs, strict=True):
            wait_port(port, proc)
        procs.append(redis_server_proc(str(conf), "--sentinel"))
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
    pub = ApiPublisher(node.http_url, channel)
    async with listening(node.ws_url, channel) as received:
        assert pub.publish(1)
        assert pub.results[0]["offset"] == 1
        await until(lambda: [e.data for e in received] == [1], what="first event")

        # Sentinel learns about the replica from the master's INFO: until then it
        # answers NOGOODSLAVE
        await until(lambda: cli(sentinel, "sentinel", "failover", "mymaster") == "OK",
                    what="Sentinel accepting the failover")
        await until(lambda: "role:master" in cli(replica, "info", "replication"),
                    what="the replica promoted")

        # publish until one lands on the promoted replica (the demoted master has no
        # replica left to acknowledge, and answers READONLY once it is one itself);
        # every attempt its own data
        seq = itertools.count(2)
        while True:
            await until(lambda: pub.publish(next(seq)), what="a publication after failover")
            if stream_top(replica, channel) == pub.last_position():
                break
        # a replica acknowledged every publication answered 200 (WAIT), so the promoted
        # one has them all: same epoch, offsets go on, the subscriber gets every one
        # (live, or after its 4010 through since-recovery)
        # (a 503 means "outcome unknown": such a publication may still have happened)
        pub.assert_offsets_go_on()
        await until(lambda: set(pub.ok) <= {e.data for e in received},
                    what="every acknowledged event")
        data = [e.data for e in received]
    assert data == sorted(set(data))
    assert readyz(node) == 200


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
