"""One contract, every broker: the same tests run against memory://, redis:// and a
3-master redis+cluster://.

A broker publishes with offsets and epochs per channel, keeps exact-size history with
a TTL, honours idempotency keys, answers history pages with ``recovered`` semantics, and
hands each publication to its handler once per node, in per-channel order, however
many of the node's subscriptions match it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from fastws.broker import Broker, Publication, StreamAppend, create_broker
from fastws.broker.cluster import RedisClusterBroker
from fastws.broker.memory import MemoryBroker
from fastws.broker.redis import RedisBroker

pytestmark = pytest.mark.timeout(60)


class Collector:
    """A BrokerHandler that records publications and lets tests await them."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, int, str]] = []
        self.metas: list[tuple[str, bytes, int, bytes]] = []  # (channel, data, log offset, meta)
        self._changed = asyncio.Event()
        self.gaps = 0

    def handle_publication(self, channel: str, data: bytes, offset: int, epoch: str,
                           accepted: float, log_offset: int = 0, log_epoch: str = "",
                           meta: bytes = b"") -> None:
        assert accepted <= time.monotonic() + 1e-3
        self.got.append((channel, data, offset, epoch))
        self.metas.append((channel, data, log_offset, meta))
        self._changed.set()

    def handle_gap(self) -> None:
        self.gaps += 1

    async def wait_for(self, pred, timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not pred():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(loop(), timeout)

    async def wait_count(self, n: int, channel: str | None = None) -> list:
        def items() -> list:
            return [g for g in self.got if channel is None or g[0] == channel]
        await self.wait_for(lambda: len(items()) >= n)
        return items()


@pytest.fixture(scope="module")
def contract_cluster() -> Iterator[str]:
    """A 3-master Redis Cluster for the cluster run of the contract (started once)."""
    from redis_helpers import start_cluster

    cluster = start_cluster()
    yield cluster.url
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def broker(request, shared_redis) -> AsyncIterator[tuple[Broker, Collector]]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "redis":
        url = shared_redis.url
    else:
        url = request.getfixturevalue("contract_cluster")
    b = create_broker(url)
    h = Collector()
    await b.start(h)
    assert b.up
    yield b, h
    await b.close()


def uniq(prefix: str = "t") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


async def pub(b: Broker, ch: str, data: object, size: int = 10, ttl: float = 60.0,
              key: str | None = None):
    return await b.publish(ch, orjson.dumps(data), history_size=size, history_ttl=ttl,
                           idempotency_key=key)


async def test_offsets_epochs_and_delivery(broker):
    b, h = broker
    ch = uniq()
    await b.subscribe(ch)
    results = [await pub(b, ch, i) for i in range(3)]
    assert [r.offset for r in results] == [1, 2, 3]
    assert len({r.epoch for r in results}) == 1 and results[0].epoch
    got = await h.wait_count(3, ch)
    assert [(g[1], g[2], g[3]) for g in got] == [
        (orjson.dumps(i), i + 1, results[0].epoch) for i in range(3)]


async def test_no_history_means_offset_zero(broker):
    b, h = broker
    ch = uniq()
    await b.subscribe(ch)
    r = await pub(b, ch, {"a": 1}, size=0)
    assert (r.offset, r.epoch) == (0, "")
    got = await h.wait_count(1, ch)
    assert got[0][1:] == (b'{"a":1}', 0, "")
    hist = await b.history(ch, limit=10)
    assert hist.publications == [] and hist.offset == 0


async def test_channels_have_independent_streams(broker):
    b, _ = broker
    a, c = uniq(), uniq()
    ra = [await pub(b, a, i) for i in range(2)]
    rc = await pub(b, c, 0)
    assert [r.offset for r in ra] == [1, 2] and rc.offset == 1
    assert ra[0].epoch != rc.epoch


async def test_idempotency_key(broker):
    b, h = broker
    ch = uniq()
    await b.subscribe(ch)
    first = await pub(b, ch, "x", key="k1")
    again = await pub(b, ch, "y", key="k1")
    other = await pub(b, ch, "z", key="k2")
    assert again == first and other.offset == first.offset + 1
    await h.wait_count(2, ch)
    await pub(b, ch, "end")
    got = await h.wait_count(3, ch)
    assert [g[1] for g in got] == [b'"x"', b'"z"', b'"end"']
    # the key is per channel
    elsewhere = await pub(b, uniq(), "x", key="k1")
    assert elsewhere.offset == 1 and elsewhere.epoch != first.epoch


async def test_history_pages_and_recovery(broker):
    b, _ = broker
    ch = uniq()
    rs = [await pub(b, ch, i, size=5) for i in range(8)]
    epoch = rs[0].epoch
    hist = await b.history(ch, limit=100)
    assert [o for o, _ in hist.publications] == [4, 5, 6, 7, 8]
    assert [d for _, d in hist.publications] == [orjson.dumps(i) for i in range(3, 8)]
    assert (hist.offset, hist.epoch, hist.recovered) == (8, epoch, True)
    newest = await b.history(ch, limit=2)
    assert [o for o, _ in newest.publications] == [7, 8]
    assert (await b.history(ch, limit=0)).publications == []
    page = await b.history(ch, limit=2, since_offset=3, since_epoch=epoch)
    assert [o for o, _ in page.publications] == [4, 5] and page.recovered
    page = await b.history(ch, limit=2, since_offset=5, since_epoch=epoch)
    assert [o for o, _ in page.publications] == [6, 7] and page.recovered
    top = await b.history(ch, limit=10, since_offset=8, since_epoch=epoch)
    assert top.publications == [] and top.recovered and top.offset == 8
    gone = await b.history(ch, limit=10, since_offset=2, since_epoch=epoch)
    assert not gone.recovered
    other = await b.history(ch, limit=10, since_offset=6, since_epoch="another")
    assert not other.recovered and other.publications == []
    ahead = await b.history(ch, limit=10, since_offset=99, since_epoch=epoch)
    assert not ahead.recovered
    no_epoch = await b.history(ch, limit=10, since_offset=7, since_epoch="")
    assert no_epoch.recovered and [o for o, _ in no_epoch.publications] == [8]


async def test_history_of_unknown_channel(broker):
    b, _ = broker
    ch = uniq()
    empty = await b.history(ch, limit=10)
    assert (empty.publications, empty.offset, empty.epoch, empty.recovered) == ([], 0, "", True)
    assert (await b.history(ch, limit=10, since_offset=0, since_epoch="")).recovered
    assert not (await b.history(ch, limit=10, since_offset=3, since_epoch="e")).recovered


async def test_history_ttl_gives_a_new_epoch(broker):
    b, _ = broker
    ch = uniq()
    first = await pub(b, ch, 1, ttl=0.3)
    deadline = time.monotonic() + 10
    while (await b.history(ch, limit=10)).offset != 0:
        assert time.monotonic() < deadline, "history did not expire"
        await asyncio.sleep(0.05)
    lost = await b.history(ch, limit=10, since_offset=1, since_epoch=first.epoch)
    assert not lost.recovered
    again = await pub(b, ch, 2, ttl=60)
    assert again.offset == 1 and again.epoch != first.epoch


async def test_once_per_node_with_overlapping_subscriptions(broker):
    b, h = broker
    base = uniq("ov")
    ch = base + ":x"
    for name in (ch, base + ":*", "*:x", base + ":?"):
        await b.subscribe(name)
    for i in range(5):
        await pub(b, ch, i)
    marker = base + ":end"
    await pub(b, marker, "end")
    await h.wait_count(1, marker)
    got = [g for g in h.got if g[0] == ch]
    assert [g[2] for g in got] == [1, 2, 3, 4, 5]


async def test_identical_payloads_are_distinct_publications(broker):
    b, h = broker
    base = uniq("same")
    ch = base + ":x"
    await b.subscribe(ch)
    await b.subscribe(base + ":*")
    for _ in range(3):
        await pub(b, ch, "same", size=0)
    await pub(b, base + ":end", "end", size=0)
    await h.wait_count(1, base + ":end")
    assert [g[1] for g in h.got if g[0] == ch] == [b'"same"'] * 3


async def test_order_per_channel_under_concurrency(broker):
    b, h = broker
    ch = uniq()
    await b.subscribe(ch)
    # 200 publications in flight at once keep the order they were issued in
    results = await asyncio.gather(*(pub(b, ch, i, size=100) for i in range(200)))
    assert [r.offset for r in results] == list(range(1, 201))
    got = await h.wait_count(200, ch)
    assert [(g[1], g[2]) for g in got] == [(orjson.dumps(i), i + 1) for i in range(200)]


async def test_claim_once(broker):
    b, _ = broker
    key, other = uniq("once"), uniq("once")
    claims = await asyncio.gather(*(b.claim_once(key, 60.0) for _ in range(20)))
    assert claims.count(True) == 1          # concurrent claims: exactly one wins
    assert not await b.claim_once(key, 60.0)
    assert await b.claim_once(other, 60.0)  # keys are independent
    short = uniq("once")
    assert await b.claim_once(short, 0.2)
    assert not await b.claim_once(short, 0.2)
    deadline = time.monotonic() + 10
    while not await b.claim_once(short, 60.0):  # claimable again once the ttl passed
        assert time.monotonic() < deadline, "claim did not expire"
        await asyncio.sleep(0.05)
    if hasattr(b, "sweep"):  # memory: expired keys are freed without waiting for a claim
        b.sweep(time.monotonic() + 61)
        assert not b._once


# ---------------------------------------------------------------- SPEC §13: meta, ephemeral


async def test_meta_reaches_the_handler_and_stays_out_of_history(broker):
    """A publication's meta (the node's sender/ephemeral marks) comes back with it, on
    channel and pattern subscriptions, with and without a namespace log, and is never
    kept in history; a publication without meta comes without it."""
    b, h = broker
    ns = f"m{uuid.uuid4().hex[:8]}"
    ch = f"{ns}:room"
    await b.subscribe(ch)
    await b.subscribe(f"{ns}:*")  # the node counts each publication once per match
    meta = b'{"f":{"user":"alice","client":"c1"}}'
    r1 = await b.publish(ch, b'{"n":1}', history_size=10, history_ttl=60, meta=meta)
    r2 = await b.publish(ch, b'{"n":2}', history_size=10, history_ttl=60,
                         log=(ns, 100), meta=meta)
    r3 = await pub(b, ch, {"n": 3})
    await h.wait_for(lambda: {m[1] for m in h.metas if m[0] == ch}
                     >= {b'{"n":1}', b'{"n":2}', b'{"n":3}'})
    got = {d: m for c, d, _lo, m in h.metas if c == ch}
    assert got[b'{"n":1}'] == meta and got[b'{"n":2}'] == meta and got[b'{"n":3}'] == b""
    assert (r1.offset, r2.offset, r3.offset) == (1, 2, 3)
    hist = await b.history(ch, limit=10)
    assert [d for _o, d in hist.publications] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    if b.keeps_logs:  # the log position still comes with a meta'd publication
        assert [lo for c, d, lo, _m in h.metas if d == b'{"n":2}'] == [1]


async def test_ephemeral_publications_move_no_offset(broker):
    """An ephemeral publication (history_size 0, meta {"e":1}): delivered live with its
    meta, offset 0, nothing in history, the channel's offsets untouched; in a batch too."""
    b, h = broker
    ch = uniq("eph")
    await b.subscribe(ch)
    first = await pub(b, ch, {"n": 1})
    eph = await b.publish(ch, b'{"typing":true}', history_size=0, history_ttl=60,
                          meta=b'{"e":1}')
    assert (eph.offset, eph.epoch) == (0, "")
    from fastws.broker import Publication
    res = await b.publish_batch([Publication(ch, b'{"typing":false}', 0, 60, None, None,
                                             meta=b'{"e":1}'),
                                 Publication(ch, b'{"n":2}', 10, 60)])
    assert (res[0].offset, res[1].offset) == (0, first.offset + 1)
    await h.wait_count(4, ch)
    metas = [(d, m) for c, d, _lo, m in h.metas if c == ch]
    assert metas == [(b'{"n":1}', b""), (b'{"typing":true}', b'{"e":1}'),
                     (b'{"typing":false}', b'{"e":1}'), (b'{"n":2}', b"")]
    assert [g[2] for g in h.got if g[0] == ch] == [1, 0, 0, 2]
    hist = await b.history(ch, limit=10)
    assert [d for _o, d in hist.publications] == [b'{"n":1}', b'{"n":2}']
    assert hist.offset == 2


async def test_sender_is_kept_with_the_publication(broker):
    """A publication's ``sender`` (SPEC §13 ``from``) is kept with it in history and in
    its namespace's log and read back as one more tuple item, by newest-N reads, since
    reads and pages alike, published alone, with meta, or in a batch; publications
    without one read back as before (``(offset, data)``), and the meta stays out."""
    from fastws.broker import Publication

    b, h = broker
    ns = f"s{uuid.uuid4().hex[:8]}"
    ch = f"{ns}:room"
    await b.subscribe(ch)
    alice = b'{"user":"alice","client":"c1"}'
    anon = b'{"user":null,"client":"c2"}'
    await b.publish(ch, b'{"n":1}', history_size=10, history_ttl=60, log=(ns, 100),
                    meta=b'{"f":{"user":"alice","client":"c1"},"x":"c1"}', sender=alice)
    await pub(b, ch, {"n": 2})                                # the API: no sender
    res = await b.publish_batch([
        Publication(ch, b'{"n":3}', 10, 60, None, (ns, 100), sender=anon),
        Publication(ch, b'{"n":4}', 10, 60, None, (ns, 100)),
        Publication(ch, b'{"n":5}', 10, 60, "k5", None, sender=alice)])
    assert [r.offset for r in res] == [3, 4, 5]
    again = await b.publish(ch, b'{"n":5}', history_size=10, history_ttl=60,
                            idempotency_key="k5", sender=alice)
    assert again.offset == 5                                  # published once
    eph = await b.publish(ch, b'{"typing":1}', history_size=0, history_ttl=60,
                          meta=b'{"e":1}', sender=alice)     # kept nowhere
    assert eph.offset == 0
    await h.wait_count(6, ch)
    want = [(1, b'{"n":1}', alice), (2, b'{"n":2}'), (3, b'{"n":3}', anon),
            (4, b'{"n":4}'), (5, b'{"n":5}', alice)]
    assert (await b.history(ch, limit=10)).publications == want
    assert (await b.history(ch, limit=2)).publications == want[-2:]
    since = await b.history(ch, limit=10, since_offset=0)
    assert since.publications == want and since.recovered
    page = await b.history(ch, limit=2, since_offset=2, since_epoch=since.epoch)
    assert page.publications == want[2:4] and page.recovered
    # the live meta is handed over as before, and the history holds only the sender
    assert [m for c, d, _lo, m in h.metas if c == ch and d == b'{"n":1}'] == [
        b'{"f":{"user":"alice","client":"c1"},"x":"c1"}']
    if not b.keeps_logs:
        return
    log = await b.log_history(ns, limit=10, since_channel="", since_offset=0,
                              since_epoch="")
    epoch = since.epoch
    assert log.publications == [(1, ch, 1, epoch, b'{"n":1}', alice),
                                (2, ch, 3, epoch, b'{"n":3}', anon),
                                (3, ch, 4, epoch, b'{"n":4}')]
    after = await b.log_history(ns, limit=10, since_channel=ch, since_offset=1,
                                since_epoch=epoch)
    assert after.recovered and after.publications == log.publications[1:]


async def test_stream_appends_once_per_key_in_order(broker):
    """SPEC §12 on each Redis broker (one script on one master, two steps on a
    cluster): appended before the answer, once per idempotency key, batches in order."""
    b, h = broker
    if isinstance(b, MemoryBroker):
        pytest.skip("memory:// keeps no streams (stream = true is refused with it)")
    assert isinstance(b, RedisBroker)
    import redis

    two_steps = isinstance(b, RedisClusterBroker)   # offsets come after the append
    r = (redis.RedisCluster(host=b.target.host, port=b.target.port) if two_steps
         else redis.Redis(host=b.target.host, port=b.target.port))
    key = f"fastws:stream:{uuid.uuid4().hex[:8]}"
    named, anonymous = StreamAppend(key, 1000, "u1", "c1"), StreamAppend(key, 1000)
    ch1, ch2 = uniq(), uniq()
    await b.subscribe(ch1)
    await b.subscribe(ch2)
    first = await b.publish(ch1, b"1", history_size=10, history_ttl=60.0,
                            idempotency_key="k", stream=named)
    assert len(r.xrange(key)) == 1
    assert await b.publish(ch1, b"1", history_size=10, history_ttl=60.0,
                           idempotency_key="k", stream=named) == first
    res = await b.publish_batch([Publication(ch2, b"2", 10, 60.0, stream=named),
                                 Publication(ch1, b"3", 10, 60.0, stream=anonymous),
                                 Publication(ch1, b"1", 10, 60.0, idempotency_key="k",
                                             stream=named)])
    assert res[2] == first and res[1].offset == 2, res
    got = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(key)]
    assert [(e["channel"], e["data"], e["user"], e["client"]) for e in got] == [
        (ch1, "1", "u1", "c1"), (ch2, "2", "u1", "c1"), (ch1, "3", "", "")]
    assert [(e["offset"], e["epoch"]) for e in got] == [
        ("0", "") if two_steps else (str(p.offset), p.epoch) for p in (first, *res[:2])]
    assert [g[1] for g in await h.wait_count(2, ch1)] == [b"1", b"3"]
    assert [g[1] for g in await h.wait_count(1, ch2)] == [b"2"]
    r.close()

