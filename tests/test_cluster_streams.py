"""SPEC §12 on Redis Cluster: a stream namespace's publication is appended on the
stream's master, then published on the channel's (two steps: the stream's slot is not
the channel's).  Appended once per idempotency key, even when the publish failed after
the append and is retried; a failed append (its master down) is a 503 and fans nothing
out; a batch appends every item in order."""

from __future__ import annotations

import json
import time

import pytest
import redis
from conftest import API_KEY, ServerProc, http
from redis_helpers import Cluster, events, readyz, start_cluster, sub, until
from wsclient import RawClient, connect

from fastws.broker.redis_scripts import keys_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

CONFIG = """
[namespaces.plain]
publish = "anyone"
"""
STREAMED = 6   # namespaces s0…s5: their streams spread over the masters


def stream_config() -> str:
    return CONFIG + "".join(f'[namespaces.s{i}]\nstream = true\npublish = "anyone"\n'
                            f"history_size = 10\n" for i in range(STREAMED))


@pytest.fixture(scope="module")
def redis_cluster():
    c = start_cluster()
    yield c
    c.stop()


def entries(cluster: Cluster, ns: str) -> list[dict[str, str]]:
    """The fields of ``fastws:stream:NS``'s entries, read on the stream's master."""
    key = f"fastws:stream:{ns}"
    r = redis.Redis(port=cluster.owner(key))
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(key)]


def channel_on(cluster: Cluster, prefix: str, master: int | None = None,
               not_on: int | None = None) -> str:
    """A channel ``PREFIX:N`` whose slot is on ``master`` (or on any but ``not_on``)."""
    i = 0
    while True:
        name = f"{prefix}:{time.monotonic_ns()}-{i}"
        owner = cluster.owner(name)
        if (master is None or owner == master) and owner != not_on:
            return name
        i += 1


def api(node: ServerProc, body: object) -> tuple[int, object]:
    status, _, raw = http("POST", node.http_url + "/api/publish", body,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    return status, json.loads(raw)


async def nothing_but(c: RawClient, marker: object) -> None:
    """The next event of ``c`` is ``marker`` (published after what must not arrive, on
    the same master: it would have come first)."""
    (event,) = await events(c, 1)
    assert event["data"] == marker, event


async def test_cluster_stream_appends_once_then_publishes(redis_cluster,
                                                          fastws_server) -> None:
    node = fastws_server("--broker", redis_cluster.url, config=stream_config())
    await until(lambda: readyz(node) == 200, what="ready")
    stream_master = redis_cluster.owner("fastws:stream:s0")
    ch = channel_on(redis_cluster, "s0", not_on=stream_master)   # really two masters
    pub, listener = await connect(node.ws_url), await connect(node.ws_url)
    await sub(listener, ch, 1)
    msg = {"id": 2, "type": "publish", "channel": ch, "data": {"page": "/"},
           "idempotency_key": "view-1"}
    first = await pub.request(msg)
    assert first["type"] == "published" and first["offset"] == 1, first
    (f,) = entries(redis_cluster, "s0")   # acknowledged: in the stream
    assert (f["channel"], f["data"], f["user"]) == (ch, '{"page":"/"}', "")
    assert f["client"] and (f["offset"], f["epoch"]) == ("0", "")
    assert abs(int(f["ts"]) - time.time() * 1000) < 5000
    assert (await events(listener, 1))[0]["data"] == {"page": "/"}
    # the same key again: the first answer, nothing appended or fanned out again
    assert await pub.request({**msg, "id": 3}) == {**first, "id": 3}
    assert len(entries(redis_cluster, "s0")) == 1
    # the publish fails after the append (the channel's meta holds a string): 503,
    # the entry stays, nothing fanned out; the retry with its key is published and not
    # appended again
    ch2 = channel_on(redis_cluster, "s0", not_on=stream_master)
    marker = channel_on(redis_cluster, "plain", master=redis_cluster.owner(ch2))
    await sub(listener, ch2, 4)
    await sub(listener, marker, 5)
    meta = keys_for(ch2)[0]
    on_channel = redis.Redis(port=redis_cluster.owner(ch2))
    on_channel.set(meta, "not a hash")
    retry = {"id": 6, "type": "publish", "channel": ch2, "data": "r", "idempotency_key": "k"}
    err = await pub.request(retry)
    assert (err["type"], err["code"]) == ("error", 503), err
    assert [e["data"] for e in entries(redis_cluster, "s0")] == ['{"page":"/"}', '"r"']
    assert api(node, {"channel": marker, "data": "m"})[0] == 200
    await nothing_but(listener, "m")
    on_channel.delete(meta)
    done = await pub.request({**retry, "id": 7})
    assert done["type"] == "published", done
    assert (await events(listener, 1))[0]["data"] == "r"
    assert await pub.request({**retry, "id": 8}) == {**done, "id": 8}
    assert [e["data"] for e in entries(redis_cluster, "s0")] == ['{"page":"/"}', '"r"']
    # the same key on another channel of the namespace is another publication
    other = await pub.request({**msg, "id": 9, "channel": ch2})
    assert other["type"] == "published", other
    assert len(entries(redis_cluster, "s0")) == 3
    for c in (pub, listener):
        c.close()


async def test_cluster_stream_batch_appends_every_item_in_order(redis_cluster,
                                                                fastws_server) -> None:
    node = fastws_server("--broker", redis_cluster.url, config=stream_config())
    await until(lambda: readyz(node) == 200, what="ready")
    by_master = redis_cluster.channels_by_master("s1:b", per_master=2)
    channels = [ch for pair in zip(*by_master.values(), strict=True) for ch in pair]
    plain = channel_on(redis_cluster, "plain")
    listener = await connect(node.ws_url)
    for i, ch in enumerate([*channels, plain]):
        await sub(listener, ch, i)
    items = [{"channel": ch, "data": i} for i, ch in enumerate(channels)]
    items.insert(2, {"channel": plain, "data": "plain"})
    items.append({"channel": channels[0], "data": "keyed", "idempotency_key": "b-1"})
    status, results = api(node, items)
    assert status == 200 and all("offset" in r for r in results), results
    got = entries(redis_cluster, "s1")
    assert [(e["channel"], e["data"]) for e in got] == [
        (it["channel"], json.dumps(it["data"])) for it in items if it["channel"] != plain]
    assert {(e["user"], e["client"], e["offset"], e["epoch"]) for e in got} == {
        ("", "", "0", "")}
    received = await events(listener, len(items))
    assert sorted(map(str, (e["data"] for e in received))) == sorted(
        str(it["data"]) for it in items)
    # the batch again: the keyed item is answered as before and not appended again
    status, again = api(node, items[-1:] * 2)
    assert status == 200 and again == [results[-1]] * 2, again
    assert len(entries(redis_cluster, "s1")) == len(got)
    listener.close()


async def test_cluster_stream_master_down_refuses(fastws_server) -> None:
    """The stream's master killed (no replica; the rest of the cluster serves its
    slots): a publication into the namespace is a 503, alone and in a batch, and its
    subscriber gets nothing; other namespaces keep working."""
    cluster = start_cluster(extra=("--cluster-require-full-coverage", "no"))
    try:
        node = fastws_server("--broker", cluster.url, config=stream_config())
        await until(lambda: readyz(node) == 200, what="ready")
        holder = cluster.holder_of(f"fastws-{node.proc.pid}-global")
        ns = next(f"s{i}" for i in range(STREAMED)
                  if cluster.owner(f"fastws:stream:s{i}") != holder)  # the global link lives
        victim = cluster.owner(f"fastws:stream:{ns}")
        ch = channel_on(cluster, ns, not_on=victim)
        marker = channel_on(cluster, "plain", master=cluster.owner(ch))
        listener, pub = await connect(node.ws_url), await connect(node.ws_url)
        await sub(listener, ch, 1)
        await sub(listener, marker, 2)
        assert api(node, {"channel": ch, "data": "before"})[0] == 200
        assert (await events(listener, 1))[0]["data"] == "before"

        cluster.kill(victim)
        await until(lambda: api(node, {"channel": ch, "data": "lost"})[0] == 503,
                    what="503 once the stream's master is lost")
        err = await pub.request({"id": 3, "type": "publish", "channel": ch, "data": "lost"})
        assert (err["type"], err["code"]) == ("error", 503), err
        status, results = api(node, [{"channel": ch, "data": "lost"},
                                     {"channel": marker, "data": "m"}])
        assert status == 200 and results[0]["status"] == 503 and "offset" in results[1]
        await nothing_but(listener, "m")
        for c in (listener, pub):
            c.close()
    finally:
        cluster.stop()
