"""Worked example (docs/backend.md): page views from an analytics SDK.

* The application's backend checks each SDK connection's opaque project API token
  (``[proxy] connect``); an unknown token is refused, and a backend that is down
  refuses every connection (fastws fails closed).
* The SDK publishes page views on ``views:<project>``, a ``stream = true`` namespace:
  each is appended to the Redis stream ``fastws:stream:views`` before it is
  acknowledged, once per idempotency key.
* A worker drains the stream with ``XREADGROUP`` (into ClickHouse, here a list).
* A dashboard subscribed to ``views:<project>`` sees them live, and asks
  ``presence_stats`` of ``online:<project>`` for the live users.
* ``[server] lifecycle_stream = true``: the session ends when the SDK's socket
  closes, from the ``disconnect`` record in ``fastws:lifecycle`` (within 1 s).

``tests/test_backend_example.py`` runs every piece against a real server and Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

import fastws

#: what fastws.toml says (the backend's URL filled in)
CONFIG = """
[server]
lifecycle_stream = true

[proxy]
connect = "{backend}/fastws/connect"

[namespaces.views]      # page views: appended to fastws:stream:views, fanned out live
stream = true
history_size = 0
subscribe = "authenticated"
publish = "authenticated"

[namespaces.online]     # who is on a site now
presence = true
subscribe = "authenticated"
"""


def backend_app(projects: dict[str, str]) -> web.Application:
    """The application's backend: ``projects`` maps an API token to its project (a
    database lookup in real life)."""

    async def connect(request: web.Request) -> web.Response:
        body = await request.json()
        project = projects.get(body["token"] or "")
        if project is None:
            return web.json_response({"error": {"code": 401, "message": "unknown API token"}})
        # the connection may only use its project's channels (like a JWT's claim)
        return web.json_response({"result": {
            "user": f"{project}/{body['client']}",
            "channels": [f"views:{project}", f"online:{project}"],
            "meta": {"project": project}}})

    app = web.Application()
    app.router.add_post("/fastws/connect", connect)
    return app


async def sdk_visit(url: str, token: str, project: str, pages: list[str]) -> fastws.Client:
    """The SDK: connect with the API token, be online, publish page views (each with an
    idempotency key, so that a retry is appended once).  Returns the open client."""
    client = fastws.connect(url, token=token)
    await client.start()
    await client.subscribe(f"online:{project}")
    for i, page in enumerate(pages):
        await client.publish(f"views:{project}", {"page": page},
                             idempotency_key=f"{token}:{i}")
    return client


async def worker(redis_url: str, rows: list[dict[str, Any]], stop: asyncio.Event,
                 group: str = "clickhouse") -> None:
    """Drain ``fastws:stream:views`` in consumer group ``group`` into ``rows``."""
    r = aioredis.from_url(redis_url)
    stream = "fastws:stream:views"
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except aioredis.ResponseError as exc:     # BUSYGROUP: it exists already
        if "BUSYGROUP" not in str(exc):
            raise
    try:
        while not stop.is_set():
            got = await r.xreadgroup(group, "worker-1", {stream: ">"}, count=100, block=200)
            for _name, entries in got:
                for entry_id, f in entries:
                    rows.append({k.decode(): v.decode() for k, v in f.items()})
                    await r.xack(stream, group, entry_id)
    finally:
        await r.aclose()


async def session_ended(redis_url: str, client: str, timeout: float = 5.0) -> dict[str, str]:
    """The ``disconnect`` record of SDK connection ``client`` (the session's end)."""
    r = aioredis.from_url(redis_url)
    try:
        last = "0"
        async with asyncio.timeout(timeout):
            while True:
                got = await r.xread({"fastws:lifecycle": last}, block=200)
                for _name, entries in got:
                    for entry_id, f in entries:
                        last = entry_id
                        rec = {k.decode(): v.decode() for k, v in f.items()}
                        if rec["event"] == "disconnect" and rec["client"] == client:
                            return rec
    finally:
        await r.aclose()
