"""The WebSocket adapter and the app: one port for WebSocket and HTTP.

Each accepted socket starts as an :class:`~fastws.http.HttpFront` that reads the
request head.  A WebSocket upgrade is handed to picows (the transport switches to
picows' ``WSProtocol``, which calls :meth:`App.listener_for` with the parsed request);
any other request (``/healthz``, ``/readyz``, ``/metrics``, the server API of
:mod:`fastws.api`, ``/auth/*``, the live page, ``/fastws.js``) is routed by
:meth:`App.handle_http`.  :class:`Connection` is the picows listener of one client.

``run(config)`` is what ``fastws serve`` calls: :mod:`fastws.lifecycle` with this
module's :class:`App` (startup → serve → drain → exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import random
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from picows import (
    WSAutoPingStrategy,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol

from fastws import api, auth, fallback, lifecycle, protocol, workers
from fastws._fanout import Conn
from fastws._frames import MessageAssembler, close_with, receive
from fastws.codes import (
    DISCONNECT_CONNECTION_LIMIT,
    DISCONNECT_INVALID_TOKEN,
    DISCONNECT_ORIGIN,
    DISCONNECT_SLOW,
    DISCONNECT_TOKEN_EXPIRED,
    DISCONNECT_TOKEN_REVOKED,
    Close,
    Disconnect,
)
from fastws.config import Config
from fastws.frames import negotiate_deflate
from fastws.http import Handover, bearer_token, json_response, response
from fastws.limits import KeyedLimiter, client_ip
from fastws.logs import PicowsLog
from fastws.metrics import CONTENT_TYPE, Metrics
from fastws.node import Admission, Node, expiry_timer
from fastws.session import SESSION_SLOTS, Session

__all__ = ["Connection", "App", "Server", "run", "serve"]

log = logging.getLogger("fastws")
conn_log = logging.getLogger("fastws.conn")   # one debug line per connection event

SLOW_ABORT_AFTER = 2.0          # seconds between a 4008 close and dropping the socket
WS_PATHS = ("/", "/ws")


def _http_response(status: int, body: bytes, headers: dict[str, str] | None = None):
    """An answer refusing an upgrade (a plain HTTP response), for picows."""
    resp = WSUpgradeResponse.create_error_response(status, body)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return WSUpgradeResponseWithListener(resp, None)


def _peer_ip(transport: WSTransport) -> str:
    """The socket peer's IP (lifecycle records of connections without an admission)."""
    peer = transport.underlying_transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else ""


def _peer(transport: WSTransport) -> str:
    """``host:port`` of the socket peer (the proxy, behind one), for log lines."""
    peer = transport.underlying_transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def ended_with(code: int, hs: Any) -> tuple[int, str]:
    """The close code and reason a WebSocket connection ended with (its lifecycle
    record, SPEC §12), from the code the server closed it with (0: none) and picows'
    close handshake (None: no CLOSE frame either way).

    The server's own close: ``code`` and the reason its CLOSE frame carried (empty if
    the frame said something else, or none was sent).  Else the CLOSE received, the
    client's code and reason (a frame without a code: 1005, "no status code", as RFC 6455
    7.1.5 names it; the server answers it with 1000), or the one sent (a protocol
    violation), else 1006 with no reason.
    """
    if code:
        sent = hs.sent if hs is not None else None
        return code, sent.reason if sent is not None and int(sent.code) == code else ""
    info = None if hs is None else hs.recv if hs.recv is not None else hs.sent
    if info is None:
        return Close.ABNORMAL, ""
    return int(info.code) or Close.NO_STATUS, info.reason or ""


class Connection(Conn, Session):
    """One WebSocket connection: the picows listener (the hub's :class:`Conn`) and the
    client's :class:`~fastws.session.Session` in one object (one per connection)."""

    __slots__ = (*SESSION_SLOTS, "assembler", "close_code", "pending_close", "expiry")

    host: Node                        # the session's host is the node

    def __init__(self, node: Node, pending_close: Disconnect | None) -> None:
        self.init_session(node, node.next_client_id())
        self.assembler = MessageAssembler(node.config.limits.max_message_size)
        self.close_code = 0
        self.pending_close = pending_close
        self.expiry: asyncio.TimerHandle | None = None  # closes 4501 at the token's exp

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        node = self.host
        self.hub = node.hub
        node.accepted += 1
        if self.pending_close is not None:
            self.disconnect(self.pending_close)
            return
        node.hub.add_connection(self)
        node.connected(self, "websocket", _peer_ip(transport))
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
            self.host.messages_received += 1
            self.close(Close.UNSUPPORTED_DATA, "binary messages are not supported")
            return
        req = self.receive(payload)
        if req is not None:
            self.host.run(self, req)

    def arm_expiry(self, at: float | None) -> None:
        """Disconnect with 4501 "token expired" at ``at`` (wall clock); None cancels."""
        self.expiry = expiry_timer(self.expiry, at, self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        code, reason = ended_with(self.close_code, transport.close_handshake)
        self.host.drop(self, code, reason)
        if conn_log.isEnabledFor(logging.DEBUG):
            conn_log.debug("connection closed", extra={
                "client": self.client_id, "user": self.user, "code": code,
                "reason": reason})

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
        self.picows_log = PicowsLog(logging.getLogger("fastws.picows"))
        # HttpFront reads into this and copies out at once (one event loop, one reader)
        self.read_view = memoryview(bytearray(65536))
        self.ip_connections = KeyedLimiter()   # connections_per_ip
        self.ip_requests = KeyedLimiter()      # requests_per_ip_per_s
        self._trusted: tuple[Any, Any] = (None, ())
        self._wallets: auth.ContractWallets | None = None   # EIP-1271 (siwe_rpc_url)
        self._trim: asyncio.TimerHandle | None = None       # release_memory() scheduled

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
        origin = request.headers.get("origin", "")
        if origins and origin and not auth.origin_listed(origins, origin):
            pending = DISCONNECT_ORIGIN  # (no Origin: not a browser, nothing to protect)
        ident = None
        token = parse_qs(url.query).get("token", [None])[0]
        if token is None:
            token = bearer_token(request.headers.get("authorization", ""))
        admission = self.admission      # the connect proxy's, set while it is handed over
        if token and pending is None and admission is None:
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
        if admission is not None:
            node.admit(conn, admission)
            if pending is None and admission.disconnect is not None:
                conn.pending_close = admission.disconnect
        offer = ", ".join(request.headers.getall("sec-websocket-extensions", ()))
        if offer and node.config.server.compression:
            deal = negotiate_deflate(offer)
            if deal is not None:                 # SPEC §9: one compressed frame for all
                conn.deflate = 1 if deal[1] else 2
                conn.assembler.deflate = True
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_101_response(
                        {"Sec-WebSocket-Extensions": deal[0]}), conn)
        return conn

    # ------------------------------------------------------------------ connect proxy

    admission: Admission | None = None   # set by HttpFront while an admitted upgrade is handed over
    peer: asyncio.BaseTransport | None = None   # set by HttpFront while handle_http runs

    def admit(self, transport: asyncio.Transport, path: str,
              headers: dict[str, str]) -> asyncio.Future | None:
        """HttpFront's step before an upgrade: None (go on now) unless ``[proxy]
        connect`` is set and the request has no valid JWT; then a future of the
        backend's :class:`~fastws.node.Admission` or ``(status, message, headers)``
        refusing it (401/403 as the backend says; 503 when it is down, slow or
        answers garbage: fail closed)."""
        node = self.node
        url = urlsplit(path)
        if node.config.proxy.connect is None or node.draining or url.path not in WS_PATHS:
            return None
        token = parse_qs(url.query).get("token", [None])[0]
        if token is None:
            token = bearer_token(headers.get("authorization", ""))
        if not node.proxied(token or None):
            return None                 # a valid JWT: listener_for takes it
        return self.loop.create_task(node.admission(
            "websocket", self.client_ip(transport, headers), headers, token or None))

    def client_ip(self, transport: asyncio.BaseTransport, headers: dict[str, str]) -> str:
        """The client IP of a request (the last X-Forwarded-For hop behind a trusted
        proxy, else the peer)."""
        server = self.node.config.server
        if self._trusted[0] is not server:
            self._trusted = (server, server.trusted_networks())
        peer = transport.get_extra_info("peername")
        ip, _ = client_ip(peer[0] if isinstance(peer, tuple) else None,
                          headers.get("x-forwarded-for"), self._trusted[1])
        return ip or ""

    # ------------------------------------------------------------------ HTTP

    def handle_http(self, method: str, path: str, headers: dict[str, str],
                    body: bytes) -> bytes | asyncio.Future | Handover:
        """Answer one plain HTTP request (bytes, a future of bytes, or a handover of
        the connection: an SSE stream)."""
        route = urlsplit(path).path
        handler = api.ROUTES.get(route)
        if handler is not None:
            if method != "POST":
                return response(405, b'{"error":"use POST"}', {"Allow": "POST"})
            return self.loop.create_task(handler(self.node, headers, body))
        if route in ("/auth/nonce", "/auth/siwe"):
            return self.loop.create_task(self._auth(method, route, headers, body))
        if route in fallback.PATHS:     # SSE, long-poll, HTTP calls (SPEC §10)
            return fallback.handle(self, method, path, headers, body)
        if method not in ("GET", "HEAD"):
            return response(405, b'{"error":"method not allowed"}', {"Allow": "GET"})
        if route == "/healthz":
            return json_response(200, {"status": "ok"})
        if route == "/readyz":
            if self.node.ready:
                return json_response(200, {"status": "ready"})
            reason = "draining" if self.node.draining else "broker unavailable"
            return json_response(503, {"status": "not ready", "reason": reason})
        if route == "/metrics":
            if workers.CURRENT is not None:  # the sum over every worker
                return self.loop.create_task(self._metrics_all(workers.CURRENT))
            return response(200, self.metrics.render(), {"Content-Type": CONTENT_TYPE})
        if route == "/fastws.js":
            return response(200, self.static["/fastws.js"],
                            {"Content-Type": "text/javascript; charset=utf-8",
                             "Cache-Control": "no-cache"})
        if route in ("/", "/index.html"):
            return response(200, self.static["/"], {"Content-Type": "text/html; charset=utf-8"})
        return json_response(404, {"error": "not found"})

    async def _auth(self, method: str, route: str, headers: dict[str, str],
                    body: bytes) -> bytes:
        # the broker spends SIWE nonces: once across every process and node sharing it
        status, obj, hdrs = await auth.http_auth(self.node.siwe, method, route, headers, body,
                                                 claim=self.node.broker.claim_once,
                                                 origins=self.node.config.server.allow_origins,
                                                 wallets=self._contract_wallets())
        if obj is None:
            return response(status, b"", hdrs)
        return json_response(status, obj, hdrs)

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
        return response(200, body, {"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------------ lifecycle hooks

    def on_slow(self, conn: Connection) -> None:
        """The hub's slow-consumer hook: close with 4008 now, drop the socket soon after."""
        conn.close_code = Close.SLOW_CONSUMER
        log.warning("slow consumer: send_buffer exceeded, closing with 4008",
                    extra={"client": conn.client_id, "user": conn.user})
        tr = conn.transport
        if tr is None or tr.is_disconnected:
            return
        with contextlib.suppress(Exception):
            close_with(tr, Close.SLOW_CONSUMER, DISCONNECT_SLOW.reason)
        self.loop.call_later(SLOW_ABORT_AFTER, _abort, tr)
        if self._trim is None:          # once the dropped queues are freed: give them back
            self._trim = self.loop.call_later(SLOW_ABORT_AFTER + 0.5, self._release_memory)

    def _release_memory(self) -> None:
        """Return the freed heap of dropped slow consumers to the OS (glibc keeps it)."""
        self._trim = None
        release_memory()

    def on_heartbeat_timeout(self, conn: Connection) -> None:
        """The hub's heartbeat hook: close going-away, drop the socket soon after."""
        conn.close(Close.GOING_AWAY, "heartbeat timeout")
        if conn.transport is not None:
            self.loop.call_later(SLOW_ABORT_AFTER, _abort, conn.transport)

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: the open connections take the reloaded message size and send buffer."""
        for conn in self.node.hub.connections():
            if conn.relay:          # SSE / long-poll (fastws.fallback): no frames read
                continue
            conn.assembler.max_message_size = config.limits.max_message_size
            tr = conn.transport
            if tr is not None and not tr.is_disconnected:
                tr.underlying_transport.set_write_buffer_limits(high=config.limits.send_buffer)

    def close_all(self) -> None:
        """Shutdown: drop every connection's socket (no close handshake)."""
        for conn in self.node.hub.connections():
            if conn.transport is not None:
                conn.transport.disconnect(False)
            elif isinstance(conn, fallback.SseStream):
                conn.abort()


def _libc_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


def release_memory() -> None:
    """Hand free heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A slow consumer's queue (up to ``send_buffer``) is freed when it is dropped, but
    glibc keeps freed heap memory that is not at the top of the heap: RSS would stay at
    its peak (measured in docs/benchmarks.md, "Stalled readers")."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _abort(transport: WSTransport) -> None:
    if not transport.is_disconnected:
        transport.disconnect(False)


# ---------------------------------------------------------------------- lifecycle


class Server(lifecycle.Server):
    """One process serving :class:`App` (:class:`fastws.lifecycle.Server`)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, App)


async def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT has drained; return the exit status."""
    return await lifecycle.serve(config, App)


def run(config: Config) -> int:
    """Run one server process with uvloop (what ``fastws serve`` calls)."""
    return lifecycle.run(config, App)

