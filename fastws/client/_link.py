"""The picows side of the Python client: one connection attempt and its live link.

:func:`open_connection` performs the upgrade (``Authorization: Bearer``, 401/403 and
``Retry-After`` handling); :class:`_Listener` turns picows frames into messages for the
:class:`~fastws.client.Client`; :class:`_Conn` holds one connection's state (pending
requests, close code, token in force); :func:`watchdog` drops a connection that went
quiet. Everything here is internal to :mod:`fastws.client`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from fastws.errors import AuthError, ConnectionClosed

if TYPE_CHECKING:
    from fastws.client.client import Client

__all__ = ["ABNORMAL", "open_connection", "watchdog"]

log = logging.getLogger("fastws.client")

#: the close code of a connection that ended without a close frame (RFC 6455 §7.1.5)
ABNORMAL = int(WSCloseCode.ABNORMAL_CLOSURE)


class _ConnectionLost(Exception):
    """Internal: the connection a request was sent on went away (client reconnects)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class _RetryAfter(Exception):
    """Internal: the upgrade was refused with 429/503 and a ``Retry-After``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class _Terminal(Exception):
    """Internal: stop reconnecting and raise ``exc`` everywhere."""

    def __init__(self, exc: ConnectionClosed) -> None:
        super().__init__(exc)
        self.exc = exc


class _Listener(WSListener):
    """picows listener for one connection; hands frames to its :class:`_Conn`."""

    def __init__(self, conn: _Conn) -> None:
        super().__init__()
        self.conn = conn

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.conn.on_connected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        conn = self.conn
        conn.last_rx = time.monotonic()
        mt = frame.msg_type
        if mt == WSMsgType.TEXT or mt == WSMsgType.BINARY:
            try:
                msg = orjson.loads(frame.get_payload_as_memoryview())
            except orjson.JSONDecodeError:
                log.warning("fastws client: ignoring a frame that is not JSON")
                return
            if isinstance(msg, dict):
                try:
                    conn.client._on_message(conn, msg)
                except Exception:
                    log.exception("fastws client: failed to handle %r", msg.get("type"))
        elif mt == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif mt == WSMsgType.CLOSE:
            conn.close_code = int(frame.get_close_code().value)
            conn.close_reason = frame.get_close_reason() or ""
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.conn.on_disconnected()


class _Conn:
    """State of one WebSocket connection (one attempt of the reconnect loop)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: WSTransport | None = None
        self.connected = False
        self.pending: dict[int, Callable[[dict[str, Any] | BaseException], None]] = {}
        self.last_rx = time.monotonic()
        self.close_code: int | None = None
        self.close_reason = ""
        self.disconnect_push: dict[str, Any] | None = None
        self.token: str | None = None  # the token in force: opened with, or the last authed
        self.token_changed = asyncio.Event()  # set when an ``auth`` replaced ``token``
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_connected(self, transport: WSTransport) -> None:
        """The upgrade succeeded: requests may be sent on ``transport``."""
        self.transport = transport
        self.connected = True
        self.last_rx = time.monotonic()

    def on_disconnected(self) -> None:
        """The connection is gone: its subscriptions stop holding, ``closed`` resolves."""
        self.connected = False
        if self.client._conn is self:
            self.client._connected.clear()
            for sub in self.client._subs.values():  # at once, not when _run wakes up
                sub._set_subscribed(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, msg: dict[str, Any]) -> None:
        """Send one message as a text frame; :class:`_ConnectionLost` when not connected."""
        if self.transport is None or not self.connected:
            raise _ConnectionLost(ABNORMAL, "not connected")
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))

    def abort(self) -> None:
        """Drop the connection at once, without a close handshake."""
        if self.transport is not None:
            self.transport.disconnect(False)

    def fail_pending(self, exc: BaseException) -> None:
        """Answer every request still waiting for a reply with ``exc``."""
        pending, self.pending = self.pending, {}
        for handler in pending.values():
            handler(exc)


async def open_connection(client: Client, token: str | None) -> _Conn:
    """One connection attempt of ``client`` with ``token``: an open :class:`_Conn`, or raise.

    A 401/403 answer to the upgrade raises :class:`_Terminal` (an
    :class:`~fastws.errors.AuthError`), a 429/503 with ``Retry-After`` raises
    :class:`_RetryAfter`; any other failure raises as picows or the OS reported it.
    """
    headers = dict(client.headers)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = _Conn(client)
    conn.token = token
    try:
        async with asyncio.timeout(client.connect_timeout):
            await ws_connect(
                lambda: _Listener(conn), client.url,
                websocket_handshake_timeout=client.connect_timeout,
                enable_auto_pong=False, enable_auto_ping=False,
                max_frame_size=client.max_frame_size,
                extra_headers=headers or None,
                logger_name="fastws.client",
            )
    except WSHandshakeError as exc:
        status = int(exc.response.status) if exc.response is not None else 0
        if status in (401, 403):
            body = (exc.raw_body or b"").decode("utf-8", "replace").strip()
            raise _Terminal(AuthError(status, body or "token rejected")) from exc
        if status in (429, 503) and exc.response is not None:
            try:
                retry = float(exc.response.headers.get("Retry-After", ""))
            except ValueError:
                retry = 0.0
            if retry > 0:
                raise _RetryAfter(min(retry, 300.0)) from exc
        raise
    if not conn.connected:
        raise ConnectionError("connection lost during the handshake")
    return conn


async def watchdog(conn: _Conn, ping_interval: float, ping_timeout: float) -> None:
    """Probe a quiet connection and drop a dead one (ping-timeout detection).

    After ``ping_interval`` seconds with nothing received the client sends a
    WebSocket ping (the server answers every ping with a pong); if nothing at all
    arrives within ``ping_timeout`` more, the connection is considered dead,
    aborted, and replaced like any lost connection.
    """
    probe_sent: float | None = None  # when the outstanding ping went out
    while conn.connected:
        now = time.monotonic()
        idle = now - conn.last_rx
        if idle < ping_interval:
            await asyncio.sleep(ping_interval - idle + 0.005)
            continue
        if probe_sent is None or conn.last_rx >= probe_sent:  # none, or answered
            probe_sent = now
            if conn.transport is not None:
                conn.transport.send_ping()
        if now - probe_sent >= ping_timeout:
            log.info("fastws client: no data for %.1f s, reconnecting", idle)
            conn.close_code = ABNORMAL
            conn.close_reason = "ping timeout"
            conn.abort()
            return
        await asyncio.sleep(probe_sent + ping_timeout - now + 0.005)
