"""Delivery to the fallback transports' sessions (SPEC §10, :mod:`fastws.fallback`).

The hub's broadcast loop copies a WebSocket frame into the C queue of each WebSocket
receiver; a :class:`Relayed` session (SSE stream, long-poll) has the ``relay`` flag, so
the loop calls its :meth:`Relayed.deliver` with the frame instead.  It turns the
publication into the transport's chunk carrying the session's new cursor
(:mod:`fastws.cursor`), worked out once per publication and cursor and shared by the
sessions in the same position, and queues it; :class:`Relay` writes each session's
queue once per loop pass, like ``Hub.flush``.  :class:`Plan` is a checked ``/sse`` or
``/poll`` request, what a session subscribes from where.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastws import auth, cursor
from fastws._fanout import Conn
from fastws.codes import Disconnect
from fastws.node import expiry_timer
from fastws.protocol import Request
from fastws.session import SESSION_SLOTS, Session

__all__ = ["POLL_TIMEOUT", "Plan", "Relay", "Relayed", "RELAYED_SLOTS", "one_line",
           "relay_of_loop"]

log = logging.getLogger("fastws")

POLL_TIMEOUT = 25.0             # seconds, default of ?timeout= (1–60)


@dataclass(slots=True)
class Plan:
    """A checked ``/sse`` or ``/poll`` request: what to subscribe, from where."""

    names: list[str]
    positions: cursor.Positions
    unrecovered: bool = False
    ident: auth.Identity | None = None
    cors: dict[str, str] = field(default_factory=dict)
    timeout: float = POLL_TIMEOUT
    given_cursor: bool = False
    token: str | None = None
    proxied: bool = False           # the connect proxy decides (no valid JWT)
    admission: Any = None           # its node.Admission, once it answered
    end: Disconnect | None = None   # the admission's disconnect: accepted, then closed
    ip: str = ""




class Relay:
    """The write pass of this module's sessions: each session's queue leaves in one
    write per loop pass (like ``Hub.flush``), and each publication's SSE event is
    worked out once per (publication, cursor) in a pass."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[Relayed] = []
        self.scheduled = False
        self.frames: dict[int, tuple[bytes, bytes, dict[str, Any] | None]] = {}
        # per transport: (frame id, cursor before) → (frame, chunk, positions, cursor)
        self.sse_chunks: dict[tuple[int, bytes], tuple[Any, ...]] = {}
        self.poll_chunks: dict[tuple[int, bytes], tuple[Any, ...]] = {}
        self.sent = 0               # bytes written outside flush (counted in the next one)
        self.writes = 0

    def add(self, sess: Relayed) -> None:
        self.pending.append(sess)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def parsed(self, frame: bytes) -> tuple[bytes, bytes, dict[str, Any] | None]:
        """(frame, payload, decoded message) of a WebSocket frame, once per pass."""
        hit = self.frames.get(id(frame))
        if hit is not None and hit[0] is frame:
            return hit
        n = frame[1] & 0x7F
        payload = frame[2 if n < 126 else (4 if n == 126 else 10):]
        hit = self.frames[id(frame)] = (frame, payload, orjson.loads(payload))
        return hit

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        sent = writes = 0
        for sess in pending:
            sess.queued = False
            try:
                if not sess.sse:
                    sess.write_out()
                    continue
                out = sess.out              # SseStream.write_out, inlined (once per stream)
                sock = sess.sock
                if not out or sock is None or sock.is_closing():
                    continue
                sess.out = []
                data = out[0] if len(out) == 1 else b"".join(out)
                sock.write(data)
                sent += len(data)
                writes += 1
            except Exception:
                log.exception("writing to a %s session failed", sess.transport_name)
        self.frames.clear()     # the frames kept alive for this pass may go now
        self.sse_chunks.clear()
        self.poll_chunks.clear()
        sent += self.sent
        writes += self.writes
        if writes:
            pending[0].hub.count_sent(sent, writes)
            self.sent = self.writes = 0


_relays: dict[asyncio.AbstractEventLoop, Relay] = {}


def relay_of_loop() -> Relay:
    loop = asyncio.get_running_loop()
    relay = _relays.get(loop)
    if relay is None:
        _relays.clear()         # one loop per process (a test may start several in turn)
        relay = _relays[loop] = Relay(loop)
    return relay


def one_line(payload: bytes) -> bytes:
    """``payload`` on one line: JSON whitespace between tokens may hold a newline (a
    raw ``redis-cli PUBLISH``), a string may not."""
    if b"\n" in payload or b"\r" in payload:
        payload = payload.replace(b"\r", b" ").replace(b"\n", b" ")
    return payload


#: the slots of a Relayed session (its subclasses add their own)
RELAYED_SLOTS = (*SESSION_SLOTS, "node", "positions", "cursor", "out", "unrecovered",
                 "close_code", "close_reason", "expiry", "relay_")


class Relayed(Conn, Session):
    """A session of a fallback transport: the hub delivers to it through
    :meth:`deliver` (its ``relay`` flag); it keeps every subscription's position and
    queues what it sends for one write per loop pass.  Subclasses set
    ``transport_name`` and implement :meth:`chunk` and :meth:`write_out`."""

    __slots__ = ()      # a subclass lists RELAYED_SLOTS and its own
    transport_name = ""
    sse = False         # an SSE stream: Relay.flush writes its queue inline

    node: Any
    positions: cursor.Positions
    cursor: bytes
    out: list[bytes]
    unrecovered: bool
    close_code: int
    close_reason: str
    expiry: asyncio.TimerHandle | None
    relay_: Relay

    def init_relayed(self, node: Any, plan: Plan) -> None:
        self.init_session(node, node.next_client_id())
        self.node = node
        self.hub = node.hub
        self.relay = True
        self.relay_ = relay_of_loop()
        self.positions = dict(plan.positions)
        self.cursor = cursor.encode(self.positions)
        self.out = []
        self.unrecovered = plan.unrecovered
        self.close_code, self.close_reason = 0, ""     # the server's, if it ended it
        self.expiry = None
        if plan.admission is not None:        # the connect proxy's (SPEC §11)
            node.admit(self, plan.admission)
        elif plan.ident is not None:
            self.set_identity(plan.ident)

    # what the hub and the node call

    def deliver(self, frame: bytes) -> bool:
        """The hub's broadcast: queue one publication (or presence push) frame."""
        try:
            relay = self.relay_
            chunks = relay.poll_chunks
            key = (id(frame), self.cursor)
            hit = chunks.get(key)
            if hit is None or hit[0] is not frame:
                _, payload, msg = relay.parsed(frame)
                hit = chunks[key] = (frame, *self._advance(payload, msg))
            self._queue(hit[1], hit[2], hit[3])
            return True
        except Exception:
            log.exception("delivery to a %s session failed", self.transport_name)
            return False

    def send_text(self, payload: bytes) -> None:
        """A reply or push (after everything queued)."""
        if self.closing:
            return
        msg = orjson.loads(payload)
        if self.unrecovered and msg.get("type") == "subscribed" and "recovered" not in msg:
            msg["recovered"] = False        # a cursor of another channel set: none
            payload = orjson.dumps(msg)
        self._queue(*self._advance(payload, msg))

    def _advance(self, payload: bytes, msg: Any) -> tuple[bytes, cursor.Positions, bytes]:
        """(chunk, positions, cursor) after ``msg`` is sent."""
        new = cursor.advance(self.positions, msg) if isinstance(msg, dict) else None
        if new is None:
            return self.chunk(payload, None), self.positions, self.cursor
        cur = cursor.encode(new)
        return self.chunk(payload, cur), new, cur

    def _queue(self, chunk: bytes, positions: cursor.Positions, cur: bytes) -> None:
        self.positions, self.cursor = positions, cur
        self.out.append(chunk)
        if not self.queued:
            self.queued = True
            self.relay_.add(self)

    def chunk(self, payload: bytes, cur: bytes | None) -> bytes:
        """What the transport sends for one message (``cur``: a new cursor, or None)."""
        raise NotImplementedError

    def write_out(self) -> None:
        """Send what was queued in this loop pass."""
        raise NotImplementedError

    def leave_node(self, code: int, reason: str) -> None:
        """The session ended: :meth:`Node.drop <fastws.node.Node.drop>` with the close
        the server ended it with, if it did, else ``code`` and ``reason`` (how the
        transport ended it)."""
        if self.close_code:
            code, reason = self.close_code, self.close_reason
        self.node.drop(self, code, reason)

    def arm_expiry(self, at: float | None) -> None:
        """Disconnect with 4501 "token expired" at ``at`` (wall clock); None cancels."""
        self.expiry = expiry_timer(self.expiry, at, self)

    def subscribe_all(self, plan: Plan) -> None:
        """Subscribe every channel of the request as a WebSocket client would: from its
        position when the cursor has one, else ``positioned``."""
        for i, name in enumerate(plan.names, 1):
            pos = plan.positions.get(name)
            since = cursor.since(pos)
            self.node.run(self, Request("subscribe", i, name, since=since,
                                        positioned=since is None))
