"""The worked example of docs/backend.md (docs/examples/pageviews.py), end to end: an
SDK with an opaque token checked by the backend, page views into a stream namespace,
a worker reading them with XREADGROUP, a live dashboard, and the session's end."""

from __future__ import annotations

import asyncio
import importlib.util
import time

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, free_port

import fastws
from fastws.errors import FastWSError

pytestmark = pytest.mark.asyncio

spec = importlib.util.spec_from_file_location("pageviews", ROOT / "docs/examples/pageviews.py")
pageviews = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pageviews)


async def test_pageviews_example(fastws_server, redis_server) -> None:
    port = free_port()
    runner = web.AppRunner(pageviews.backend_app({"pk_site1": "site1", "dash_site1": "site1"}))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        srv = fastws_server("--broker", redis_server.url,
                            config=pageviews.CONFIG.format(backend=f"http://127.0.0.1:{port}"))
        rows: list[dict] = []
        stop = asyncio.Event()
        drain = asyncio.create_task(pageviews.worker(redis_server.url, rows, stop))
        async with fastws.connect(srv.ws_url, token="dash_site1") as dash:
            await dash.subscribe("views:site1")
            sdk = await pageviews.sdk_visit(srv.ws_url, "pk_site1", "site1", ["/", "/pricing"])
            seen = [await dash.next_event(timeout=5) for _ in range(2)]
            assert [e.data for e in seen] == [{"page": "/"}, {"page": "/pricing"}]
            stats = await dash.request({"type": "presence_stats", "channel": "online:site1"})
            assert (stats["num_clients"], stats["num_users"]) == (1, 1)
            # every view reached the worker, with the publisher's connection
            deadline = time.monotonic() + 5
            while len(rows) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert [r["data"] for r in rows] == ['{"page":"/"}', '{"page":"/pricing"}']
            client = rows[0]["client"]
            assert rows[0]["user"] == f"site1/{client}"
            # another project's channel is not the SDK's to publish on
            with pytest.raises(FastWSError):
                await sdk.publish("views:site2", {"page": "/"})
            # the socket closes: the session ends within 1 s
            t0 = time.monotonic()
            ended = asyncio.create_task(pageviews.session_ended(redis_server.url, client))
            await sdk.close()
            rec = await ended
            assert time.monotonic() - t0 < 1.0 and rec["code"] == "1000"
        stop.set()
        await drain
        # an unknown token never gets in
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
                await http.ws_connect(srv.ws_url + "?token=pk_stolen")
            assert ei.value.status == 401
    finally:
        await runner.cleanup()
    # the backend is down: refused too (fail closed)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
            await http.ws_connect(srv.ws_url + "?token=pk_site1")
        assert ei.value.status == 503
