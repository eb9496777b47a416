"""HTTP/1.1 on the one port: request heads in, responses out, upgrades handed over.

* :func:`parse_head`, :func:`body_length` and :func:`keep_alive` are pure: bytes and
  headers in, the request's parts (or an :class:`HttpError`) out.
* :func:`response` and :func:`json_response` build a whole answer (head and body).
* :class:`HttpFront` is the asyncio protocol of every accepted socket: it reads
  request heads and bodies, answers them through its :class:`HttpApp` (keep-alive,
  a deadline for each head), and hands a WebSocket upgrade, with the bytes already
  read, to the protocol the app's ``make_ws_protocol`` makes.

Nothing here knows the WebSocket library: the app makes the protocol an upgrade
switches to.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from fastws._version import __version__
from fastws.limits import retry_after

__all__ = ["Handover", "HttpApp", "HttpError", "HttpFront", "REASONS", "body_length",
           "json_response", "keep_alive", "parse_head", "response"]

log = logging.getLogger("fastws")

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
HEAD_TIMEOUT = 10.0             # seconds to send a whole request head (slowloris)
KEEPALIVE_TIMEOUT = 75.0        # seconds an idle keep-alive HTTP connection stays open
MAX_PIPELINE = 64               # requests of one connection started, not yet answered

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 501: "Not Implemented",
           405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


class HttpError(Exception):
    """A request refused before it reaches the app: its status and the ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_head(buf: bytes) -> tuple[str, str, str, dict[str, str], int] | None:
    """The request head at the start of ``buf``: ``(method, path, version, headers,
    body_start)``, header names lower-cased, ``body_start`` the offset after the blank
    line; None while the head is incomplete.

    Raises :class:`HttpError`: 431 for a head over ``MAX_HEAD`` bytes, 400 for a
    malformed request line or header line.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError(431, "request head too large")
        return None
    if end > MAX_HEAD:
        raise HttpError(431, "request head too large")
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers, end + 4


def body_length(headers: dict[str, str]) -> int:
    """The body's length (``Content-Length``, 0 without one).

    Raises :class:`HttpError`: 400 for a Content-Length that is not an integer or for
    any Transfer-Encoding (chunked bodies are not read), 413 for a negative length or
    one over ``MAX_BODY``.
    """
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if "transfer-encoding" in headers:
        raise HttpError(400, "Transfer-Encoding is not supported; send Content-Length")
    if length < 0 or length > MAX_BODY:
        raise HttpError(413, "body too large")
    return length


def keep_alive(version: str, headers: dict[str, str]) -> bool:
    """Whether the connection stays open after the answer: HTTP/1.1 without
    ``Connection: close`` (an HTTP/1.0 request is answered, then closed)."""
    return version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"


def response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 answer: status line, ``Content-Length``, ``Server``,
    ``Content-Type: application/json`` unless ``headers`` says otherwise, the body."""
    if status == 204:       # no body, no Content-Length (RFC 9110)
        head = ["HTTP/1.1 204 No Content", f"Server: fastws/{__version__}"]
        hdrs = {}
    else:
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
                f"Content-Length: {len(body)}", f"Server: fastws/{__version__}"]
        hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    head += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> bytes:
    """:func:`response` with ``obj`` as a JSON body (one line)."""
    return response(status, orjson.dumps(obj) + b"\n", headers)


class Handover:
    """An answer that takes the connection over (a Server-Sent Events stream):
    :class:`HttpFront` stops reading requests on it and calls ``take(transport, rest)``
    with the bytes read after the request; the taker answers and owns the socket."""

    __slots__ = ("take",)

    def __init__(self, take: Callable[[asyncio.Transport, bytes], None]) -> None:
        self.take = take


class HttpApp(Protocol):
    """What :class:`HttpFront` needs from the app it serves."""

    loop: asyncio.AbstractEventLoop
    read_view: memoryview    # the one scratch buffer every HttpFront reads into
    peer: asyncio.BaseTransport | None   # set by HttpFront while handle_http runs

    def ip_limit(self, transport: asyncio.BaseTransport, headers: dict[str, str],
                 upgrade: bool) -> float:
        """0.0 if the request may go on, else the seconds to wait (answered 429)."""

    def handle_http(self, method: str, path: str, headers: dict[str, str],
                    body: bytes) -> bytes | asyncio.Future | Handover:
        """The answer to one plain request: bytes, a future of bytes, or a
        :class:`Handover` of the connection."""

    def make_ws_protocol(self) -> asyncio.BufferedProtocol:
        """A new protocol for an upgrade request: it gets the transport and the bytes
        read so far (the request head included)."""


class HttpFront(asyncio.BufferedProtocol):
    """Reads HTTP request heads; answers plain requests, hands upgrades over.

    A buffered protocol reading into the app's one scratch buffer, with no
    ``data_received`` attribute: uvloop keeps a transport's last ``data_received``
    bound method even after ``set_protocol`` to picows (which has none), and with it
    this object, ~140 B per WebSocket connection.

    Pipelined requests are started as soon as they are read, without waiting for the
    answer to the previous one (publications sent back to back reach the hub in one
    loop pass and leave in one write per subscriber); the answers still go out in
    request order through ``pending``.  Reading stops at ``MAX_PIPELINE`` unanswered
    requests, after a request that closes the connection, and before an upgrade until
    every earlier answer is written.
    """

    __slots__ = ("app", "transport", "buf", "busy", "closing", "timer", "pending")

    def __init__(self, app: HttpApp) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        # answers owed, in request order: [answer (None until its future is done),
        # keep-alive (None: a refusal that closes), method]
        self.pending: deque[list[Any]] = deque()

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
        if self.transport is not None and not self.busy and not self.closing \
                and not self.pending:
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
        # Vary: Origin as on every /auth/* answer (docs/security.md): a refusal written
        # here, before routing, may answer one of them
        answer = json_response(status, {"error": message},
                               {**(headers or {}), "Vary": "Origin", "Connection": "close"})
        self.buf = b""
        if self.pending:    # after the answers owed to the requests before it
            self.pending.append([answer, None, ""])
            self.busy = True
            return
        self.transport.write(answer)
        self.transport.close()
        self.closing = True

    def _process(self) -> None:
        app = self.app
        while self.transport is not None and not self.closing and not self.busy:
            if len(self.pending) >= MAX_PIPELINE:
                return
            buf = self.buf
            try:
                head = parse_head(buf)
            except HttpError as exc:
                self._fail(exc.status, exc.message)
                return
            if head is None:
                return
            method, path, version, headers, start = head
            upgrade = headers.get("upgrade", "").lower() == "websocket"
            if upgrade and self.pending:
                return      # switched once every earlier answer is written
            wait = app.ip_limit(self.transport, headers, upgrade)
            if wait:
                self._fail(429, "too many new connections from this IP" if upgrade else
                           "too many requests from this IP", {"Retry-After": retry_after(wait)})
                return
            if upgrade:
                self._admit(path, headers)
                return
            try:
                length = body_length(headers)
            except HttpError as exc:
                self._fail(exc.status, exc.message)
                return
            end = start + length
            if len(buf) < end:
                return
            body = buf[start:end]
            self.buf = buf[end:]
            keep = keep_alive(version, headers)
            app.peer = self.transport   # whose request handle_http answers (its client IP)
            try:
                answer = app.handle_http(method, path, headers, body)
            except Exception:
                log.exception("internal error answering %s %s", method, path)
                answer = json_response(500, {"error": "internal error"})
            finally:
                app.peer = None
            if not keep:
                self.busy = True    # nothing after a request that closes is read
            if isinstance(answer, bytes):
                if self.pending:
                    self.pending.append([answer, keep, method])
                else:
                    self._send(answer, keep, method)
            elif isinstance(answer, Handover):
                if self.pending:    # taken over after the answers owed before it
                    self.pending.append([answer, keep, method])
                    self.busy = True
                else:
                    self._hand_over(answer)
                return
            else:
                entry = [None, keep, method]
                self.pending.append(entry)
                answer.add_done_callback(lambda fut, e=entry: self._done(fut, e))

    def _done(self, fut: asyncio.Future, entry: list[Any]) -> None:
        try:
            answer = fut.result()
        except Exception:
            log.exception("internal error in an HTTP handler")
            answer = json_response(500, {"error": "internal error"})
        entry[0] = answer
        pending = self.pending
        while pending and pending[0][0] is not None:
            answer, keep, method = pending.popleft()
            if isinstance(answer, Handover):
                self._hand_over(answer)
                return
            self._send(answer, keep, method)
        if self.buf:    # requests read meanwhile and not started (pipeline full, upgrade)
            self._process()

    def _send(self, answer: bytes, keep: bool | None, method: str) -> None:
        if self.transport is None:
            return
        if method == "HEAD":
            answer = answer[:answer.find(b"\r\n\r\n") + 4]
        if keep is False:
            answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        self.transport.write(answer)
        if not keep:
            self.transport.close()
            self.closing = True
        else:
            self._arm(KEEPALIVE_TIMEOUT if not self.buf else HEAD_TIMEOUT)

    def _hand_over(self, answer: Handover) -> None:
        """Give the connection to ``answer`` with what was read after the request."""
        self._arm(None)
        if self.transport is None:   # the client went away while earlier answers waited
            return
        transport, rest = self.transport, self.buf
        self.buf = b""
        self.transport = None
        self.closing = True
        answer.take(transport, rest)

    def _admit(self, path: str, headers: dict[str, str]) -> None:
        """Hand the upgrade over now, or once the app's ``admit`` step (the connect
        proxy: an awaitable) allows it.  Its future gives None or an admission (go
        on: the app reads ``app.admission`` while the upgrade is handed over) or
        ``(status, message, headers)`` (refused: that HTTP answer)."""
        admit = getattr(self.app, "admit", None)
        pending = admit(self.transport, path, headers) if admit is not None else None
        if pending is None:
            self._upgrade()
            return
        self.busy = True
        pending.add_done_callback(self._admitted)

    def _admitted(self, fut: asyncio.Future) -> None:
        self.busy = False
        if self.transport is None or self.closing:
            return
        try:
            verdict = fut.result()
        except Exception:
            log.exception("internal error admitting a connection")
            verdict = (500, "internal error", None)
        if isinstance(verdict, tuple):
            self._fail(*verdict)
            return
        app: Any = self.app
        app.admission = verdict
        try:
            self._upgrade()
        finally:
            app.admission = None

    def _upgrade(self) -> None:
        """Switch the transport to the app's WebSocket protocol and feed it what was read."""
        self._arm(None)          # the WebSocket protocol has its own handshake timeout
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


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None
