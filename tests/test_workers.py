"""``--workers N``: one port shared with SO_REUSEPORT, a supervisor, metrics summed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import http, scrape
from wsclient import connect

from fastws.workers import merge

pytestmark = pytest.mark.timeout(120)


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


async def until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_merge_sums_counters_and_keeps_min_max():
    snap = [["fastws_publications", "counter", "p",
             [["fastws_publications_total", {}, 2.0]]],
            ["fastws_broker_up", "gauge", "u", [["fastws_broker_up", {}, 1.0]]],
            ["fastws_event_loop_lag_seconds", "gauge", "l",
             [["fastws_event_loop_lag_seconds", {}, 0.5]]],
            ["fastws_connections_closed", "counter", "c",
             [["fastws_connections_closed_total", {"code": "1000"}, 3.0]]]]
    other = [["fastws_publications", "counter", "p",
              [["fastws_publications_total", {}, 5.0]]],
             ["fastws_broker_up", "gauge", "u", [["fastws_broker_up", {}, 0.0]]],
             ["fastws_event_loop_lag_seconds", "gauge", "l",
              [["fastws_event_loop_lag_seconds", {}, 0.1]]],
             ["fastws_connections_closed", "counter", "c",
              [["fastws_connections_closed_total", {"code": "4010"}, 1.0]]]]
    text = merge([{"families": snap, "channels": None},
                  {"families": other, "channels": None}]).decode()
    assert "fastws_publications_total 7.0" in text
    assert "fastws_broker_up 0.0" in text
    assert "fastws_event_loop_lag_seconds 0.5" in text
    assert 'fastws_connections_closed_total{code="1000"} 3.0' in text
    assert 'fastws_connections_closed_total{code="4010"} 1.0' in text
    assert "fastws_workers 2.0" in text


def test_merge_counts_distinct_channels_over_workers():
    def snap(names):
        return {"families": [["fastws_channels", "gauge", "c",
                              [["fastws_channels", {}, float(len(names))]]]],
                "channels": names}

    shards = [["fastws_broker_shards_up", "gauge", "s", [["fastws_broker_shards_up", {}, 2.0]]]]
    two = merge([{"families": shards, "channels": None}] * 2).decode()
    assert "fastws_broker_shards_up 2.0" in two      # the same shards, not 2 + 2
    text = merge([snap(["a", "b", "events:*"]), snap(["b", "events:*", "c"])]).decode()
    assert "fastws_channels 4.0" in text        # a, b, c, events:* (not 3 + 3)
    partial = [snap(["a", "b"]), {"families": snap(["b"])["families"], "channels": None}]
    assert "fastws_channels 3.0" in merge(partial).decode()   # a peer without names: sum


async def test_two_workers_share_the_port_and_sum_metrics(redis_server, fastws_server):
    srv = fastws_server("--workers", "2", "--broker", redis_server.url)
    await until(lambda: len(children(srv.proc.pid)) == 2, what="two workers")
    await until(lambda: scrape(srv.http_url).get("fastws_workers") == 2, what="both answer")
    clients = [await connect(srv.ws_url) for _ in range(12)]
    for i, c in enumerate(clients):
        reply = await c.request({"id": i, "type": "subscribe", "channel": "events:w"})
        assert reply["type"] == "subscribed"
    # whichever worker answers, /metrics is the sum over both
    for _ in range(6):
        m = scrape(srv.http_url)
        assert m["fastws_workers"] == 2
        assert m["fastws_connections"] == 12
        assert m["fastws_subscriptions"] == 12
        assert m["fastws_channels"] == 1     # one channel, however many workers hold it
    res = await asyncio.to_thread(srv.publish, "events:w", {"n": 1})
    for c in clients:
        while (msg := await c.recv())["type"] != "event":
            pass
        assert msg["data"] == {"n": 1} and msg["offset"] == res["offset"]
    assert scrape(srv.http_url)["fastws_deliveries_total"] == 12
    for c in clients:
        c.close()

    # a dead worker is replaced
    before = children(srv.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await until(lambda: len(children(srv.proc.pid) - before) == 1, what="a new worker")
    await until(lambda: scrape(srv.http_url).get("fastws_workers") == 2, what="both answer")
    status, _, _ = http("GET", srv.http_url + "/readyz")
    assert status == 200

    # SIGHUP reaches every worker: each one reloads its config
    srv.proc.send_signal(signal.SIGHUP)
    await until(lambda: srv.output().count("configuration reloaded") == 2,
                what="both workers reloading")

    # SIGTERM reaches every worker; the supervisor exits 0 once they are gone
    workers = children(srv.proc.pid)
    assert srv.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
