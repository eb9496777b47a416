"""The :class:`Client` of :mod:`fastws.client` and its :func:`connect` factory.

One :class:`Client` owns a reconnect loop (:meth:`Client._run`), the subscriptions it
re-sends on every connection, the request/reply bookkeeping and the event routing.
The rules it shares with the server come from the server's own modules: channel names
from :mod:`fastws.channels`, close codes and which of them end the client from
:mod:`fastws.codes`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from picows import WSCloseCode

from fastws.channels import normalize
from fastws.client._link import (
    ABNORMAL,
    _Conn,
    _ConnectionLost,
    _RetryAfter,
    _Terminal,
    open_connection,
    watchdog,
)
from fastws.client.events import Event, EventCallback, Subscription
from fastws.client.outbox import OUTBOX_LIMIT, Outbox, new_key
from fastws.client.tokens import backoff_delay, refresh_delay, token_expires_in
from fastws.codes import DISCONNECT_TOKEN_EXPIRED as _EXPIRED
from fastws.codes import Close, Err
from fastws.errors import (
    AuthError,
    ConnectionClosed,
    FastWSError,
    RequestError,
    RequestTimeout,
)

__all__ = ["Client", "TokenSource", "connect"]

log = logging.getLogger("fastws.client")

TokenSource = str | Callable[[], Awaitable[str] | str] | None

_DEDUPE_LIMIT = 65536  # channels remembered for (channel, offset) deduplication


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
    - ``outbox_limit`` (1,000): publications waiting in the offline outbox (see
      :meth:`publish`) before one more is refused with
      :class:`~fastws.client.outbox.OutboxFull`.
    """

    def __init__(self, url: str, token: TokenSource = None, *,
                 request_timeout: float = 10.0, connect_timeout: float = 5.0,
                 ping_interval: float = 25.0, ping_timeout: float = 10.0,
                 backoff_base: float = 0.5, backoff_cap: float = 20.0,
                 rand: Callable[[], float] = random.random,
                 headers: dict[str, str] | None = None,
                 on_state: Callable[[str], Any] | None = None,
                 max_frame_size: int = 16 * 1024 * 1024,
                 token_refresh: bool = True, token_refresh_margin: float = 10.0,
                 outbox_limit: int = OUTBOX_LIMIT) -> None:
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
        self._outbox = Outbox(self._new_id, lambda: self.request_timeout, outbox_limit)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        """Connect (see :meth:`start`); the block's end closes the client."""
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
        return await open_connection(self, await self._token())

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
                self._outbox.flush(conn)  # what was published meanwhile, in order
                self._connected.set()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                else:
                    self.reconnects += 1
                probe = loop.create_task(
                    watchdog(conn, self.ping_interval, self.ping_timeout))
                refresher = loop.create_task(self._refresher(conn)) \
                    if self.token_refresh and callable(self.token) else None
                try:
                    await asyncio.shield(conn.closed)
                finally:
                    probe.cancel()
                    if refresher is not None:
                        refresher.cancel()
                    self._connected.clear()
                    self._conn = None
                self._set_state("disconnected")
                for sub in self._subs.values():
                    sub._set_subscribed(False)
                code = conn.close_code if conn.close_code is not None else ABNORMAL
                reason = conn.close_reason
                push = conn.disconnect_push
                if push is not None:
                    if conn.close_code is None:
                        code = int(push.get("code", code))
                    reason = reason or str(push.get("reason", ""))
                final: ConnectionClosed | None
                if code == _EXPIRED.code and reason == _EXPIRED.reason \
                        and callable(self.token) and conn.token != expired:
                    # Refresh: the next attempt asks the token callable for a new one. The
                    # same expired token given back again stops the client for good.
                    expired = conn.token
                    final = None
                    push = None  # its reconnect:false is about the expired token
                elif code == Close.INVALID_TOKEN:
                    final = AuthError(code, reason)
                elif not Close.should_reconnect(code) or (
                        push is not None and push.get("reconnect") is False):
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
        self._outbox.fail(exc)
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

    async def publish(self, channel: str, data: Any, *, ephemeral: bool = False,
                      echo: bool = True, idempotency_key: str | None = None,
                      **extra: Any) -> dict[str, Any]:
        """Publish ``data`` on ``channel``; returns the ``published`` reply (``offset``,
        ``epoch``; 0 and "" for an ephemeral one).

        Offline outbox (SPEC §13): while the client is not connected the publication
        waits, and goes out, in call order, once it is; one whose connection dropped
        before its reply is sent again, with the same ``idempotency_key`` (made here
        when not given), so it is published once.  The request timeout runs only while
        it is sent.  ``ephemeral``: to current subscribers only, kept nowhere;
        ``echo=False``: this client's own subscriptions do not receive it.
        Raises :class:`~fastws.client.outbox.OutboxFull` when ``outbox_limit``
        publications are already waiting, :class:`~fastws.errors.RequestError` for an
        ``error`` reply, :class:`~fastws.errors.ConnectionClosed` if the client stops
        for good first.
        """
        if self._final is not None:
            raise self._final
        if self._task is None:
            raise FastWSError("client not started: use `async with fastws.connect(...)`")
        msg: dict[str, Any] = {"type": "publish", "channel": channel, "data": data,
                               "idempotency_key": idempotency_key or new_key(), **extra}
        if ephemeral:
            msg["ephemeral"] = True
        if not echo:
            msg["echo"] = False
        return await self._outbox.add(msg, self._conn)

    @property
    def outbox_size(self) -> int:
        """Publications waiting for their ``published`` reply (queued or sent)."""
        return len(self._outbox)

    async def history(self, channel: str, limit: int | None = None,
                      since: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the ``history`` reply: ``publications`` (oldest first; each ``offset``,
        ``data`` and, for a client's publication, ``from``), ``offset``, ``epoch``."""
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
                        since: dict[str, Any] | None = None, last: int | None = None,
                        timeout: float | None = None) -> Subscription:
        """Subscribe to a channel or glob pattern; returns once ``subscribed`` arrived.

        Events go to ``callback`` (a function, or a coroutine function run as a task)
        when given, else to ``async for event in client``. ``since`` (``{"offset",
        "epoch"}``) recovers from a known position; ``last`` (1–100), without a position,
        has the server send the newest ``last`` publications first. The subscription is
        re-sent, with
        the position of its last delivered event, on every reconnect.
        Raises :class:`~fastws.errors.RequestError` (e.g. 403, or 409 when this client
        already holds ``channel``) and :class:`~fastws.errors.RequestTimeout`.
        """
        if self._final is not None:
            raise self._final
        if self._task is None:
            raise FastWSError("client not started: use `async with fastws.connect(...)`")
        channel = normalize(channel)  # events name the channel as the server does
        if channel in self._subs:
            raise RequestError(Err.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}")
        sub = Subscription(self, channel, callback, since)
        sub.last = last
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
            if sub.last:
                msg["last"] = sub.last

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
                if err.code == Err.ALREADY_SUBSCRIBED:  # the server already holds it: fine
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
        sub = self._subs.get(normalize(channel))
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
                      any(s._recovering and s.matches(channel) for s in self._subs.values()),
                      sender=msg.get("from"), ephemeral=msg.get("ephemeral") is True)
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
