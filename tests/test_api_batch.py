"""POST /api/publish with a JSON array: a batch of publications, one result per item,
in order; per-item errors; the batch limit; the same on one real Redis (one pipeline)."""

from __future__ import annotations

import json

import pytest
from conftest import API_KEY, http
from redis_helpers import events, sub, uniq
from wsclient import connect

from fastws.api import MAX_BATCH
from fastws.limits import MAX_JSON_DEPTH

pytestmark = pytest.mark.timeout(60)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(base: str, body: object, headers: dict[str, str] | None = AUTH) -> tuple[int, object]:
    status, _, raw = http("POST", base + "/api/publish", body, headers=headers)
    return status, json.loads(raw)


@pytest.fixture(params=["memory", "redis"])
def node(request, fastws_server):
    """One server on the memory broker, or on a fresh real Redis."""
    if request.param == "memory":
        return fastws_server()
    redis = request.getfixturevalue("redis_server")
    return fastws_server("--broker", redis.url)


async def test_batch_results_in_order_and_delivered(node) -> None:
    a, b = uniq(), uniq()
    c = await connect(node.ws_url)
    await sub(c, a, 1)
    await sub(c, b, 2)
    body = [{"channel": a, "data": {"n": 1}}, {"channel": b, "data": {"n": 1}},
            {"channel": a, "data": {"n": 2}}, {"channel": a, "data": {"n": 3}},
            {"channel": b, "data": {"n": 2}, "idempotency_key": "k1"}]
    status, res = post(node.http_url, body)
    assert status == 200 and isinstance(res, list) and len(res) == 5, res
    assert [r["offset"] for r in res] == [1, 1, 2, 3, 2]
    assert all(r["epoch"] for r in res)
    got = await events(c, 5)
    per = {a: [e["data"]["n"] for e in got if e["channel"] == a],
           b: [e["data"]["n"] for e in got if e["channel"] == b]}
    assert per == {a: [1, 2, 3], b: [1, 2]}
    # an idempotency key repeated in a later batch: the first result, nothing published
    status, res2 = post(node.http_url, [{"channel": b, "data": {"n": 9},
                                         "idempotency_key": "k1"},
                                        {"channel": b, "data": {"n": 3}}])
    assert status == 200 and res2 == [res[4], {"offset": 3, "epoch": res[4]["epoch"]}]
    (ev,) = await events(c, 1)
    assert ev["data"] == {"n": 3}
    c.close()


async def test_bad_items_fail_alone(node) -> None:
    a = uniq()
    deep: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    c = await connect(node.ws_url)
    await sub(c, a, 1)
    body = [{"channel": a, "data": 1}, {"channel": "bad channel", "data": 2},
            {"channel": a}, {"channel": a, "data": None, "idempotency_key": 7},
            {"channel": a, "data": 3, "x": 1},
            {"channel": "events:*", "data": 4}, {"channel": a, "data": 5},
            {"channel": a, "data": 6, "idempotency_key": ""},
            {"channel": a, "data": deep}]
    status, res = post(node.http_url, body)
    assert status == 200 and len(res) == len(body), res
    assert res[0]["offset"] == 1 and res[6]["offset"] == 2
    for i in (1, 2, 3, 4, 5, 7, 8):
        assert res[i]["status"] == 400 and res[i]["error"], (i, res[i])
    assert "printable ASCII" in res[1]["error"]
    assert res[2]["error"] == "data is required"
    assert "unknown field 'x'" in res[4]["error"]
    assert "pattern" in res[5]["error"]
    assert "nests deeper" in res[8]["error"]
    got = await events(c, 2)
    assert [e["data"] for e in got] == [1, 5]
    c.close()


def test_whole_request_errors(server) -> None:
    base = server.http_url
    assert post(base, [])[0] == 400
    too_many = [{"channel": "events:x", "data": i} for i in range(MAX_BATCH + 1)]
    status, res = post(base, too_many)
    assert status == 400 and str(MAX_BATCH) in res["error"]
    status, res = post(base, [{"channel": "events:x", "data": 1}], headers={})
    assert status == 401
    status, res = post(base, 5)
    assert status == 400 and "array" in res["error"]
    # an item that is not an object: the request is malformed, nothing is published
    status, res = post(base, [{"channel": "events:y", "data": 1}, "text"])
    assert status == 400 and res["error"] == "item 1 of the array is not a JSON object"
    assert post(base, [{"channel": "events:y", "data": 1}])[1][0]["offset"] == 1
    # exactly MAX_BATCH is accepted
    status, res = post(base, too_many[:MAX_BATCH])
    assert status == 200 and [r["offset"] for r in res] == list(range(1, MAX_BATCH + 1))
    # the server is still fine, and the single-object form is unchanged
    assert server.publish("events:x", 1)["offset"] == MAX_BATCH + 1
