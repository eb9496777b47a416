"""The picows adapter and the process lifecycle: one port for WebSocket and HTTP.

Each accepted socket starts as an :class:`HttpFront` that reads the request head.
A WebSocket upgrade is handed to picows (the transport switches to picows'
``WSProtocol``, which calls :meth:`App.listener_for` with the parsed request); any
other request (``/healthz``, ``/readyz``, ``/metrics``, ``POST /api/publish``, the
live page, ``/fastws.js``) is answered here, with keep-alive.

``run(config)`` is what ``fastws serve`` calls: startup → serve → drain → exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import signal
import sys
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import uvloop
from picows import (
    WSAutoPingStrategy,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol

from fastws import auth, channels, protocol, workers
from fastws._fanout import Conn
from fastws._frames import MessageAssembler, close_with, receive
from fastws._version import __version__
from fastws.broker import BrokerUnavailable
from fastws.broker.base import Revocation
from fastws.codes import (
    DISCONNECT_BY_API,
    DISCONNECT_CONNECTION_LIMIT,
    DISCONNECT_DRAINING,
    DISCONNECT_INVALID_TOKEN,
    DISCONNECT_ORIGIN,
    DISCONNECT_SLOW,
    DISCONNECT_TOKEN_EXPIRED,
    DISCONNECT_TOKEN_REVOKED,
    MAX_CLOSE_REASON,
    Close,
    Disconnect,
)
from fastws.config import Config
from fastws.limits import KeyedLimiter, client_ip, retry_after
from fastws.metrics import CONTENT_TYPE, Metrics
from fastws.node import Node, revocation_key
from fastws.session import SESSION_SLOTS, Session

__all__ = ["Connection", "App", "run", "serve"]

log = logging.getLogger("fastws")
conn_log = logging.getLogger("fastws.conn")   # one debug line per connection event

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
MAX_BATCH = 1000                # publications in one POST /api/publish array
MAX_REVOCATION_TTL = 366 * 86400  # seconds a POST /api/revoke record may be kept
HEAD_TIMEOUT = 10.0             # seconds to send a whole request head (slowloris)
KEEPALIVE_TIMEOUT = 75.0        # seconds an idle keep-alive HTTP connection stays open
SLOW_ABORT_AFTER = 2.0          # seconds between a 4008 close and dropping the socket
HEARTBEAT_TICK = 1.0
LAG_WINDOW = 15                 # ticks: fastws_event_loop_lag_seconds is their maximum
DRAIN_GRACE = 0.25              # seconds between SIGTERM and the first drain batch
PICOWS_CHATTER = 5              # log level of picows' per-connection lines (below DEBUG)
WS_PATHS = ("/", "/ws")


class _PicowsLog:
    """Logger-like object for picows: one shared object (no per-connection child logger),
    with picows' per-connection info and debug lines demoted below debug (``fastws.conn``
    logs one line per connection event instead)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self.name = logger.name

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging API
        return self._log.isEnabledFor(min(level, PICOWS_CHATTER))

    def log(self, level: int, msg: str, *args: Any, **kw: Any) -> None:
        self._log.log(min(level, PICOWS_CHATTER), msg, *args, **kw)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.log(PICOWS_CHATTER, msg, *args, **kw)

    info = debug

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.warning(msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.error(msg, *args, **kw)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.exception(msg, *args, **kw)


class Connection(Conn, Session):
    """One WebSocket connection: the picows listener (the hub's :class:`Conn`) and the
    client's :class:`~fastws.session.Session` in one object (one per connection)."""

    __slots__ = (*SESSION_SLOTS, "node", "assembler", "close_code", "pending_close",
                 "expiry")

    def __init__(self, node: Node, pending_close: Disconnect | None) -> None:
        self.init_session(node, node.next_client_id())
        self.node = node
        self.assembler = MessageAssembler(node.config.limits.max_message_size)
        self.close_code = 0
        self.pending_close = pending_close
        self.expiry: asyncio.TimerHandle | None = None  # closes 4501 at the token's exp

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        node = self.node
        self.hub = node.hub
        node.accepted += 1
        if self.pending_close is not None:
            self.disconnect(self.pending_close)
            return
        node.hub.add_connection(self)
        transport.underlying_transport.set_write_buffer_limits(
            high=node.config.limits.send_buffer)
        if conn_log.isEnabledFor(logging.DEBUG):
            conn_log.debug("connection open", extra={
                "client": self.client_id, "user": self.user,
                "peer": _peer(transport)})

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        self.active = True
        msg = receive(self.assembler, transport, frame)
        if msg is None or self.closing:
            return
        opcode, payload = msg
        if opcode != WSMsgType.TEXT:
            self.node.messages_received += 1
            self.close(Close.UNSUPPORTED_DATA, "binary messages are not supported")
            return
        req = self.receive(payload)
        if req is not None:
            self.node.run(self, req)

    def arm_expiry(self, at: float | None) -> None:
        """Disconnect with 4501 "token expired" at ``at`` (wall clock); None cancels."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if at is not None:
            self.expiry = asyncio.get_running_loop().call_later(
                max(0.0, at - time.time()), self.disconnect, DISCONNECT_TOKEN_EXPIRED)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        code = self.close_code
        hs = transport.close_handshake
        if not code and hs is not None:
            info = hs.recv if hs.recv is not None else hs.sent
            code = int(info.code) if info is not None else 0
        self.node.drop(self, code or 1006)
        if conn_log.isEnabledFor(logging.DEBUG):
            conn_log.debug("connection closed", extra={
                "client": self.client_id, "user": self.user, "code": code or 1006})

    def pause_writing(self) -> None:
        """The transport holds more than send_buffer bytes: a slow consumer."""
        if not self.closing:
            self.hub.mark_slow(self)

    def resume_writing(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        """Flush what is queued, then close with ``code``."""
        if self.transport is None or self.transport.is_close_frame_sent:
            return
        self.flush_now()
        self.closing = True
        self.close_code = code
        close_with(self.transport, code, reason)

    def disconnect(self, d: Disconnect, after_ms: int | None = None) -> None:
        """Send the ``disconnect`` push after everything queued, then close with its code."""
        if self.transport is None or self.transport.is_close_frame_sent:
            return
        if after_ms is None:
            after_ms = random.randint(0, 5000) if d.reconnect else 0
        self.send_text(protocol.disconnect_payload(d.code, d.reason, d.reconnect, after_ms))
        self.close(d.code, d.reason)


class App:
    """Routes HTTP requests and WebSocket upgrades for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.metrics = Metrics(node)
        self.loop = asyncio.get_running_loop()
        static = resources.files("fastws") / "static"
        self.static = {
            "/": (static / "index.html").read_bytes(),
            "/fastws.js": (static / "fastws.js").read_bytes(),
        }
        self.picows_log = _PicowsLog(logging.getLogger("fastws.picows"))
        # HttpFront reads into this and copies out at once (one event loop, one reader)
        self.read_view = memoryview(bytearray(65536))
        self.ip_connections = KeyedLimiter()   # connections_per_ip
        self.ip_requests = KeyedLimiter()      # requests_per_ip_per_s
        self._trusted: tuple[Any, Any] = (None, ())
        self._wallets: auth.ContractWallets | None = None   # EIP-1271 (siwe_rpc_url)

    def ip_limit(self, transport: asyncio.BaseTransport, headers: dict[str, str],
                 upgrade: bool) -> float:
        """Per-client-IP limits (SPEC §5): 0.0 if allowed, else seconds to wait.

        Upgrades spend a connections_per_ip token, other requests a
        requests_per_ip_per_s one, of the client IP (:func:`fastws.limits.client_ip`).
        """
        limits = self.node.config.limits
        if upgrade:
            cap, window, limiter = (limits.connections_per_ip, limits.connections_per_ip_window,
                                    self.ip_connections)
        elif limits.requests_per_ip_per_s:
            cap, window, limiter = limits.requests_per_ip_per_s, 1.0, self.ip_requests
        else:
            return 0.0
        server = self.node.config.server
        if self._trusted[0] is not server:
            self._trusted = (server, server.trusted_networks())
        peer = transport.get_extra_info("peername")
        ip, exempt = client_ip(peer[0] if isinstance(peer, tuple) else None,
                               headers.get("x-forwarded-for"), self._trusted[1])
        if exempt:
            return 0.0
        wait = limiter.take(ip, cap, window, time.monotonic())
        if wait:
            self.node.rate_limited["connections" if upgrade else "requests"] += 1
        return wait

    # ------------------------------------------------------------------ WebSocket

    def make_ws_protocol(self) -> WSProtocol:
        cfg = self.node.config
        return WSProtocol(
            None, None, False, self.listener_for, self.picows_log,
            True,                       # disconnect_on_exception
            10,                         # handshake timeout
            False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE,  # our own heartbeat sweep
            False,                      # auto-pong off: the assembler answers PINGs
            cfg.limits.max_message_size,
            None,
            cfg.server.read_buffer_size,
        )

    def listener_for(self, request: WSUpgradeRequest) -> Any:
        """picows calls this with a parsed upgrade request; returns the listener."""
        node = self.node
        url = urlsplit(request.path.decode("latin-1"))
        if url.path not in WS_PATHS:
            return _http_response(404, b"not found\n")
        if node.draining:
            return _http_response(503, b"server draining\n", {"Retry-After": "5"})
        pending: Disconnect | None = None
        limits = node.config.limits
        if limits.max_connections and node.hub.connection_count >= limits.max_connections:
            pending = DISCONNECT_CONNECTION_LIMIT
            log.warning("connection limit reached: closing a new connection with 4504",
                        extra={"limit": limits.max_connections})
        origins = node.config.server.allow_origins
        origin = request.headers.get("origin", "").rstrip("/").lower()
        if origins and origin and origin not in origins and "*" not in origins:
            pending = DISCONNECT_ORIGIN  # (no Origin: not a browser, nothing to protect)
        ident = None
        token = parse_qs(url.query).get("token", [None])[0]
        authz = request.headers.get("authorization", "")
        if token is None and authz.lower().startswith("bearer "):
            token = authz[7:].strip()
        if token and pending is None:
            try:
                ident = node.auth.verify(token)
            except auth.AuthError as exc:
                pending = DISCONNECT_TOKEN_EXPIRED if exc.expired else DISCONNECT_INVALID_TOKEN
            else:
                if node.revoked(ident.user, ident.issued, ident.jti):
                    ident, pending = None, DISCONNECT_TOKEN_REVOKED
        conn = Connection(node, pending)
        if ident is not None:
            conn.set_identity(ident)
        return conn

    # ------------------------------------------------------------------ HTTP

    def handle_http(self, method: str, path: str, headers: dict[str, str],
                    body: bytes) -> bytes | asyncio.Future:
        """Answer one plain HTTP request (bytes, or a future of bytes)."""
        route = urlsplit(path).path
        if route == "/api/publish":
            if method != "POST":
                return _response(405, b'{"error":"use POST"}', {"Allow": "POST"})
            return self.loop.create_task(self._api_publish(headers, body))
        if route == "/api/disconnect":
            if method != "POST":
                return _response(405, b'{"error":"use POST"}', {"Allow": "POST"})
            return self.loop.create_task(self._api_disconnect(headers, body))
        if route == "/api/revoke":
            if method != "POST":
                return _response(405, b'{"error":"use POST"}', {"Allow": "POST"})
            return self.loop.create_task(self._api_revoke(headers, body))
        if route in ("/auth/nonce", "/auth/siwe"):
            return self.loop.create_task(self._auth(method, route, headers, body))
        if method not in ("GET", "HEAD"):
            return _response(405, b'{"error":"method not allowed"}', {"Allow": "GET"})
        if route == "/healthz":
            return _json(200, {"status": "ok"})
        if route == "/readyz":
            if self.node.ready:
                return _json(200, {"status": "ready"})
            reason = "draining" if self.node.draining else "broker unavailable"
            return _json(503, {"status": "not ready", "reason": reason})
        if route == "/metrics":
            if workers.CURRENT is not None:  # the sum over every worker
                return self.loop.create_task(self._metrics_all(workers.CURRENT))
            return _response(200, self.metrics.render(), {"Content-Type": CONTENT_TYPE})
        if route == "/fastws.js":
            return _response(200, self.static["/fastws.js"],
                             {"Content-Type": "text/javascript; charset=utf-8",
                              "Cache-Control": "no-cache"})
        if route in ("/", "/index.html"):
            return _response(200, self.static["/"], {"Content-Type": "text/html; charset=utf-8"})
        return _json(404, {"error": "not found"})

    async def _auth(self, method: str, route: str, headers: dict[str, str],
                    body: bytes) -> bytes:
        # the broker spends SIWE nonces: once across every process and node sharing it
        status, obj, hdrs = await auth.http_auth(self.node.siwe, method, route, headers, body,
                                                 claim=self.node.broker.claim_once,
                                                 origins=self.node.config.server.allow_origins,
                                                 wallets=self._contract_wallets())
        return _json(status, obj, hdrs) if obj is not None else _response(status, b"", hdrs)

    def _contract_wallets(self) -> auth.ContractWallets | None:
        """The EIP-1271 checker of the live ``siwe_rpc_url`` (a new one after SIGHUP
        changes it), or None when it is unset."""
        cfg, old = self.node.config.server, self._wallets
        if old is not None and (old.url, old.timeout) == (cfg.siwe_rpc_url, cfg.siwe_rpc_timeout):
            return old
        if old is not None:
            self.loop.create_task(old.close())
        self._wallets = (auth.ContractWallets(cfg.siwe_rpc_url, cfg.siwe_rpc_timeout)
                         if cfg.siwe_rpc_url else None)
        return self._wallets

    async def _metrics_all(self, worker: workers.Worker) -> bytes:
        body = await worker.metrics(self.metrics.registry)
        return _response(200, body, {"Content-Type": CONTENT_TYPE})

    def _api_key_ok(self, headers: dict[str, str]) -> bool:
        """True when the request carries one of the configured API keys."""
        keys = self.node.config.server.api_keys
        authz = headers.get("authorization", "")
        return bool(keys) and authz.lower().startswith("bearer ") and authz[7:].strip() in keys

    def _publication(self, msg: Any) -> tuple[str, Any, str | None] | str:
        """``(channel, data, idempotency_key)`` of one publication object of the API,
        or the reason it is refused."""
        if not isinstance(msg, dict):
            return "a publication must be a JSON object"
        unknown = set(msg) - {"channel", "data", "idempotency_key"}
        if unknown:
            return f"unknown field {sorted(unknown)[0]!r}"
        if "data" not in msg:
            return "data is required"
        try:
            channel = channels.validate(msg.get("channel"),
                                        self.node.config.limits.max_channel_length,
                                        allow_pattern=False)
        except channels.ChannelError as exc:
            return str(exc)
        key = msg.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key or len(key) > 255):
            return "idempotency_key must be a string of 1-255 chars"
        return channel, msg["data"], key

    def _api_request(self, headers: dict[str, str], body: bytes) -> Any:
        """The parsed JSON body of an API request, or the 401/400 answer (bytes)."""
        if not self._api_key_ok(headers):
            return _json(401, {"error": "a valid API key is required (Authorization: Bearer)"},
                         {"WWW-Authenticate": "Bearer"})
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return _json(400, {"error": "body must be JSON"})

    def _api_object(self, headers: dict[str, str], body: bytes, fields: set[str]) -> Any:
        """The JSON object of an API request holding only ``fields``, or the 401/400
        answer (bytes)."""
        msg = self._api_request(headers, body)
        if isinstance(msg, bytes):
            return msg
        if not isinstance(msg, dict):
            return _json(400, {"error": "body must be a JSON object"})
        unknown = set(msg) - fields
        if unknown:
            return _json(400, {"error": f"unknown field {sorted(unknown)[0]!r}"})
        return msg

    async def _api_publish(self, headers: dict[str, str], body: bytes) -> bytes:
        msg = self._api_request(headers, body)
        if isinstance(msg, bytes):
            return msg
        if isinstance(msg, list):
            return await self._api_publish_batch(msg)
        if not isinstance(msg, dict):
            return _json(400, {"error": "body must be a JSON object (or an array of them)"})
        item = self._publication(msg)
        if isinstance(item, str):
            return _json(400, {"error": item})
        try:
            res = await self.node.publish(*item)
        except BrokerUnavailable as exc:
            return _json(503, {"error": f"broker unavailable: {exc}"}, {"Retry-After": "1"})
        except protocol.ProtocolError as exc:
            return _json(400, {"error": exc.message})
        return _json(200, {"offset": res.offset, "epoch": res.epoch})

    async def _api_disconnect(self, headers: dict[str, str], body: bytes) -> bytes:
        """``{"user": U[, "code": 4000-4999][, "reason": R]}``: disconnect every connection
        of U on every node; answers how many this node closed."""
        msg = self._api_object(headers, body, {"user", "code", "reason"})
        if isinstance(msg, bytes):
            return msg
        user = msg.get("user")
        if not isinstance(user, str) or not user or len(user) > 255:
            return _json(400, {"error": "user must be a string of 1-255 chars"})
        code = msg.get("code", DISCONNECT_BY_API.code)
        if not isinstance(code, int) or isinstance(code, bool) or not 4000 <= code <= 4999:
            return _json(400, {"error": "code must be an integer in 4000-4999 (4000-4499: "
                                        "the client reconnects, 4500-4999: it does not)"})
        reason = msg.get("reason", DISCONNECT_BY_API.reason)
        if not isinstance(reason, str) or len(reason.encode()) > MAX_CLOSE_REASON:
            return _json(400, {"error": f"reason must be a string of at most "
                                        f"{MAX_CLOSE_REASON} bytes (UTF-8)"})
        d = Disconnect(code, reason)
        n = self.node.disconnect_user(user, d)
        try:
            await self.node.broker.send_control(orjson.dumps(
                {"op": "disconnect", "user": user, "code": code, "reason": reason}))
        except BrokerUnavailable as exc:
            return _json(503, {"error": f"broker unavailable: {exc}; this node closed its "
                                        "connections of the user, other nodes were not told",
                               "disconnected": n}, {"Retry-After": "1"})
        log.info("disconnected %d connections of a user (server API)", n,
                 extra={"user": user, "code": code})
        return _json(200, {"disconnected": n})

    async def _api_revoke(self, headers: dict[str, str], body: bytes) -> bytes:
        """``{"user": U}`` and/or ``{"jti": J}``, optional ``"ttl"``: revoke every token
        of U issued up to now (``iat`` at most now, or none) and/or the token whose id
        is J, on every node, for ``ttl`` seconds (default ``revocation_ttl``); the live
        connections using them are closed with 4501 "token revoked"."""
        msg = self._api_object(headers, body, {"user", "jti", "ttl"})
        if isinstance(msg, bytes):
            return msg
        if "user" not in msg and "jti" not in msg:
            return _json(400, {"error": "give user, jti or both"})
        targets: list[tuple[str, str]] = []
        for kind in ("user", "jti"):
            if kind in msg:
                value = msg[kind]
                if not isinstance(value, str) or not value or len(value) > 255:
                    return _json(400, {"error": f"{kind} must be a string of 1-255 chars"})
                targets.append((kind, value))
        ttl = msg.get("ttl", self.node.config.server.revocation_ttl)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or \
                not 1 <= ttl <= MAX_REVOCATION_TTL:
            return _json(400, {"error": f"ttl must be a number of seconds in 1-"
                                        f"{MAX_REVOCATION_TTL}"})
        now = time.time()
        revs = [Revocation(kind, revocation_key(value) if kind == "user" else value, now,
                           now + ttl) for kind, value in targets]
        n = 0
        try:
            stored = [await self.node.broker.revoke(r) for r in revs]
        except BrokerUnavailable as exc:
            for r in revs:  # this node refuses them anyway, until it restarts
                n += self.node.apply_revocation(r)
            return _json(503, {"error": f"broker unavailable: {exc}; the revocation was not "
                                        "stored: only this node refuses the token(s), until "
                                        "it restarts; retry", "disconnected": n},
                         {"Retry-After": "1"})
        for r in stored:
            n += self.node.apply_revocation(r)
        try:
            for r in stored:
                await self.node.broker.send_control(orjson.dumps(
                    {"op": "revoke", "kind": r.kind, "key": r.key, "at": r.at,
                     "until": r.until}))
        except BrokerUnavailable as exc:
            return _json(503, {"error": f"broker unavailable: {exc}; the revocation is "
                                        "stored, but other nodes were not told: they refuse "
                                        "the token(s) after their next broker reconnect or "
                                        "restart; retry", "disconnected": n},
                         {"Retry-After": "1"})
        log.info("revoked tokens (%s); %d connections closed here",
                 ", ".join(kind for kind, _ in targets), n,
                 extra={"user": msg.get("user")})
        return _json(200, {"disconnected": n, "at": now, "until": max(r.until for r in stored)})

    async def _api_publish_batch(self, msgs: list[Any]) -> bytes:
        """A JSON array of publications: each is checked and published on its own (one
        bad item does not stop the others), in the array's order, in one broker batch;
        the answer is an array of one result per item, in order."""
        if not msgs:
            return _json(400, {"error": "the array of publications is empty"})
        if len(msgs) > MAX_BATCH:
            return _json(400, {"error": f"more than {MAX_BATCH} publications in one request"})
        for i, msg in enumerate(msgs):  # the request's shape is wrong: nothing is published
            if not isinstance(msg, dict):
                return _json(400, {"error": f"item {i} of the array is not a JSON object"})
        results: list[Any] = []
        items: list[tuple[str, Any, str | None]] = []
        for msg in msgs:
            item = self._publication(msg)
            if isinstance(item, str):
                results.append({"error": item, "status": 400})
            else:
                results.append(None)
                items.append(item)
        if items:
            try:
                done = iter(await self.node.publish_batch(items))
            except BrokerUnavailable as exc:
                return _json(503, {"error": f"broker unavailable: {exc}"}, {"Retry-After": "1"})
            for i, r in enumerate(results):
                if r is not None:
                    continue
                res = next(done)
                if isinstance(res, BrokerUnavailable):
                    results[i] = {"error": f"broker unavailable: {res}", "status": 503}
                elif isinstance(res, protocol.ProtocolError):
                    results[i] = {"error": res.message, "status": 400}
                else:
                    results[i] = {"offset": res.offset, "epoch": res.epoch}
        return _json(200, results)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 501: "Not Implemented",
            405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    if status == 204:       # no body, no Content-Length (RFC 9110)
        head = ["HTTP/1.1 204 No Content", f"Server: fastws/{__version__}"]
        hdrs = {}
    else:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                f"Content-Length: {len(body)}", f"Server: fastws/{__version__}"]
        hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    head += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> bytes:
    return _response(status, orjson.dumps(obj) + b"\n", headers)


def _http_response(status: int, body: bytes, headers: dict[str, str] | None = None):
    resp = WSUpgradeResponse.create_error_response(status, body)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return WSUpgradeResponseWithListener(resp, None)


class HttpFront(asyncio.BufferedProtocol):
    """Reads HTTP request heads; answers plain requests, hands upgrades to picows.

    A buffered protocol reading into the app's one scratch buffer, with no
    ``data_received`` attribute: uvloop keeps a transport's last ``data_received``
    bound method even after ``set_protocol`` to picows (which has none), and with it
    this object, ~140 B per WebSocket connection.
    """

    __slots__ = ("app", "transport", "buf", "busy", "closing", "timer")

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._arm(HEAD_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._arm(None)

    def _arm(self, delay: float | None) -> None:
        """(Re)start the deadline for the next request head; None cancels it."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if delay is None else self.app.loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        """No complete request head in time (slowloris, half-open, idle keep-alive)."""
        self.timer = None
        if self.transport is not None and not self.busy and not self.closing:
            self.transport.abort()
            self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.app.read_view

    def buffer_updated(self, nbytes: int) -> None:
        self._feed(bytes(self.app.read_view[:nbytes]))

    def _feed(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _fail(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.transport.write(_json(status, {"error": message},
                                   {**(headers or {}), "Connection": "close"}))
        self.transport.close()
        self.closing = True
        self.buf = b""

    def _process(self) -> None:
        while self.transport is not None and not self.closing and not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._fail(431, "request head too large")
                return
            if end > MAX_HEAD:
                self._fail(431, "request head too large")
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._fail(400, "malformed request line")
                return
            method, path, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    self._fail(400, "malformed header")
                    return
                headers[name.strip().lower()] = value.strip()
            upgrade = headers.get("upgrade", "").lower() == "websocket"
            wait = self.app.ip_limit(self.transport, headers, upgrade)
            if wait:
                self._fail(429, "too many new connections from this IP" if upgrade else
                           "too many requests from this IP", {"Retry-After": retry_after(wait)})
                return
            if upgrade:
                self._upgrade()
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail(400, "bad Content-Length")
                return
            if "transfer-encoding" in headers:
                self._fail(400, "Transfer-Encoding is not supported; send Content-Length")
                return
            if length < 0 or length > MAX_BODY:
                self._fail(413, "body too large")
                return
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            try:
                answer = self.app.handle_http(method, path, headers, body)
            except Exception:
                log.exception("internal error answering %s %s", method, path)
                answer = _json(500, {"error": "internal error"})
            if isinstance(answer, bytes):
                self._send(answer, keep, method)
            else:
                self.busy = True
                answer.add_done_callback(lambda fut, k=keep, m=method: self._done(fut, k, m))

    def _done(self, fut: asyncio.Future, keep: bool, method: str) -> None:
        self.busy = False
        try:
            answer = fut.result()
        except Exception:
            log.exception("internal error in an HTTP handler")
            answer = _json(500, {"error": "internal error"})
        self._send(answer, keep, method)
        self._process()

    def _send(self, answer: bytes, keep: bool, method: str) -> None:
        if self.transport is None:
            return
        if method == "HEAD":
            answer = answer[:answer.find(b"\r\n\r\n") + 4]
        if not keep:
            answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        self.transport.write(answer)
        if not keep:
            self.transport.close()
            self.closing = True
        else:
            self._arm(KEEPALIVE_TIMEOUT if not self.buf else HEAD_TIMEOUT)

    def _upgrade(self) -> None:
        self._arm(None)          # picows has its own handshake timeout, then the heartbeat
        transport, data = self.transport, self.buf
        self.buf = b""
        self.transport = None
        ws = self.app.make_ws_protocol()
        transport.set_protocol(ws)
        ws.connection_made(transport)
        buf = ws.get_buffer(len(data))
        n = min(len(data), len(buf))
        memoryview(buf)[:n] = data[:n]
        ws.buffer_updated(n)
        if n < len(data):  # more than the initial buffer: feed the rest
            rest = data[n:]
            while rest:
                buf = ws.get_buffer(len(rest))
                k = min(len(rest), len(buf))
                memoryview(buf)[:k] = rest[:k]
                ws.buffer_updated(k)
                rest = rest[k:]


# ---------------------------------------------------------------------- lifecycle


class Server:
    """One serving process: startup → serve → drain → shutdown (uvicorn-style)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = Node(config)
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self._listener: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        await self.node.start()
        hub = self.node.hub
        hub.on_slow = self._on_slow
        hub.on_heartbeat_timeout = self._on_heartbeat_timeout
        self.app = App(self.node)
        cfg = self.config.server
        self._listener = await loop.create_server(
            lambda: HttpFront(self.app), cfg.host, cfg.port, backlog=4096, reuse_address=True,
            reuse_port=workers.CURRENT is not None)
        if workers.CURRENT is not None:
            await workers.CURRENT.start(self.app.metrics.registry)
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.drain),
                             (signal.SIGHUP, self.reload)):
            loop.add_signal_handler(sig, handler)
        self._tasks.append(loop.create_task(self._heartbeat()))
        if cfg.demo:
            from fastws.demo import run_demo

            self._tasks.append(loop.create_task(run_demo(self.node)))
        log.info("fastws %s serving on http://%s:%d (broker %s)", __version__, cfg.host,
                 cfg.port, cfg.broker)

    def _on_slow(self, conn: Connection) -> None:
        conn.close_code = Close.SLOW_CONSUMER
        log.warning("slow consumer: send_buffer exceeded, closing with 4008",
                    extra={"client": conn.client_id, "user": conn.user})
        tr = conn.transport
        if tr is None or tr.is_disconnected:
            return
        with contextlib.suppress(Exception):
            close_with(tr, Close.SLOW_CONSUMER, DISCONNECT_SLOW.reason)
        asyncio.get_running_loop().call_later(SLOW_ABORT_AFTER, _abort, tr)

    def _on_heartbeat_timeout(self, conn: Connection) -> None:
        conn.close(Close.GOING_AWAY, "heartbeat timeout")
        if conn.transport is not None:
            asyncio.get_running_loop().call_later(SLOW_ABORT_AFTER, _abort, conn.transport)

    async def _heartbeat(self) -> None:
        """Once a second: heartbeat sweep, and the loop lag (largest of the last 15 ticks)."""
        loop = asyncio.get_running_loop()
        lags: collections.deque[float] = collections.deque(maxlen=LAG_WINDOW)
        due = loop.time() + HEARTBEAT_TICK
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            lags.append(max(0.0, now - due))  # wake-up to wake-up: the sweep's time counts
            self.node.loop_lag = max(lags)
            due = now + HEARTBEAT_TICK
            cfg = self.node.config.server
            self.node.hub.sweep(cfg.ping_interval, cfg.pong_timeout)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply keys, limits and namespace rules."""
        from fastws.config import ConfigError, reload

        try:
            new = reload(self.node.config)
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        self.node.reload(new)
        for conn in self.node.hub.connections():
            conn.assembler.max_message_size = new.limits.max_message_size
            tr = conn.transport
            if tr is not None and not tr.is_disconnected:
                tr.underlying_transport.set_write_buffer_limits(high=new.limits.send_buffer)
        logging.getLogger().setLevel(new.server.log_level.upper())
        log.info("SIGHUP: configuration reloaded")

    def drain(self) -> None:
        """SIGTERM: refuse new connections, disconnect the rest over the drain window."""
        if self.node.draining:
            return
        self.node.draining = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._drain()))

    async def _drain(self) -> None:
        timeout = self.node.config.server.drain_timeout
        log.info("draining: %d connections over %.1f s", self.node.hub.connection_count, timeout)
        # The listener stays open until exit: /readyz answers 503, upgrades get 503 with
        # Retry-After (a proxy retries them on another node), /metrics stays scrapeable.
        deadline = time.monotonic() + timeout
        conns = self.node.hub.connections()
        random.shuffle(conns)
        window = timeout * 0.5
        batches = max(1, min(10, len(conns)))
        per = -(-len(conns) // batches) if conns else 0
        # publications a shared broker accepted just before SIGTERM may still be on
        # their way to this node: let them arrive before the first disconnect
        await asyncio.sleep(min(DRAIN_GRACE, timeout / 10))
        for i in range(batches):
            for conn in conns[i * per:(i + 1) * per]:
                conn.disconnect(DISCONNECT_DRAINING,
                                random.randint(0, int(timeout * 1000)))
            if i + 1 < batches:
                await asyncio.sleep(window / batches)
        while self.node.hub.connection_count and time.monotonic() < deadline - 0.2:
            await asyncio.sleep(0.05)
        log.info("drained: %d connections left, exiting", self.node.hub.connection_count)
        self.stopped.set()

    async def shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for conn in self.node.hub.connections():
            if conn.transport is not None:
                conn.transport.disconnect(False)
        await self.node.close()


def _peer(transport: WSTransport) -> str:
    """``host:port`` of the socket peer (the proxy, behind one), for log lines."""
    peer = transport.underlying_transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _abort(transport: WSTransport) -> None:
    if not transport.is_disconnected:
        transport.disconnect(False)


async def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT has drained; return the exit status."""
    server = Server(config)
    try:
        await server.startup()
    except OSError as exc:
        print(f"fastws: cannot listen on {config.server.host}:{config.server.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except BrokerUnavailable as exc:
        print(f"fastws: --broker: {exc}", file=sys.stderr)
        return 2
    await server.stopped.wait()
    await server.shutdown()
    return server.exit_code


# Structured fields a log call may pass as ``extra=``: JSON keys, or ``key=value`` in text.
LOG_FIELDS = ("client", "user", "peer", "code", "limit")


class _TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value…``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={v}" for k in LOG_FIELDS
                  if (v := getattr(record, k, None)) is not None]
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return head + " " + " ".join(fields) + sep + tail


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        for k in LOG_FIELDS:
            if (v := getattr(record, k, None)) is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger: ``text`` lines or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run(config: Config) -> int:
    """Run one server process with uvloop (what ``fastws serve`` calls)."""
    setup_logging(config.server.log_level, config.server.log_format)
    if config.server.workers > 1 and workers.CURRENT is None:
        return workers.supervise(config)
    try:
        return uvloop.run(serve(config))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    from fastws.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
