"""The fastws Python client (protocol v1, docs/protocol.md sections 4 and 6).

Usage::

    async with fastws.connect("ws://127.0.0.1:8765/ws", token=None) as c:
        await c.subscribe("events:*")
        async for event in c:
            print(event.channel, event.offset, event.data)

The client runs on picows (``picows.ws_connect``) on the running event loop (uvloop or
asyncio). It reconnects by itself with full-jitter exponential backoff, resubscribes
every subscription and recovers each one from the last position it delivered
(``since``), deduplicating events by (channel, offset). It stops for good after a close
in 4500–4999 or a ``disconnect`` push with ``reconnect: false``, except a 4501 "token
expired" when ``token`` is a callable: then it reconnects with a fresh token.

A callable ``token`` whose JWT carries ``exp`` is also refreshed ahead of time, on the
live connection: shortly before ``exp`` the client calls it and sends the new token in an
``auth`` request, so subscriptions and positions carry on without a reconnect (see
:func:`refresh_delay` and :func:`token_expires_in`).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

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

from fastws._match import glob_match
from fastws.errors import (
    AuthError,
    ConnectionClosed,
    FastWSError,
    RequestError,
    RequestTimeout,
)

__all__ = [
    "Client",
    "Event",
    "Subscription",
    "backoff_delay",
    "connect",
    "is_pattern",
    "normalize_channel",
    "refresh_delay",
    "token_claims",
    "token_expires_in",
]

log = logging.getLogger("fastws.client")

TokenSource = str | Callable[[], Awaitable[str] | str] | None
EventCallback = Callable[["Event"], Any]

_PATTERN_CHARS = frozenset("*?[\\")
_DEDUPE_LIMIT = 65536  # channels remembered for (channel, offset) deduplication
_REFRESH_SPREAD_CAP = 60.0  # seconds: the most a refresh is moved earlier by jitter


def is_pattern(channel: str) -> bool:
    """True when ``channel`` holds ``*``, ``?``, ``[`` or ``\\`` (a Redis glob pattern)."""
    return not _PATTERN_CHARS.isdisjoint(channel)


def normalize_channel(channel: str) -> str:
    """The name the server uses: ``wallet:`` addresses are lower-cased (protocol §5)."""
    if channel.startswith("wallet:") and not is_pattern(channel):
        return channel.lower()
    return channel


def backoff_delay(failures: int, *, base: float = 0.5, cap: float = 20.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Delay before the next attempt after the ``failures``-th failure in a row (0-based).

    Full jitter: uniform in [0, min(cap, base * 2**failures)]. ``rand`` returns a float
    in [0, 1) (``random.random`` by default; inject your own for tests).
    """
    ceiling = min(cap, base * (2.0 ** min(failures, 64)))
    return rand() * ceiling


def token_claims(token: str) -> dict[str, Any] | None:
    """The claims (payload) of a JWT, decoded *without* verifying its signature.

    Only for timing the token's refresh: the server is what verifies tokens. Returns None
    when ``token`` is not a JWT (three base64url parts whose middle one is a JSON object),
    e.g. an opaque token: such a token is then never refreshed ahead of time.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = orjson.loads(raw)
    except ValueError:  # binascii.Error, non-ASCII text and orjson.JSONDecodeError alike
        return None
    return claims if isinstance(claims, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def token_expires_in(token: str, now: float | None = None) -> float | None:
    """Seconds until the JWT ``token`` expires by its ``exp`` claim, or None without one.

    The client's clock (``time.time()``, or ``now``) is used, checked against the
    token's ``iat`` when it has one: a token issued "in the future" (the client's clock
    is behind the issuer's) or already past ``exp`` (the client's clock is ahead: the
    server has just accepted it) is taken to have its whole lifetime, ``exp - iat``,
    left. A fast clock otherwise only makes the refresh come early. None also when
    the token has expired by every measure (nothing to time).
    """
    claims = token_claims(token)
    if claims is None:
        return None
    exp = _number(claims.get("exp"))
    if exp is None:
        return None
    left = exp - (time.time() if now is None else now)
    iat = _number(claims.get("iat"))
    if iat is not None and exp > iat:
        lifetime = exp - iat
        if left > lifetime or left <= 0:  # the clocks disagree: trust the token's own span
            left = lifetime
    return left if left > 0 else None


def refresh_delay(remaining: float, *, margin: float = 10.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before refreshing a token that expires in ``remaining`` seconds.

    The refresh comes ``min(margin, remaining / 5)`` before expiry (i.e. at
    ``max(remaining - margin, 80 % of remaining)``), moved earlier by a random jitter of
    up to ``min(remaining / 10, 60 s)`` so that clients whose tokens expire together do
    not all ask for new ones at once. ``rand`` returns a float in [0, 1).
    """
    if remaining <= 0:
        return 0.0
    lead = min(margin, remaining / 5.0)
    jitter = rand() * min(remaining / 10.0, _REFRESH_SPREAD_CAP)
    return max(0.0, remaining - lead - jitter)


class Event:
    """One ``event`` push: ``channel``, ``data``, ``offset`` and ``epoch``.

    ``offset`` and ``epoch`` are None for publications without history (e.g. a raw
    Redis ``PUBLISH``). ``recovered`` is True for an event the server replayed while a
    subscription was being recovered after a reconnect (missed while disconnected),
    False for a live one; it takes no part in equality.
    """

    __slots__ = ("channel", "data", "offset", "epoch", "recovered")

    def __init__(self, channel: str, data: Any, offset: int | None = None,
                 epoch: str | None = None, recovered: bool = False) -> None:
        self.channel = channel
        self.data = data
        self.offset = offset
        self.epoch = epoch
        self.recovered = recovered

    def __repr__(self) -> str:
        return (f"Event(channel={self.channel!r}, offset={self.offset!r}, "
                f"epoch={self.epoch!r}, data={self.data!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.channel, self.offset, self.epoch, self.data) == (
            other.channel, other.offset, other.epoch, other.data)

    __hash__ = None  # type: ignore[assignment]  # data may be unhashable


class Subscription:
    """A channel or pattern subscription of one :class:`Client`.

    ``offset``/``epoch`` hold the position of the last event delivered for it (the
    ``since`` of its next recovery); ``recovered`` is the flag of the latest
    ``subscribed`` reply; ``subscribed`` is True while the current connection holds it
    (False while disconnected or resubscribing). Events go to ``callback`` when one was
    given, else to the client's ``async for``.
    """

    __slots__ = ("client", "channel", "callback", "pattern", "offset", "epoch",
                 "recovered", "subscribed", "active", "error", "_ready", "_live", "_recovering",
                 "last_channel")

    def __init__(self, client: Client, channel: str, callback: EventCallback | None,
                 since: dict[str, Any] | None) -> None:
        self.client = client
        self.channel = channel
        self.callback = callback
        self.pattern = is_pattern(channel)
        self.offset: int | None = since.get("offset") if since else None
        self.epoch: str | None = since.get("epoch") if since else None
        self.last_channel: str | None = since.get("channel") if since else None
        self.recovered: bool | None = None
        self.subscribed = False
        self.active = True
        self.error: FastWSError | None = None
        self._ready: asyncio.Future[None] | None = None
        self._live = asyncio.Event()  # set while ``subscribed`` holds
        self._recovering = False  # a subscribe with ``since`` awaits its reply

    def _set_subscribed(self, value: bool) -> None:
        self.subscribed = value
        self._recovering = False
        if value:
            self._live.set()
        else:
            self._live.clear()

    async def wait_subscribed(self, timeout: float | None = None) -> bool | None:
        """Wait until the current connection holds this subscription; return ``recovered``.

        Call it after a reconnect to know how the resubscription ended: the replayed
        events (if any) have been delivered when it returns, and the result is the
        ``recovered`` flag of that ``subscribed`` reply (None when no ``since`` was
        sent). Raises :class:`~fastws.errors.RequestTimeout` past ``timeout``,
        :class:`~fastws.errors.ConnectionClosed` once the client has stopped for good,
        and the subscription's error if the server refused it on a resubscribe.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.error is not None:
                        raise self.error
                    final = self.client._final
                    if final is not None:
                        raise final
                    if self.subscribed:
                        return self.recovered
                    await self._live.wait()
        except TimeoutError:
            raise RequestTimeout(
                f"{self.channel!r} not subscribed within {timeout} s") from None

    def since(self) -> dict[str, Any] | None:
        """The ``since`` position to recover from, or None when nothing was delivered."""
        if self.offset is None:
            return None
        if self.pattern and self.last_channel:  # the server finds it in the namespace log
            return {"offset": self.offset, "epoch": self.epoch or "",
                    "channel": self.last_channel}
        return {"offset": self.offset, "epoch": self.epoch or ""}

    def matches(self, channel: str) -> bool:
        """Whether an event published on ``channel`` belongs to this subscription."""
        if self.pattern:
            return glob_match(self.channel, channel)
        return self.channel == channel

    async def unsubscribe(self) -> None:
        """Stop this subscription (and tell the server if connected)."""
        await self.client._unsubscribe(self)

    def __repr__(self) -> str:
        return (f"Subscription({self.channel!r}, offset={self.offset!r}, "
                f"epoch={self.epoch!r}, active={self.active})")


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
        self.transport = transport
        self.connected = True
        self.last_rx = time.monotonic()

    def on_disconnected(self) -> None:
        self.connected = False
        if self.client._conn is self:
            self.client._connected.clear()
            for sub in self.client._subs.values():  # at once, not when _run wakes up
                sub._set_subscribed(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, msg: dict[str, Any]) -> None:
        if self.transport is None or not self.connected:
            raise _ConnectionLost(1006, "not connected")
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(False)

    def fail_pending(self, exc: BaseException) -> None:
        pending, self.pending = self.pending, {}
        for handler in pending.values():
            handler(exc)


class Client:
    """A fastws connection that reconnects by itself. Create it with :func:`connect`.

    Options (keyword-only):

    - ``request_timeout`` (10 s): how long a request waits for its reply, waiting for a
      connection included; then :class:`~fastws.errors.RequestTimeout`.
    - ``connect_timeout`` (5 s): TCP connect plus WebSocket handshake, per attempt.
    - ``ping_interval`` (25 s) and ``ping_timeout`` (10 s): after ``ping_interval`` with
      no data from the server the client sends a WebSocket ping; with nothing back within
      ``ping_timeout`` the connection is considered dead and the client reconnects.
    - ``backoff_base`` (0.5 s), ``backoff_cap`` (20 s), ``rand`` (``random.random``):
      after the n-th failed attempt in a row the client waits
      ``rand() * min(backoff_cap, backoff_base * 2**n)``.
    - ``headers``: extra HTTP headers for the upgrade request.
    - ``on_state``: called with ``"connecting"``, ``"connected"``, ``"disconnected"``
      or ``"closed"``.
    - ``max_frame_size`` (16 MiB): largest frame accepted from the server.
    - ``token_refresh`` (True) and ``token_refresh_margin`` (10 s): with a callable
      ``token`` whose JWT has an ``exp`` claim, call it again before ``exp`` (see
      :func:`refresh_delay`) and send the new token in an ``auth`` request on the live
      connection; a failed refresh (the callable raises, or the server answers an
      error) is retried with the backoff above until ``exp``, after which the server's
      4501 "token expired" close makes the client reconnect with a fresh token.
      ``token_refreshes`` counts the refreshes that succeeded.
    """

    def __init__(self, url: str, token: TokenSource = None, *,
                 request_timeout: float = 10.0, connect_timeout: float = 5.0,
                 ping_interval: float = 25.0, ping_timeout: float = 10.0,
                 backoff_base: float = 0.5, backoff_cap: float = 20.0,
                 rand: Callable[[], float] = random.random,
                 headers: dict[str, str] | None = None,
                 on_state: Callable[[str], Any] | None = None,
                 max_frame_size: int = 16 * 1024 * 1024,
                 token_refresh: bool = True, token_refresh_margin: float = 10.0) -> None:
        if token is not None and not isinstance(token, str) and not callable(token):
            raise TypeError(f"token must be a string, a callable or None, not "
                            f"{type(token).__name__}")
        if token_refresh_margin < 0:
            raise ValueError("token_refresh_margin must be >= 0 seconds")
        self.url = url
        self.token = token
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.rand = rand
        self.headers = dict(headers or {})
        self.on_state = on_state
        self.max_frame_size = max_frame_size
        self.token_refresh = token_refresh
        self.token_refresh_margin = token_refresh_margin
        self.state = "disconnected"
        self.reconnects = 0  # successful connections after the first one
        self.token_refreshes = 0  # tokens replaced on a live connection by the refresher
        self._subs: dict[str, Subscription] = {}
        self._conn: _Conn | None = None
        self._next_id = 0
        self._queue: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._connected = asyncio.Event()
        self._last: dict[str, tuple[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._final: ConnectionClosed | None = None  # set once stopped for good
        self._user_closed = False
        self._bg: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __await__(self):  # type: ignore[no-untyped-def]
        """``c = await fastws.connect(url)`` works like ``async with``, without the close."""
        return self.__aenter__().__await__()

    async def start(self) -> None:
        """Connect (retrying like any reconnect) and return once the first connection is up.

        Raises :class:`~fastws.errors.AuthError` if the token is rejected and
        :class:`~fastws.errors.ConnectionClosed` if the server refuses for good.
        """
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._first = loop.create_future()
            self._task = loop.create_task(self._run())
        assert self._first is not None
        try:
            await asyncio.shield(self._first)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection for good; ``async for`` ends, pending calls raise."""
        if self._user_closed:
            return
        self._user_closed = True
        if self._final is None:
            self._final = ConnectionClosed(1000, "closed by the client")
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.connected:
            conn.transport.send_close(WSCloseCode.OK)
            conn.transport.disconnect()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if conn is not None:
            conn.fail_pending(self._final)
        self._finish(self._final)
        for t in list(self._bg):
            t.cancel()

    @property
    def connected(self) -> bool:
        """Whether a connection is currently open."""
        return self._conn is not None and self._conn.connected

    @property
    def closed(self) -> bool:
        """Whether the client has stopped for good (see :attr:`close_error`)."""
        return self._final is not None

    @property
    def close_error(self) -> ConnectionClosed | None:
        """Why the client stopped for good, or None while it runs."""
        return self._final

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("fastws client: on_state callback failed")

    # ------------------------------------------------------------- connect loop

    async def _token(self) -> str | None:
        tok = self.token
        if tok is None or isinstance(tok, str):
            return tok
        value = tok()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _open(self) -> _Conn:
        """One connection attempt: returns an open connection or raises."""
        token = await self._token()
        headers = dict(self.headers)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = _Conn(self)
        conn.token = token
        try:
            async with asyncio.timeout(self.connect_timeout):
                await ws_connect(
                    lambda: _Listener(conn), self.url,
                    websocket_handshake_timeout=self.connect_timeout,
                    enable_auto_pong=False, enable_auto_ping=False,
                    max_frame_size=self.max_frame_size,
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

    async def _run(self) -> None:
        failures = 0
        min_wait = 0.0
        first = True
        expired: str | None = None  # the last token the server closed as expired
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not first:
                    delay = max(min_wait, backoff_delay(
                        failures, base=self.backoff_base, cap=self.backoff_cap, rand=self.rand))
                    failures += 1
                    min_wait = 0.0
                    if delay > 0:
                        await asyncio.sleep(delay)
                first = False
                self._set_state("connecting")
                try:
                    conn = await self._open()
                except _Terminal:
                    raise
                except _RetryAfter as exc:
                    log.info("fastws client: %s asks to retry after %s s", self.url, exc.seconds)
                    min_wait = exc.seconds
                    continue
                except ConnectionClosed as exc:  # e.g. raised by a token callable
                    raise _Terminal(exc) from exc
                except Exception as exc:
                    log.info("fastws client: connecting to %s failed: %r", self.url, exc)
                    continue
                failures = 0
                self._conn = conn
                self._set_state("connected")
                self._resubscribe(conn)
                self._connected.set()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                else:
                    self.reconnects += 1
                watchdog = loop.create_task(self._watchdog(conn))
                refresher = loop.create_task(self._refresher(conn)) \
                    if self.token_refresh and callable(self.token) else None
                try:
                    await asyncio.shield(conn.closed)
                finally:
                    watchdog.cancel()
                    if refresher is not None:
                        refresher.cancel()
                    self._connected.clear()
                    self._conn = None
                self._set_state("disconnected")
                for sub in self._subs.values():
                    sub._set_subscribed(False)
                code = conn.close_code if conn.close_code is not None else 1006
                reason = conn.close_reason
                push = conn.disconnect_push
                if push is not None:
                    if conn.close_code is None:
                        code = int(push.get("code", code))
                    reason = reason or str(push.get("reason", ""))
                final: ConnectionClosed | None
                if code == 4501 and reason == "token expired" and callable(self.token) \
                        and conn.token != expired:
                    # Refresh: the next attempt asks the token callable for a new one. The
                    # same expired token given back again stops the client for good.
                    expired = conn.token
                    final = None
                    push = None  # its reconnect:false is about the expired token
                elif code == 4501:
                    final = AuthError(code, reason)
                elif 4500 <= code <= 4999 or (push is not None and push.get("reconnect") is False):
                    final = ConnectionClosed(code, reason)
                else:
                    final = None
                conn.fail_pending(final or _ConnectionLost(code, reason))
                if final is not None:
                    raise _Terminal(final)
                if push is not None:
                    try:
                        min_wait = float(push.get("after_ms", 0)) / 1000.0
                    except (TypeError, ValueError):
                        min_wait = 0.0
                log.info("fastws client: connection closed (%s %s), reconnecting", code, reason)
        except _Terminal as term:
            self._final = term.exc
            self._finish(term.exc)
        except asyncio.CancelledError:
            current = self._conn
            if current is not None:
                current.abort()
            raise

    async def _watchdog(self, conn: _Conn) -> None:
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
            if idle < self.ping_interval:
                await asyncio.sleep(self.ping_interval - idle + 0.005)
                continue
            if probe_sent is None or conn.last_rx >= probe_sent:  # none, or answered
                probe_sent = now
                if conn.transport is not None:
                    conn.transport.send_ping()
            if now - probe_sent >= self.ping_timeout:
                log.info("fastws client: no data for %.1f s, reconnecting", idle)
                conn.close_code = 1006
                conn.close_reason = "ping timeout"
                conn.abort()
                return
            await asyncio.sleep(probe_sent + self.ping_timeout - now + 0.005)

    async def _nap(self, conn: _Conn, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if an ``auth`` replaced the token meanwhile."""
        try:
            async with asyncio.timeout(delay):
                await conn.token_changed.wait()
        except TimeoutError:
            return False
        conn.token_changed.clear()
        return True

    async def _refresher(self, conn: _Conn) -> None:
        """Replace the connection's token before its ``exp``, without reconnecting.

        Runs while ``conn`` is open, when ``token`` is a callable: shortly before the
        token in force expires (:func:`refresh_delay`) it asks the callable for a new one
        and sends it in an ``auth`` request. A failure (the callable raises or gives back
        the same token, the server answers an error) is retried with the reconnect
        backoff as long as the next try comes before ``exp``; after that the server
        closes 4501 "token expired" and the reconnect path takes over.
        """
        loop = asyncio.get_running_loop()
        while conn.connected:
            token = conn.token
            left = token_expires_in(token) if token else None
            if left is None:  # no exp (or not a JWT): wait for a manual auth() with one
                await conn.token_changed.wait()
                conn.token_changed.clear()
                continue
            expires = loop.time() + left
            if await self._nap(conn, refresh_delay(
                    left, margin=self.token_refresh_margin, rand=self.rand)):
                continue
            failures = 0
            while True:
                try:
                    new = await self._token()
                    if self._conn is not conn or not conn.connected:
                        return
                    if not new:
                        raise FastWSError("the token callable gave no token")
                    if new == token:
                        raise FastWSError("the token callable gave back the current token")
                    await self.request({"type": "auth", "token": new}, resend=False)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._conn is not conn or not conn.connected:
                        return
                    delay = backoff_delay(failures, base=self.backoff_base,
                                          cap=self.backoff_cap, rand=self.rand)
                    failures += 1
                    if loop.time() + delay >= expires:
                        log.warning("fastws client: token refresh failed (%s); giving up: at "
                                    "exp the server closes 4501 and the client reconnects",
                                    exc)
                        return
                    log.info("fastws client: token refresh failed (%s), retrying in %.2f s",
                             exc, delay)
                    if await self._nap(conn, delay):
                        break  # a manual auth() gave a new token: time that one
                    continue
                conn.token = new
                self.token_refreshes += 1
                log.debug("fastws client: token refreshed on the live connection")
                break

    def _finish(self, exc: ConnectionClosed) -> None:
        """Stopped for good: wake everybody with ``exc``."""
        self._set_state("closed")
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)
            self._first.exception()  # mark retrieved: start() re-raises it
        conn = self._conn
        if conn is not None:
            conn.fail_pending(exc)
        for sub in self._subs.values():
            if sub._ready is not None and not sub._ready.done():
                sub._ready.set_exception(exc)
                sub._ready.exception()
            sub._live.set()  # wait_subscribed() re-checks and raises
        self._connected.set()  # waiters re-check self._final
        self._wakeup.set()

    # ---------------------------------------------------------------- requests

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _wait_connected(self) -> _Conn:
        while True:
            if self._final is not None:
                raise self._final
            conn = self._conn
            if conn is not None and conn.connected:
                return conn
            if self._task is None:
                raise FastWSError("client not started: use `async with fastws.connect(...)`")
            await self._connected.wait()

    async def request(self, msg: dict[str, Any], *, timeout: float | None = None,
                      resend: bool = True) -> dict[str, Any]:
        """Send one protocol request and return its reply.

        Waits for a connection first. A request whose connection drops before the reply
        is sent again on the next connection when ``resend`` is true; otherwise it raises
        :class:`~fastws.errors.ConnectionClosed` with ``final=False``.
        Raises :class:`~fastws.errors.RequestError` for an ``error`` reply and
        :class:`~fastws.errors.RequestTimeout` past ``timeout`` (default
        ``request_timeout``).
        """
        timeout = self.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    conn = await self._wait_connected()
                    fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                    rid = self._new_id()

                    def handler(reply: dict[str, Any] | BaseException,
                                fut: asyncio.Future[dict[str, Any]] = fut) -> None:
                        if fut.done():
                            return
                        if isinstance(reply, BaseException):
                            fut.set_exception(reply)
                        else:
                            fut.set_result(reply)

                    conn.pending[rid] = handler
                    try:
                        conn.send({**msg, "id": rid})
                        reply = await fut
                    except _ConnectionLost as lost:
                        if resend:
                            continue
                        raise ConnectionClosed(lost.code, lost.reason, final=False) from None
                    finally:
                        conn.pending.pop(rid, None)
                    if reply.get("type") == "error":
                        raise RequestError(int(reply.get("code", 0)), str(reply.get("message", "")))
                    return reply
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to {msg.get('type')!r} within {timeout} s") from None

    async def publish(self, channel: str, data: Any, **extra: Any) -> dict[str, Any]:
        """Publish ``data`` on ``channel``; returns the ``published`` reply (offset, epoch).

        Not sent again if the connection drops before the reply: that raises
        :class:`~fastws.errors.ConnectionClosed` with ``final=False``.
        """
        return await self.request({"type": "publish", "channel": channel, "data": data,
                                   **extra}, resend=False)

    async def history(self, channel: str, limit: int | None = None,
                      since: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the ``history`` reply: ``publications`` (oldest first), ``offset``, ``epoch``."""
        msg: dict[str, Any] = {"type": "history", "channel": channel}
        if limit is not None:
            msg["limit"] = limit
        if since is not None:
            msg["since"] = since
        return await self.request(msg)

    async def presence(self, channel: str) -> dict[str, Any]:
        """Return the ``presence`` reply; its ``clients`` lists ``{client, user}`` objects."""
        return await self.request({"type": "presence", "channel": channel})

    async def auth(self, token: str) -> dict[str, Any]:
        """Authenticate the open connection with an ``auth`` message; returns ``authed``.

        The token refresher (callable ``token``) then times its next refresh from this
        token's ``exp``.
        """
        if not isinstance(token, str) or not token:
            raise TypeError("token must be a non-empty string")
        reply = await self.request({"type": "auth", "token": token})
        conn = self._conn
        if conn is not None and conn.connected:
            conn.token = token
            conn.token_changed.set()
        return reply

    async def ping(self) -> float:
        """Send a ``ping`` request; returns the round trip in seconds."""
        t0 = time.perf_counter()
        await self.request({"type": "ping"})
        return time.perf_counter() - t0

    # ----------------------------------------------------------- subscriptions

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The active subscriptions by channel or pattern (a copy)."""
        return dict(self._subs)

    async def subscribe(self, channel: str, callback: EventCallback | None = None, *,
                        since: dict[str, Any] | None = None,
                        timeout: float | None = None) -> Subscription:
        """Subscribe to a channel or glob pattern; returns once ``subscribed`` arrived.

        Events go to ``callback`` (a function, or a coroutine function run as a task)
        when given, else to ``async for event in client``. ``since`` (``{"offset",
        "epoch"}``) recovers from a known position. The subscription is re-sent, with
        the position of its last delivered event, on every reconnect.
        Raises :class:`~fastws.errors.RequestError` (e.g. 403, or 409 when this client
        already holds ``channel``) and :class:`~fastws.errors.RequestTimeout`.
        """
        if self._final is not None:
            raise self._final
        if self._task is None:
            raise FastWSError("client not started: use `async with fastws.connect(...)`")
        channel = normalize_channel(channel)  # events name the channel as the server does
        if channel in self._subs:
            raise RequestError(409, f"already subscribed to {channel!r}")
        sub = Subscription(self, channel, callback, since)
        sub._ready = asyncio.get_running_loop().create_future()
        self._subs[channel] = sub
        conn = self._conn
        if conn is not None and conn.connected:
            self._send_subscribe(conn, sub)
        timeout = self.request_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(sub._ready), timeout)
        except TimeoutError:
            self._drop(sub)
            self._spawn(self._server_unsubscribe(channel))
            raise RequestTimeout(f"no 'subscribed' for {channel!r} within {timeout} s") from None
        return sub

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _resubscribe(self, conn: _Conn) -> None:
        for sub in list(self._subs.values()):
            self._send_subscribe(conn, sub)

    def _send_subscribe(self, conn: _Conn, sub: Subscription) -> None:
        sub._set_subscribed(False)
        sub.recovered = None  # until this subscribe's reply says
        rid = self._new_id()
        msg: dict[str, Any] = {"id": rid, "type": "subscribe", "channel": sub.channel}
        since = sub.since()
        if since is not None:
            msg["since"] = since
            sub._recovering = True  # what comes before the reply is the replay
        else:
            msg["positioned"] = True  # the reply says where the stream is: recover from there

        def handler(reply: dict[str, Any] | BaseException) -> None:
            if isinstance(reply, BaseException):
                if isinstance(reply, ConnectionClosed) and sub._ready is not None \
                        and not sub._ready.done():
                    sub._ready.set_exception(reply)
                    sub._ready.exception()
                return  # connection lost: the next connection resubscribes
            if self._subs.get(sub.channel) is not sub:
                return  # unsubscribed meanwhile
            if reply.get("type") == "error":
                err = RequestError(int(reply.get("code", 0)), str(reply.get("message", "")))
                if err.code == 409:  # the server already holds it: fine
                    self._subscribed(sub, {})
                    return
                self._drop(sub)
                sub.error = err
                sub._live.set()  # wait_subscribed() raises it
                if sub._ready is not None and not sub._ready.done():
                    sub._ready.set_exception(err)
                    sub._ready.exception()
                else:
                    log.warning("fastws client: resubscribing %r failed: %s", sub.channel, err)
                return
            self._subscribed(sub, reply)

        conn.pending[rid] = handler
        try:
            conn.send(msg)
        except _ConnectionLost:
            conn.pending.pop(rid, None)

    def _subscribed(self, sub: Subscription, reply: dict[str, Any]) -> None:
        if "recovered" in reply:
            sub.recovered = bool(reply["recovered"])
        if not sub.recovered and "offset" in reply and "epoch" in reply \
                and reply["epoch"] != sub.epoch and not (sub.pattern and sub.last_channel):
            # a pattern's reply position is in the namespace log: kept only until an
            # event (already delivered ones are newer) names a channel
            sub.offset, sub.epoch = reply["offset"], reply["epoch"]
        sub._set_subscribed(True)
        if sub._ready is not None and not sub._ready.done():
            sub._ready.set_result(None)

    def _drop(self, sub: Subscription) -> None:
        sub.active = False
        sub._set_subscribed(False)
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]

    async def _server_unsubscribe(self, channel: str) -> None:
        if self._final is not None or channel in self._subs:
            return
        conn = self._conn
        if conn is None or not conn.connected:
            return  # the next connection will not resubscribe it
        try:
            await self.request({"type": "unsubscribe", "channel": channel}, resend=False)
        except FastWSError:
            pass

    async def _unsubscribe(self, sub: Subscription) -> None:
        if not sub.active:
            return
        self._drop(sub)
        await self._server_unsubscribe(sub.channel)

    async def unsubscribe(self, channel: str) -> None:
        """Unsubscribe from ``channel`` (a channel or pattern given to :meth:`subscribe`)."""
        sub = self._subs.get(normalize_channel(channel))
        if sub is not None:
            await self._unsubscribe(sub)

    # ----------------------------------------------------------------- inbound

    def _on_message(self, conn: _Conn, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if rid is not None:
            handler = conn.pending.pop(rid, None)
            if handler is not None:
                handler(msg)
            return
        kind = msg.get("type")
        if kind == "event":
            self._on_event(msg)
        elif kind == "disconnect":
            conn.disconnect_push = msg

    def _on_event(self, msg: dict[str, Any]) -> None:
        channel = msg.get("channel")
        if not isinstance(channel, str):
            return
        offset = msg.get("offset")
        epoch = msg.get("epoch")
        if offset is not None:
            key_epoch = epoch or ""
            last = self._last.get(channel)
            if last is not None and last[0] == key_epoch and offset <= last[1]:
                return  # already delivered (recovery overlap)
            if last is not None:
                del self._last[channel]  # keep insertion order ~ recency
            elif len(self._last) >= _DEDUPE_LIMIT:
                del self._last[next(iter(self._last))]
            self._last[channel] = (key_epoch, offset)
        event = Event(channel, msg.get("data"), offset, epoch,
                      any(s._recovering and s.matches(channel) for s in self._subs.values()))
        to_queue = False
        for sub in self._subs.values():
            if not sub.matches(channel):
                continue
            if offset is not None:
                sub.offset = offset
                sub.epoch = epoch
                sub.last_channel = channel  # a pattern's position names its channel
            cb = sub.callback
            if cb is None:
                to_queue = True
                continue
            try:
                res = cb(event)
                if inspect.isawaitable(res):
                    self._spawn(res)
            except Exception:
                log.exception("fastws client: callback for %r failed", sub.channel)
        if to_queue:
            self._queue.append(event)
            self._wakeup.set()

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        """Next event of the subscriptions without callback.

        Ends when the client is closed by its owner; raises
        :class:`~fastws.errors.ConnectionClosed` (or :class:`~fastws.errors.AuthError`)
        once the server has stopped it for good and queued events are drained.
        """
        while not self._queue:
            if self._final is not None:
                if self._user_closed:
                    raise StopAsyncIteration
                raise self._final
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event (like one step of ``async for``), waiting at most ``timeout``."""
        if timeout is None:
            return await self.__anext__()
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            raise RequestTimeout(f"no event within {timeout} s") from None


def connect(url: str, token: TokenSource = None, **opts: Any) -> Client:
    """Create a :class:`Client` for ``url``; use it as ``async with fastws.connect(url) as c``.

    ``token`` is a string or a callable (sync or async) returning one, called before each
    connection attempt; it is sent as ``Authorization: Bearer``. A callable is also
    called shortly before the token in force expires (its JWT ``exp``), and the new token
    is sent in an ``auth`` request on the live connection: no reconnect (options
    ``token_refresh``, ``token_refresh_margin``). When the server closes a connection
    because its token expired anyway (4501 "token expired": the refresh kept failing), a
    callable is asked for a fresh token and the client reconnects (a string token cannot
    be refreshed: that raises :class:`~fastws.errors.AuthError`, as does a callable
    giving back the token that just expired). Entering the block connects, retrying
    with backoff like any reconnect, and raises :class:`~fastws.errors.AuthError` if the
    token is rejected.
    ``opts`` are the keyword options of :class:`Client`.
    """
    return Client(url, token, **opts)
