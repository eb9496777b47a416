"""A raw protocol test client on picows: send JSON, await parsed frames, see closes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import picows
from picows import WSListener, WSMsgType


class RawClient(WSListener):
    """Collects every TEXT frame (parsed) and the close frame of one connection."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.raw: list[bytes] = []
        self.keep_raw = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self.transport: Any = None
        self.pings = 0

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if self.keep_raw:
                self.raw.append(payload)
            self.messages.put_nowait(orjson.loads(payload))
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            self.close_reason = frame.get_close_reason() or ""
            transport.disconnect()
        elif frame.msg_type == WSMsgType.PING:
            self.pings += 1
            transport.send_pong(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed.set()

    def send(self, msg: dict[str, Any] | bytes | str) -> None:
        data = msg if isinstance(msg, bytes | str) else orjson.dumps(msg)
        if isinstance(data, str):
            data = data.encode()
        self.transport.send(WSMsgType.TEXT, data)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def request(self, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send a request and return the reply with the same id (pushes before it are kept)."""
        self.send(msg)
        skipped = []
        try:
            while True:
                m = await self.recv(timeout)
                if m.get("id") == msg.get("id"):
                    return m
                skipped.append(m)
        finally:
            for m in skipped:
                self.messages.put_nowait(m)

    async def until_reply(self, reply_id: int,
                          timeout: float = 10.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The pushes received before the reply ``reply_id`` (in order), and that reply."""
        got = []
        while True:
            m = await self.recv(timeout)
            if m.get("id") == reply_id:
                return got, m
            got.append(m)

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    def close(self) -> None:
        if self.transport is not None and not self.closed.is_set():
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()


async def connect(url: str, **kw: Any) -> RawClient:
    """Open one raw connection (kw go to picows.ws_connect, e.g. extra_headers)."""
    _, client = await picows.ws_connect(RawClient, url, **kw)
    return client


async def connect_with_token(ws_url: str, token: str) -> RawClient:
    """A connection authenticated with ``token`` (``?token=``), proven live by a ping."""
    c = await connect(f"{ws_url}?token={token}")
    reply = await c.request({"id": 99, "type": "ping"})
    assert reply["type"] == "pong", reply
    return c
