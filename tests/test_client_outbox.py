"""The Python client's SPEC §13 side against real servers: the offline outbox (queued
while disconnected, sent in order after reconnecting, published once when a reply was
lost, bounded), ``last``, ``ephemeral``, ``from`` and ``echo``."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from fastws.client import Client, OutboxFull, connect
from fastws.errors import ConnectionClosed

pytestmark = pytest.mark.timeout(60)

FAST = {"backoff_base": 0.02, "backoff_cap": 0.1, "request_timeout": 5.0}
CONFIG = """
[namespaces.chat]
publish = "anyone"
history_size = 100
"""


def room() -> str:
    return f"chat:{uuid.uuid4().hex[:10]}"


async def until(pred, timeout: float = 10.0) -> None:
    """Wait for ``pred()`` (client state seen from outside: polled on the loop)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


async def take(c: Client, n: int, timeout: float = 10.0) -> list:
    return [await c.next_event(timeout) for _ in range(n)]


class CutProxy:
    """A TCP proxy in front of a server; :meth:`mute` stops passing the server's bytes
    to the client (replies get lost), :meth:`cut` closes every proxied connection."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.muted = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [w, uw]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool):
            try:
                while data := await src.read(65536):
                    if not (down and self.muted):
                        dst.write(data)
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(r, uw, False), pump(ur, w, True))

    def cut(self) -> None:
        self.muted = False
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_publish_while_offline_goes_out_in_order(fastws_server) -> None:
    """Server gone: publish() queues (no timeout while reconnecting); after it is back
    the publications go out once each, in call order, and each call returns its
    offset."""
    srv = fastws_server(config=CONFIG)
    ch = room()
    async with connect(srv.ws_url, **{**FAST, "request_timeout": 1.0}) as c:
        await c.publish(ch, "before")
        srv.stop(signal.SIGKILL)
        await until(lambda: not c.connected)
        calls = [asyncio.ensure_future(c.publish(ch, f"m{i}")) for i in range(3)]
        await until(lambda: c.outbox_size == 3)
        await asyncio.sleep(1.5)  # offline past request_timeout: still queued, no timeout
        assert not any(f.done() for f in calls)
        srv2 = fastws_server(port=srv.port, config=CONFIG)
        results = await asyncio.gather(*calls)
        assert [r["offset"] for r in results] == [1, 2, 3]  # memory broker restarted
        assert c.outbox_size == 0
        async with connect(srv2.ws_url, **FAST) as reader:
            await reader.subscribe(ch, last=10)
            evs = await take(reader, 3)
            assert [e.data for e in evs] == ["m0", "m1", "m2"]


async def test_reply_lost_publishes_once(fastws_server) -> None:
    """The connection drops after the server published but before the reply reached the
    client: the client sends it again with the same idempotency key; it is published
    once and the call returns the first offset."""
    srv = fastws_server(config=CONFIG)
    ch = room()
    proxy = CutProxy(srv.port)
    port = await proxy.start()
    try:
        async with connect(srv.ws_url, **FAST) as watcher, \
                connect(f"ws://127.0.0.1:{port}/ws", **FAST) as c:
            await watcher.subscribe(ch)
            proxy.muted = True
            call = asyncio.ensure_future(c.publish(ch, "once"))
            first = await watcher.next_event(10)
            assert first.data == "once" and first.offset == 1
            proxy.cut()  # the reply was lost with the connection
            res = await call
            assert (res["offset"], res["epoch"]) == (1, first.epoch)
            await watcher.publish(ch, "marker")  # anything after it: nothing twice
            nxt = await watcher.next_event(10)
            assert nxt.data == "marker" and nxt.offset == 2
    finally:
        proxy.close()


async def test_outbox_is_bounded(fastws_server) -> None:
    """At the limit, publish() raises OutboxFull naming it; the queued ones still go out;
    a client closed for good fails what is still queued."""
    srv = fastws_server(config=CONFIG)
    ch = room()
    c = connect(srv.ws_url, outbox_limit=2, **FAST)
    await c.start()
    srv.stop(signal.SIGKILL)
    await until(lambda: not c.connected)
    calls = [asyncio.ensure_future(c.publish(ch, i)) for i in range(2)]
    await until(lambda: c.outbox_size == 2)
    with pytest.raises(OutboxFull, match="limit is 2"):
        await c.publish(ch, 3)
    await c.close()
    for f in calls:
        with pytest.raises(ConnectionClosed):
            await f


async def test_last_from_echo_ephemeral(fastws_server) -> None:
    """``subscribe(last=N)``, ``event.sender``/``from_``, ``ephemeral``, ``echo=False``."""
    srv = fastws_server(config=CONFIG)
    ch = room()
    async with connect(srv.ws_url, **FAST) as a, connect(srv.ws_url, **FAST) as b:
        for i in range(4):
            await a.publish(ch, i)
        await b.subscribe(ch, last=2)
        assert [e.data for e in await take(b, 2)] == [2, 3]
        await a.subscribe(ch)
        r = await a.publish(ch, {"typing": True}, ephemeral=True, echo=False)
        assert (r["offset"], r["epoch"]) == (0, "")
        ev = await b.next_event(5)
        assert ev.ephemeral and ev.offset is None and ev.data == {"typing": True}
        assert ev.sender == ev.from_ and ev.sender["client"] and ev.sender["user"] is None
        await a.publish(ch, "echoed")
        ev = await a.next_event(5)  # the ephemeral one never came back to a
        assert ev.data == "echoed" and not ev.ephemeral and ev.offset == 5
