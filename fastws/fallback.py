"""Fallback transports (SPEC §10): SSE, long-poll and HTTP calls on the one port.

For clients that cannot hold a WebSocket, the same sessions over plain HTTP:

* ``GET /sse`` — :class:`SseStream`, a :class:`~fastws.session.Session` and a hub
  :class:`~fastws._fanout.Conn` like the WebSocket's ``Connection``: registered in the
  hub, subscribed through :meth:`Node.run <fastws.node.Node.run>` (permissions, limits,
  ``since`` recovery, presence), dropped through :meth:`Node.drop`, so publications,
  presence, drain, revocations and ``/api/disconnect`` reach it as they reach a
  WebSocket.  HttpFront hands it the socket (:class:`~fastws.http.Handover`).
* ``GET /poll`` — :class:`PollSession`, the same for one request: subscribe from the
  cursor, answer what is newer (history first), else wait for a publication or the
  timeout; nothing is kept between requests.
* ``POST /call`` — one protocol request through a :class:`CallSession`.

Delivery (:mod:`fastws.relay`): a session of this module has the hub's ``relay``
flag, so the broadcast loop hands it each publication's frame; it queues the SSE event
or poll message with its new cursor, and one write per loop pass sends the queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from fastws import auth, cursor, protocol
from fastws._version import __version__
from fastws.auth.http import CORS_MAX_AGE, cors_headers, origin_listed
from fastws.codes import (
    DISCONNECT_DRAINING,
    DISCONNECT_TOKEN_REVOKED,
    REASON_POLL_ANSWERED,
    REASON_STREAM_CLOSED,
    Disconnect,
    Err,
)
from fastws.http import REASONS, Handover, response
from fastws.limits import retry_after
from fastws.protocol import ProtocolError
from fastws.relay import POLL_TIMEOUT, RELAYED_SLOTS, Plan, Relayed, one_line
from fastws.session import BufferedSession

__all__ = ["PATHS", "SseStream", "PollSession", "CallSession", "Plan", "handle"]

log = logging.getLogger("fastws")

PATHS = ("/sse", "/poll", "/call")
SSE_PARAMS = frozenset({"channel", "token", "cursor", "last_event_id"})
POLL_PARAMS = frozenset({"channel", "token", "cursor", "timeout"})
CALL_TYPES = frozenset({"publish", "history", "presence", "presence_stats", "rpc", "ping",
                        "auth"})
RETRY_MS = (500, 5000)          # the `retry:` of each stream is drawn in this range
ALLOW_HEADERS = "Content-Type, Authorization, Last-Event-ID"
SUBSCRIBE_TIMEOUT = 30.0        # seconds a long-poll waits for its subscriptions


class Refused(Exception):
    """A request refused before any stream: its HTTP status and the error message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code if code is not None else status
        self.message = message
        self.headers = headers or {}


def _error_body(code: int, message: str) -> bytes:
    return protocol.error_reply(None, code, message) + b"\n"


class SseStream(Relayed, asyncio.Protocol):
    """One ``GET /sse`` stream: a session whose messages go out as SSE events."""

    __slots__ = (*RELAYED_SLOTS, "sock", "pinger")
    transport_name = "sse"
    sse = True

    def __init__(self, node: Any, plan: Plan) -> None:
        self.init_relayed(node, plan)
        self.sock: asyncio.Transport | None = None
        self.pinger: asyncio.TimerHandle | None = None

    def deliver(self, frame: bytes) -> bool:
        """The hub's broadcast (the hot path of this module: one call per stream and
        publication; the event and its cursor are worked out once per position)."""
        try:
            relay = self.relay_
            key = (id(frame), self.cursor)
            hit = relay.sse_chunks.get(key)
            if hit is None or hit[0] is not frame:
                _, payload, msg = relay.parsed(frame)
                hit = relay.sse_chunks[key] = (frame, *self._advance(payload, msg))
            self.out.append(hit[1])
            if hit[3] is not self.cursor:
                self.positions = hit[2]
                self.cursor = hit[3]
            if not self.queued:
                self.queued = True
                relay.add(self)
            return True
        except Exception:
            log.exception("delivery to an SSE stream failed")
            return False

    def chunk(self, payload: bytes, cur: bytes | None) -> bytes:
        if cur is None:
            return b"data: " + one_line(payload) + b"\n\n"
        return b"data: " + one_line(payload) + b"\nid: " + cur + b"\n\n"

    def start(self, sock: asyncio.Transport, plan: Plan, headers: dict[str, str]) -> None:
        """The socket is ours: answer 200 and stream (a draining node: the
        ``disconnect`` message, then the end of the stream)."""
        node = self.node
        self.sock = sock
        sock.set_protocol(self)
        head = {"Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store", "X-Accel-Buffering": "no",
                "Connection": "close", **plan.cors}
        lines = [f"HTTP/1.1 200 OK\r\nServer: fastws/{__version__}"]
        lines += [f"{k}: {v}" for k, v in head.items()]
        retry = random.randint(*RETRY_MS)
        sock.write(("\r\n".join(lines) + f"\r\n\r\nretry: {retry}\n\n").encode("latin-1"))
        sock.set_write_buffer_limits(high=node.config.limits.send_buffer)
        node.accepted += 1
        node.transports["sse"] += 1
        node.hub.add_connection(self)
        end = DISCONNECT_DRAINING if node.draining else plan.end
        if end is not None:                 # no lifecycle record: never accepted
            self.disconnect(end)
            return
        node.connected(self, "sse", plan.ip)
        self._arm_ping()
        self.subscribe_all(plan)

    def _arm_ping(self) -> None:
        every = self.node.config.server.ping_interval
        if every > 0 and not self.closing:
            self.pinger = asyncio.get_running_loop().call_later(every, self._ping)

    def _ping(self) -> None:
        """A ``:`` comment every ping_interval (keeps proxies from timing the stream out)."""
        if not self.closing:
            self.out.append(b":\n\n")
            if not self.queued:
                self.queued = True
                self.relay_.add(self)
            self._arm_ping()

    def write_out(self) -> None:
        out, self.out = self.out, []
        sock = self.sock
        if not out or sock is None or sock.is_closing():
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        sock.write(data)
        relay = self.relay_
        relay.sent += len(data)
        relay.writes += 1

    def disconnect(self, d: Disconnect, after_ms: int | None = None) -> None:
        """The ``disconnect`` message (after everything queued), then the end of the
        stream.  A reconnecting close sets ``retry:`` to ``after_ms`` (at least 500 ms),
        so a plain EventSource also waits it out."""
        if self.closing or self.sock is None:
            return
        if after_ms is None:
            after_ms = random.randint(0, 5000) if d.reconnect else 0
        payload = protocol.disconnect_payload(d.code, d.reason, d.reconnect, after_ms)
        retry = f"retry: {max(RETRY_MS[0], after_ms)}\n".encode() if d.reconnect else b""
        self.out.append(retry + b"data: " + payload + b"\n\n")
        self.close_code, self.close_reason = d.code, d.reason
        self.closing = True
        self.write_out()
        self.sock.close()

    def abort(self) -> None:
        """Shutdown: drop the socket at once."""
        if self.sock is not None:
            self.closing = True
            self.sock.abort()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        pass                    # nothing is read from an SSE client

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        """More than send_buffer bytes wait in the socket: a slow consumer (4008)."""
        if not self.closing:
            self.hub.mark_slow(self)
            self.abort()

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pinger is not None:
            self.pinger.cancel()
        if self.expiry is not None:
            self.expiry.cancel()
        self.sock = None
        self.out = []
        self.node.transports["sse"] -= 1
        self.leave_node(1001, REASON_STREAM_CLOSED)


class PollSession(Relayed):
    """One ``GET /poll`` request's session: collects messages until it answers."""

    __slots__ = (*RELAYED_SLOTS, "replies", "events", "woken", "subscribed", "failed")
    transport_name = "poll"

    def __init__(self, node: Any, plan: Plan) -> None:
        self.init_relayed(node, plan)
        loop = asyncio.get_running_loop()
        self.replies = len(plan.names)     # subscribe replies still to come
        self.events = False                # something to answer came (newer than the cursor)
        self.failed: dict[str, Any] | None = None
        self.subscribed = loop.create_future()
        self.woken = loop.create_future()

    def chunk(self, payload: bytes, cur: bytes | None) -> bytes:
        return payload

    def _queue(self, chunk: bytes, positions: cursor.Positions, cur: bytes) -> None:
        msg = orjson.loads(chunk) if self.replies else None
        if msg is not None and msg.get("id") is not None:      # a subscribe's reply
            self.replies -= 1
            if msg.get("type") == "error" and self.failed is None:
                self.failed = msg
            keep = msg.get("type") == "subscribed" and (
                self.unrecovered or msg.get("recovered") is not True)
            if not self.replies and not self.subscribed.done():
                self.subscribed.set_result(None)
            if not keep:
                self.positions, self.cursor = positions, cur
                return
        self.events = True          # answered at once: a new position, or newer messages
        super()._queue(chunk, positions, cur)

    def write_out(self) -> None:
        if self.events and not self.woken.done():
            self.woken.set_result(None)

    def disconnect(self, d: Disconnect, after_ms: int | None = None) -> None:
        """The ``disconnect`` message ends the answer."""
        if self.closing:
            return
        if after_ms is None:
            after_ms = random.randint(0, 5000) if d.reconnect else 0
        self.out.append(protocol.disconnect_payload(d.code, d.reason, d.reconnect, after_ms))
        self.close_code, self.close_reason = d.code, d.reason
        self.closing = True
        self.events = True
        for fut in (self.subscribed, self.woken):
            if not fut.done():
                fut.set_result(None)

    def answer(self) -> bytes:
        return (b'{"messages":[' + b",".join(self.out) + b'],"cursor":"' + self.cursor
                + b'"}\n')


class CallSession(BufferedSession):
    """One ``POST /call``: a buffered session that wakes its handler on the reply."""

    __slots__ = ("done",)

    def __init__(self, host: Any, client_id: str) -> None:
        super().__init__(host, client_id)
        self.done = asyncio.get_running_loop().create_future()

    def send_text(self, payload: bytes) -> None:
        super().send_text(payload)
        if not self.done.done():
            self.done.set_result(None)

    def disconnect(self, d: Disconnect, after_ms: int | None = None) -> None:
        """A backend ``disconnect`` (SPEC §11): the disconnect message is the answer."""
        super().disconnect(d, after_ms)
        if not self.done.done():
            self.done.set_result(None)


# ---------------------------------------------------------------------- requests


def _cors(node: Any, headers: dict[str, str]) -> dict[str, str]:
    """CORS headers for the request's Origin (allow_origins), ``Vary: Origin`` always;
    raises 403 for an Origin outside a non-empty allow_origins."""
    origins = node.config.server.allow_origins
    origin = headers.get("origin")
    if origins and origin and not origin_listed(origins, origin):
        raise Refused(403, "origin not allowed", {"Vary": "Origin"})
    return {**(cors_headers(origins, origin) or {}), "Vary": "Origin"}


def _token(token: str | None, headers: dict[str, str]) -> str | None:
    """The request's token: ``?token=``, else ``Authorization: Bearer``."""
    authz = headers.get("authorization", "")
    if token is None and authz.lower().startswith("bearer "):
        token = authz[7:].strip()
    return token or None


async def _connect(node: Any, transport: str, ip: str, headers: dict[str, str],
                   token: str | None, cors: dict[str, str]) -> Any:
    """The connect proxy's admission (:meth:`Node.admission`), else :class:`Refused`
    with the upgrade's answer: the backend's 401/403, or 503 (fail closed)."""
    got = await node.admission(transport, ip, headers, token)
    if isinstance(got, tuple):
        raise Refused(got[0], got[1], {**cors, **(got[2] or {})})
    return got


def _identity(node: Any, token: str | None, headers: dict[str, str]) -> auth.Identity | None:
    token = _token(token, headers)
    if not token:
        return None
    try:
        ident = node.auth.verify(token)
    except auth.AuthError as exc:
        raise Refused(401, str(exc)) from None
    if node.revoked(ident.user, ident.issued, ident.jti):
        raise Refused(401, DISCONNECT_TOKEN_REVOKED.reason)
    return ident


def plan_request(node: Any, path: str, headers: dict[str, str], params: frozenset[str]) -> Plan:
    """Check a ``/sse`` or ``/poll`` request (raises :class:`Refused`): its query, Origin,
    token, channels, cursor and every subscription's permission, before any stream."""
    cors = _cors(node, headers)
    try:
        query = parse_qs(urlsplit(path).query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise Refused(400, "malformed query string", cors) from None
    unknown = sorted(set(query) - params)
    if unknown:
        raise Refused(400, "unknown query parameters: " + ", ".join(unknown), cors)
    for key, values in query.items():
        if key != "channel" and len(values) > 1:
            raise Refused(400, f"{key} given more than once", cors)
    raw = query.get("channel", [])
    if not raw:
        raise Refused(400, "channel is required (?channel=C, repeated for more)", cors)
    limits = node.config.limits
    if len(raw) > limits.max_subscriptions:
        raise Refused(400, f"more than max_subscriptions ({limits.max_subscriptions}) "
                      "channels", cors)
    names: list[str] = []
    for ch in raw:
        try:
            req = protocol.parse(orjson.dumps({"type": "subscribe", "channel": ch}),
                                 limits.max_channel_length)
        except ProtocolError as exc:
            raise Refused(400, exc.message, cors) from None
        if req.channel in names:
            raise Refused(400, f"channel {req.channel} given more than once", cors)
        names.append(req.channel)
    token = _token(query.get("token", [None])[0], headers)
    proxied = node.proxied(token)     # (draining: no backend call, the stream ends)
    plan = Plan(names, dict.fromkeys(names), cors=cors, token=token,
                proxied=proxied and not node.draining)
    if not proxied:     # else the backend says who this is: authorize() after it
        try:
            plan.ident = _identity(node, token, headers)
        except Refused as exc:
            exc.headers.update(cors)
            raise
    text = (headers.get("last-event-id") or query.get("cursor", [None])[0]
            or query.get("last_event_id", [None])[0])
    if text:
        try:
            got = cursor.decode(text)
        except cursor.CursorError as exc:
            raise Refused(400, str(exc), cors) from None
        plan.given_cursor = True
        if set(got) == set(names):
            plan.positions = {n: got[n] for n in names}
        else:
            plan.unrecovered = True     # another channel set's cursor: as if none
    if not proxied:
        authorize(node, plan)
    return plan


def authorize(node: Any, plan: Plan) -> None:
    """The checks of a planned request that need its identity (raises
    :class:`Refused`): every channel's subscribe permission, ``max_connections``."""
    ident, cors = plan.ident, plan.cors
    user = ident.user if ident is not None else None
    grants = ident.channels if ident is not None else None
    for name in plan.names:
        try:
            node.permissions.check("subscribe", user, name, grants)
        except ProtocolError as exc:
            raise Refused(exc.code, exc.message, cors) from None
    limits = node.config.limits
    if limits.max_connections and node.hub.connection_count >= limits.max_connections:
        node.rate_limited["connections"] += 1
        raise Refused(429, "connection limit reached", {**cors, "Retry-After": "5"})


def _refusal(exc: Refused) -> bytes:
    return response(exc.status, _error_body(exc.code, exc.message), exc.headers)


def _preflight(node: Any, headers: dict[str, str], methods: str) -> bytes:
    hdrs = {"Vary": "Origin"}
    cors = cors_headers(node.config.server.allow_origins, headers.get("origin"))
    if cors:
        hdrs.update(cors)
        hdrs.update({"Access-Control-Allow-Methods": methods,
                     "Access-Control-Allow-Headers": ALLOW_HEADERS,
                     "Access-Control-Max-Age": str(CORS_MAX_AGE)})
    return response(204, b"", hdrs)


def handle(app: Any, method: str, path: str, headers: dict[str, str],
           body: bytes) -> bytes | asyncio.Future | Handover:
    """Answer a request for one of :data:`PATHS` (the app routes them here)."""
    node = app.node
    route = urlsplit(path).path
    if route == "/call":
        if method == "OPTIONS":
            return _preflight(node, headers, "POST, OPTIONS")
        if method != "POST":
            return response(405, _error_body(405, "use POST"), {"Allow": "POST, OPTIONS"})
        return app.loop.create_task(call(node, headers, body, _ip(app, headers)))
    if method == "OPTIONS":
        return _preflight(node, headers, "GET, OPTIONS")
    if method != "GET":
        return response(405, _error_body(405, "use GET"), {"Allow": "GET, OPTIONS"})
    try:
        plan = plan_request(node, path, headers,
                            SSE_PARAMS if route == "/sse" else POLL_PARAMS)
        if route == "/poll":
            plan.timeout = _timeout(path)
    except Refused as exc:
        return _refusal(exc)
    if plan.proxied:
        plan.ip = _ip(app, headers)
        return app.loop.create_task(_admitted(app, route, plan, headers))
    if route == "/poll":
        return app.loop.create_task(poll(node, plan))
    return Handover(lambda sock, rest: _open_sse(app, plan, sock, headers))


def _ip(app: Any, headers: dict[str, str]) -> str:
    """The client IP of the request being handled (HttpFront sets ``app.peer``)."""
    peer = getattr(app, "peer", None)
    return app.client_ip(peer, headers) if peer is not None else ""


async def _admitted(app: Any, route: str, plan: Plan,
                    headers: dict[str, str]) -> bytes | Handover:
    """A ``/sse`` or ``/poll`` the connect proxy decides: its admission (else 401/403/503),
    the checks that need the identity, then the stream or poll (:meth:`Node.admit`)."""
    node = app.node
    try:
        plan.admission = await _connect(node, "sse" if route == "/sse" else "poll",
                                        plan.ip, headers, plan.token, plan.cors)
        plan.end = plan.admission.disconnect
        if plan.end is None:
            plan.ident = plan.admission.ident
            authorize(node, plan)
    except Refused as exc:
        return _refusal(exc)
    if route == "/poll":
        return await poll(node, plan)
    return Handover(lambda sock, rest: _open_sse(app, plan, sock, headers))


def _timeout(path: str) -> float:
    raw = parse_qs(urlsplit(path).query).get("timeout")
    if not raw:
        return POLL_TIMEOUT
    try:
        value = float(raw[0])
    except ValueError:
        value = -1.0
    if not 1 <= value <= 60:
        raise Refused(400, "timeout must be a number of seconds from 1 to 60")
    return value


def _open_sse(app: Any, plan: Plan, sock: asyncio.Transport, headers: dict[str, str]) -> None:
    """HttpFront handed the socket over: the per-IP connection limit (as for a
    WebSocket upgrade), then the stream."""
    wait = app.ip_limit(sock, headers, True)
    if wait:
        exc = Refused(429, "too many new connections from this IP",
                      {**plan.cors, "Retry-After": retry_after(wait), "Connection": "close"})
        sock.write(_refusal(exc))
        sock.close()
        return
    plan.ip = plan.ip or app.client_ip(sock, headers)
    SseStream(app.node, plan).start(sock, plan, headers)


async def poll(node: Any, plan: Plan) -> bytes:
    """Answer one ``GET /poll`` (see the module docstring)."""
    sess = PollSession(node, plan)
    hdrs = {"Cache-Control": "no-store", **plan.cors}
    node.accepted += 1
    node.transports["poll"] += 1
    node.hub.add_connection(sess)
    try:
        end = DISCONNECT_DRAINING if node.draining else plan.end
        if end is not None:
            sess.disconnect(end)
        else:
            sess.subscribe_all(plan)
            await asyncio.wait_for(asyncio.shield(sess.subscribed), SUBSCRIBE_TIMEOUT)
            if sess.failed is not None:
                code = int(sess.failed.get("code", 500))
                return response(code if code in REASONS else 500,
                                orjson.dumps(sess.failed) + b"\n", hdrs)
            if plan.given_cursor and not plan.unrecovered and not sess.events:
                try:
                    await asyncio.wait_for(asyncio.shield(sess.woken), plan.timeout)
                except TimeoutError:
                    pass
        body = sess.answer()
    except TimeoutError:
        return response(503, _error_body(Err.UNAVAILABLE, "subscribing timed out"), hdrs)
    finally:
        sess.closing = True
        node.transports["poll"] -= 1
        if sess.expiry is not None:
            sess.expiry.cancel()
        sess.leave_node(1000, REASON_POLL_ANSWERED)
    return response(200, body, hdrs)


async def call(node: Any, headers: dict[str, str], body: bytes, ip: str = "") -> bytes:
    """Answer one ``POST /call``: one protocol request, the WebSocket's reply; an
    ``error`` reply comes with its code as the HTTP status.  The connect proxy admits
    it first (transport ``http``) as a stream; its ``disconnect`` is the answer (200)."""
    try:
        cors = _cors(node, headers)
    except Refused as exc:
        return _refusal(exc)
    sess = CallSession(node, node.next_client_id())
    token = _token(None, headers)
    try:
        if node.proxied(token):
            admission = await _connect(node, "http", ip, headers, token, cors)
            node.admit(sess, admission)
            if admission.disconnect is not None:
                sess.disconnect(admission.disconnect)
        else:
            ident = _identity(node, token, headers)
            if ident is not None:
                sess.set_identity(ident)
    except Refused as exc:
        exc.headers.update(cors)
        return _refusal(exc)
    req = sess.receive(body) if sess.closed is None else None
    if req is not None:
        if req.type not in CALL_TYPES:
            sess.error(ProtocolError(Err.BAD_REQUEST, f"{req.type} needs a stream: use "
                                     "/sse or /poll (or a WebSocket)", req.id))
        else:
            node.run(sess, req)
            await sess.done
    reply = sess.sent[0] if sess.sent else _error_body(Err.INTERNAL, "no reply")
    status = 200
    msg = orjson.loads(reply)
    if msg.get("type") == "error":
        code = int(msg.get("code", 500))
        status = code if code in REASONS else 500
    extra = {"Retry-After": "1"} if status == 429 else {}
    return response(status, reply, {**cors, **extra, "Cache-Control": "no-store"})
