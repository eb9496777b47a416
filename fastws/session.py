"""One client's protocol session, sans I/O: every rule a transport must apply.

A :class:`Session` holds what the server knows of one client (its id, user, token
grants, subscriptions, rate-limit buckets) and applies the protocol's rules to it.
It imports no asyncio, picows, uvloop, socket, redis or aiohttp: the transports
(the WebSocket adapter in :mod:`fastws.server`; SSE, long-poll and HTTP calls in
:mod:`fastws.fallback`) feed it decoded messages and carry out what it says, and tests drive it with
no sockets at all (tests/test_session.py).

How a transport uses it:

* :meth:`Session.receive` with each complete text message: it spends a message
  token, parses the request and answers what needs no I/O (``ping``, every error).
  It returns the :class:`~fastws.protocol.Request` the node must carry out (a
  subscribe, publish, …) or None.
* The node, carrying out a request, calls the session's checks
  (:meth:`Session.begin_subscribe`, :meth:`Session.check`,
  :meth:`Session.authenticate`) before any I/O, and :meth:`Session.set_identity`
  after an ``auth``.
* Out of the session come three things, through methods the transport implements:
  :meth:`Session.send_text` (a reply or push, in order with publications),
  :meth:`Session.disconnect` (the ``disconnect`` push, then close with its code) and
  :meth:`Session.arm_expiry` (close with 4501 when the token's ``exp`` passes).

The state lives in the concrete class's ``__slots__`` (:data:`SESSION_SLOTS`): the
WebSocket listener inherits from :class:`Session` so that each connection stays one
Python object (~120 B less per connection than a separate session object);
:class:`BufferedSession` is the standalone form that collects its output in lists.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from fastws import channels, protocol
from fastws.auth.tokens import AuthError, Identity
from fastws.codes import DISCONNECT_RATE_LIMITED, DISCONNECT_TOKEN_REVOKED, Disconnect, Err
from fastws.limits import Bucket, request_id
from fastws.permissions import Permissions
from fastws.protocol import ProtocolError, Request

__all__ = ["SESSION_SLOTS", "Session", "SessionHost", "BufferedSession", "Backend"]

#: the per-client state every concrete session class declares in its ``__slots__``
SESSION_SLOTS = ("host", "client_id", "user", "subs", "grants", "iat", "jti",
                 "msg_bucket", "strikes", "sub_bucket", "backend")


class Backend:
    """What the application's backend integration keeps of one session (SPEC §11-12),
    made only for sessions that use it: the ``meta`` of the connect proxy's result
    (None for JWT sessions), the proxy calls outstanding (``in_flight``, at most
    ``[proxy] max_in_flight``), and for the lifecycle stream the session's
    ``transport`` name and client ``ip`` and whether its ``connect`` record was
    written (``logged``)."""

    __slots__ = ("meta", "in_flight", "transport", "ip", "logged")

    def __init__(self, meta: Any = None, transport: str = "websocket", ip: str = "") -> None:
        self.meta = meta
        self.in_flight = 0
        self.transport = transport
        self.ip = ip
        self.logged = False


class SessionHost(Protocol):
    """What a session needs from the process serving it (the node implements it)."""

    config: Any                       # fastws.config.Config (the live one)
    permissions: Permissions
    errors: Any                       # Counter[int]: error replies sent, by code
    rate_limited: Any                 # Counter[str]: refusals, by limit
    messages_received: int

    def verify_token(self, token: str) -> Identity:
        """The token's identity (raises AuthError)."""

    def revoked(self, user: str, issued: float | None, jti: str | None) -> bool:
        """True when a revocation refuses this token."""


class Session:
    """The protocol rules for one client (see the module docstring).

    The attributes (declared by the concrete class, see :data:`SESSION_SLOTS`):
    ``host`` (:class:`SessionHost`), ``client_id``, ``user`` (None until
    authenticated), ``subs`` (names in subscription order, None when none),
    ``grants`` (the token's ``channels`` claim), ``iat``/``jti`` (what a revocation is
    checked on) and the ``msg_bucket``/``strikes``/``sub_bucket`` token buckets.
    """

    __slots__ = ()

    host: SessionHost
    client_id: str
    user: str | None
    subs: list[str] | None
    grants: tuple[str, ...] | None
    iat: float | None
    jti: str | None
    msg_bucket: Bucket | None
    strikes: Bucket | None
    sub_bucket: Bucket | None
    backend: Backend | None
    closing: bool                     # ended or ending: nothing more is sent (transport's)

    def init_session(self, host: SessionHost, client_id: str) -> None:
        """Set the initial state (call once, from the concrete class's ``__init__``)."""
        self.host = host
        self.client_id = client_id
        self.user = None
        self.subs = None
        self.grants = None
        self.iat = None
        self.jti = None
        self.msg_bucket = None
        self.strikes = None
        self.sub_bucket = None
        self.backend = None

    def backend_state(self) -> Backend:
        """This session's :class:`Backend` state (made on first use)."""
        if self.backend is None:
            self.backend = Backend()
        return self.backend

    # ------------------------------------------------------------ transport hooks

    def send_text(self, payload: bytes) -> None:
        """Send one protocol message (a reply or a push) after everything queued."""
        raise NotImplementedError

    def disconnect(self, d: Disconnect, after_ms: int | None = None) -> None:
        """Send the ``disconnect`` push, then end the session with ``d.code``."""
        raise NotImplementedError

    def arm_expiry(self, at: float | None) -> None:
        """Disconnect with 4501 "token expired" at wall-clock time ``at`` (replacing
        any earlier deadline); None cancels it."""
        raise NotImplementedError

    # ------------------------------------------------------------ messages

    def receive(self, payload: bytes, now: float | None = None) -> Request | None:
        """Take one complete text message of the client.

        Returns the request the node must carry out, or None when the message was
        answered here (``ping``; an error reply; a rate-limit refusal, which may close
        the session with 4029).
        """
        host = self.host
        host.messages_received += 1
        now = time.monotonic() if now is None else now
        if self._rate_limited(payload, now):
            return None
        try:
            req = protocol.parse(payload, host.config.limits.max_channel_length)
        except ProtocolError as exc:
            self.error(exc)
            return None
        if req.type == "ping":
            self.send_text(protocol.reply(req.id, "pong"))
            return None
        return req

    def error(self, exc: ProtocolError) -> None:
        """Answer a refused request with an ``error`` reply (counted by code)."""
        self.host.errors[exc.code] += 1
        self.send_text(protocol.error_reply(exc.id, exc.code, exc.message))

    def _rate_limited(self, payload: bytes, now: float) -> bool:
        """Spend a message token; when none is left answer 429 (or close 4029)."""
        limits = self.host.config.limits
        bucket = self.msg_bucket
        if bucket is None:
            bucket = self.msg_bucket = Bucket(limits.messages_per_connection, now)
        if not bucket.take(limits.messages_per_connection, limits.messages_window, now):
            return False
        self.host.rate_limited["messages"] += 1
        if self.refused(now):
            self.error(ProtocolError(
                Err.RATE_LIMITED, f"rate limited: more than {limits.messages_per_connection} "
                f"messages per {limits.messages_window:g} s", request_id(payload)))
        return True

    def refused(self, now: float | None = None) -> bool:
        """Count one request refused by a rate limit.  When refusals persist (more than
        messages_per_connection of them per messages_window) the session is closed
        with 4029 and this returns False; otherwise True (answer error 429)."""
        limits = self.host.config.limits
        now = time.monotonic() if now is None else now
        if self.strikes is None:
            self.strikes = Bucket(limits.messages_per_connection, now)
        if self.strikes.take(limits.messages_per_connection, limits.messages_window, now):
            self.disconnect(DISCONNECT_RATE_LIMITED)
            return False
        return True

    # ------------------------------------------------------------ rules

    def check(self, what: str, channel: str) -> None:
        """Raise ProtocolError unless this client may ``what`` (subscribe, publish,
        history, presence) ``channel``."""
        self.host.permissions.check(what, self.user, channel, self.grants,
                                    bool(self.subs) and channel in self.subs)

    def begin_subscribe(self, channel: str, now: float | None = None) -> str:
        """Check a subscribe to ``channel`` and reserve the name in :attr:`subs`
        while the node subscribes (call :meth:`forget` if that fails).  Returns the
        name, interned: one str per name for all its subscribers."""
        name = sys.intern(channel)
        subs = self.subs
        if subs is None:
            # a list: ~90 B for the usual one name where a set takes 216 B per
            # connection, and at most max_subscriptions long
            subs = self.subs = []
        if name in subs:
            raise ProtocolError(Err.ALREADY_SUBSCRIBED, f"already subscribed to {name}")
        limits = self.host.config.limits
        if len(subs) >= limits.max_subscriptions:
            self.host.rate_limited["subscriptions"] += 1
            raise ProtocolError(Err.RATE_LIMITED, "subscription limit of "
                                f"{limits.max_subscriptions} reached")
        self.check("subscribe", name)
        self._take_subscribe(time.monotonic() if now is None else now)
        subs.append(name)
        return name

    def _take_subscribe(self, now: float) -> None:
        """Spend one of the subscribe tokens (subscribes_per_connection)."""
        limits = self.host.config.limits
        if not limits.subscribes_per_connection:
            return
        if self.sub_bucket is None:
            self.sub_bucket = Bucket(limits.subscribes_per_connection, now)
        if self.sub_bucket.take(limits.subscribes_per_connection, limits.subscribes_window,
                                now):
            self.host.rate_limited["subscribes"] += 1
            self.refused(now)
            raise ProtocolError(Err.RATE_LIMITED, "rate limited: more than "
                                f"{limits.subscribes_per_connection} subscribes per "
                                f"{limits.subscribes_window:g} s")

    def forget(self, name: str) -> None:
        """Remove ``name`` from :attr:`subs` if it is there (a subscribe that failed,
        an unsubscribe, the end of the session)."""
        subs = self.subs
        if subs and name in subs:
            subs.remove(name)

    def authenticate(self, token: str) -> Identity:
        """Check an ``auth`` request's token (raises ProtocolError): valid, not
        revoked, the same user as before (a session cannot switch users), and its
        ``channels`` claim still allows every current subscription."""
        try:
            ident = self.host.verify_token(token)
        except AuthError as exc:
            raise ProtocolError(Err.UNAUTHORIZED, str(exc)) from None
        if self.host.revoked(ident.user, ident.issued, ident.jti):
            raise ProtocolError(Err.UNAUTHORIZED, DISCONNECT_TOKEN_REVOKED.reason)
        if self.user is not None and not channels.same_owner(self.user, ident.user):
            raise ProtocolError(Err.FORBIDDEN, "this connection is authenticated as another "
                                "user; open a new connection to switch users")
        for name in list(self.subs or ()):  # a narrower channels claim may not drop one
            try:
                self.host.permissions.check("subscribe", ident.user, name, ident.channels)
            except ProtocolError as exc:
                raise ProtocolError(Err.FORBIDDEN, f"the token does not allow the "
                                    f"subscription {name}; unsubscribe first") from exc
        return ident

    def set_identity(self, ident: Identity | None) -> None:
        """Bind ``ident`` (user, grants, iat, jti) and arm its expiry; None clears it."""
        if ident is None:
            self.user, self.grants, self.iat, self.jti = None, None, None, None
            self.arm_expiry(None)
            return
        self.user, self.grants = ident.user, ident.channels
        self.iat, self.jti = ident.issued, ident.jti
        self.arm_expiry(ident.expires)


class BufferedSession(Session):
    """A standalone session that collects its output: ``sent`` (payloads),
    ``closed`` (the Disconnect, once) and ``expiry`` (the armed deadline).  Tests use
    it, and transports that answer in batches (HTTP calls, long-poll) read it."""

    __slots__ = (*SESSION_SLOTS, "closing", "sent", "closed", "expiry")

    def __init__(self, host: SessionHost, client_id: str) -> None:
        self.init_session(host, client_id)
        self.closing = False
        self.sent: list[bytes] = []
        self.closed: Disconnect | None = None
        self.expiry: float | None = None

    def send_text(self, payload: bytes) -> None:
        if self.closed is None:
            self.sent.append(payload)

    def disconnect(self, d: Disconnect, after_ms: int | None = None) -> None:
        if self.closed is None:
            self.sent.append(protocol.disconnect_payload(d.code, d.reason, d.reconnect,
                                                         after_ms or 0))
            self.closed = d
            self.closing = True

    def arm_expiry(self, at: float | None) -> None:
        self.expiry = at
