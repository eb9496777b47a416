"""POST /api/revoke on a real 3-master Redis Cluster: each record lands on its key's
master, every node refuses the revoked tokens, and a node started afterwards loads the
records of every master."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from conftest import API_KEY, http
from redis_helpers import start_cluster
from wsclient import connect

from fastws.codes import Close

pytestmark = pytest.mark.timeout(120)

SECRET = "revoke-cluster-secret-of-32-bytes-plus"


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def closes_revoked(ws_url: str, tok: str) -> None:
    c = await connect(f"{ws_url}?token={tok}")
    assert (await c.recv())["reason"] == "token revoked"
    assert await c.wait_closed() == Close.INVALID_TOKEN


async def test_cluster_revocations_on_every_master(fastws_server) -> None:
    cluster = start_cluster()
    try:
        a = fastws_server("--broker", cluster.url, "--jwt-secret", SECRET)
        b = fastws_server("--broker", cluster.url, "--jwt-secret", SECRET)
        users = [f"user{i}" for i in range(12)]
        owners = {cluster.owner(f"fws:revoked:user:{u}") for u in users}
        assert len(owners) > 1          # the records spread over the masters
        tokens = {u: token(u) for u in users}
        live = await connect(f"{b.ws_url}?token={tokens['user0']}")
        assert (await live.request({"id": 1, "type": "ping"}))["type"] == "pong"
        for u in users:
            status, _, body = http("POST", a.http_url + "/api/revoke", {"user": u},
                                   headers={"Authorization": f"Bearer {API_KEY}"})
            assert status == 200, body
        assert (await live.recv())["reason"] == "token revoked"
        assert await live.wait_closed() == Close.INVALID_TOKEN
        late = fastws_server("--broker", cluster.url, "--jwt-secret", SECRET)
        for node in (a, b, late):
            for u in users:
                await closes_revoked(node.ws_url, tokens[u])
        ok = await connect(f"{late.ws_url}?token={token('someone-else')}")
        assert (await ok.request({"id": 1, "type": "ping"}))["type"] == "pong"
        ok.close()
        assert json.loads(http("GET", late.http_url + "/readyz")[2])["status"] == "ready"
    finally:
        cluster.stop()
