"""Fan-out benchmark: N subscribers on one channel, one publisher, exact accounting.

``python -m loadtest.fanout`` (what ``fastws bench`` runs) starts a fastws server as a
subprocess (or uses ``--url``), connects ``--subscribers`` WebSocket connections spread
over ``--procs`` client processes, subscribes each to ``bench:fanout``, then one
publisher connection keeps ``--inflight`` publications in flight for ``--warmup`` +
``--duration`` seconds.  Every publication carries ``{"t": time_ns, "seq": n}``; every
subscriber checks that it sees seq 1, 2, 3, ... exactly once, in order, and records the
publish-to-receive latency into a fixed-bucket log histogram (no per-message lists).

Reported: deliveries/s over the measuring window (after the warm-up), p50/p99/max
latency, lost / duplicated / out-of-order deliveries, server RSS per idle connection
(``/proc/PID/status`` VmRSS before connecting and after connecting + subscribing) and
server / client CPU use during the window (to see which side was the bottleneck).

``--path`` picks how publications reach the server (the path a producer uses):

* ``client``: ``publish`` requests over one WebSocket (the namespace ``bench`` lets
  clients publish, and the per-connection message limit is raised: the only
  non-default settings of any path);
* ``http``: ``POST /api/publish``, one publication per request, ``--inflight``
  requests pipelined on one keep-alive connection;
* ``http-conns``: ``POST /api/publish`` over ``--connections`` keep-alive connections,
  one request in flight on each (publications of different connections may arrive in
  any order: each connection numbers its own, and subscribers check each sequence);
* ``redis``: the server uses a Redis broker (a ``redis-server`` the harness starts on
  the server's CPU, or ``--redis-url``) and the publisher pipelines raw
  ``PUBLISH bench:fanout PAYLOAD`` commands into Redis (what ``redis-cli`` sends).

Only picows, uvloop and orjson are used: the harness never imports fastws, so it can
measure any server speaking the fastws protocol (section 4 of docs/protocol.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import multiprocessing as mp
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CHANNEL = "bench:fanout"
SERVER_CONFIG = """\
# written by loadtest.fanout: lets benchmark clients publish on bench:*
[server]
drain_timeout = 2

[limits]
messages_per_connection = 1000000000
messages_window = 1
max_connections = 0

[namespaces.bench]
publish = "anyone"
history_size = 0
"""
# The configuration of each --path: the defaults, plus only what the path needs.
PATHS = ("client", "http", "http-conns", "redis")
API_KEY = "bench-key"
PATH_CONFIG = """\
# written by loadtest.fanout: the default configuration{extra}
[server]
drain_timeout = 2
"""
CLIENT_PUBLISH_CONFIG = """\
# written by loadtest.fanout --path client: the defaults, except that clients may
# publish on bench:* and the per-connection message limit is raised
[server]
drain_timeout = 2

[limits]
messages_per_connection = 1000000000

[namespaces.bench]
publish = "anyone"
"""
MAX_LANES = 64   # publishing connections of --path http-conns (= _fastsub MAX_LANES)
_time_ns = time.time_ns
FD_HEADROOM = 64  # descriptors each client process keeps for itself
MAX_PER_PROC_DEFAULT = 19000  # ulimit -n is 20000 here and cannot be raised
PORTS_PER_SOURCE_IP = 25000  # ephemeral ports per (source IP, server port), with margin

# ---------------------------------------------------------------------------------------
# Latency histogram: microseconds, exact below 32 µs, then 16 sub-buckets per power of two
# (≤ 6.25 % relative bucket width).  Index 511 covers everything above ~9 hours.
# ---------------------------------------------------------------------------------------
HIST_BUCKETS = 512


def hist_index(us: int) -> int:
    """Bucket index of a latency in microseconds (same arithmetic as the hot path)."""
    if us < 32:
        return us if us > 0 else 0
    s = us.bit_length() - 5
    idx = (s << 4) + (us >> s)
    return idx if idx < HIST_BUCKETS else HIST_BUCKETS - 1


def hist_bounds(idx: int) -> tuple[int, int]:
    """Inclusive [low, high] microsecond range of bucket idx."""
    if idx < 32:
        return idx, idx
    s = (idx >> 4) - 1
    low = ((idx & 15) + 16) << s
    return low, low + (1 << s) - 1


def hist_percentile(hist: list[int], q: float, max_us: int) -> float | None:
    """Upper bound (µs) of the bucket holding quantile q (0..1), capped at the exact max."""
    total = sum(hist)
    if total == 0:
        return None
    rank = max(1, int(q * total + 0.999999))
    acc = 0
    for idx, n in enumerate(hist):
        acc += n
        if acc >= rank:
            return float(min(hist_bounds(idx)[1], max_us))
    return float(max_us)


# ---------------------------------------------------------------------------------------
# Client side (runs in the worker processes)
# ---------------------------------------------------------------------------------------
class Stats:
    """Counters shared by all subscribers of one worker process (plain Python ints)."""

    __slots__ = (
        "win_start", "win_end", "received", "in_window", "duplicates", "gaps", "max_us",
        "hist", "disconnected", "closing", "close_codes", "bad_frames", "first_error",
        "lanes", "wire_bytes", "compressed",
    )

    def __init__(self) -> None:
        self.win_start = 1 << 62  # time_ns bounds of the measuring window
        self.win_end = 1 << 62
        self.received = 0       # every event push received
        self.in_window = 0      # event pushes received inside the window
        self.duplicates = 0     # seq <= last seq seen by that subscriber
        self.gaps = 0           # seq > last + 1 (something skipped, maybe reordered)
        self.max_us = 0         # exact max latency inside the window
        self.hist = [0] * HIST_BUCKETS
        self.disconnected = 0   # connections lost before the harness closed them
        self.closing = False
        self.close_codes: dict[int, int] = {}
        self.bad_frames = 0
        self.first_error = ""
        self.lanes = 1          # publishers numbering their own publications (see seq_check)
        self.wire_bytes = 0     # TEXT payload bytes as received (compressed or not)
        self.compressed = 0     # TEXT frames that came compressed (RSV1)


def seq_check(sub: Any, lanes: int, seq: int) -> int:
    """Account ``seq`` for one subscriber: 0 in order, 1 a duplicate, 2 a gap.

    One lane: publications are numbered 1, 2, 3, ... and ``sub.last`` is the last seen.
    ``lanes`` > 1: publication ``seq`` is number ``(seq - 1) // lanes + 1`` of lane
    ``(seq - 1) % lanes`` (one publishing connection each, so lanes may interleave in
    any order); each lane must be seen in order, and ``sub.last`` counts the distinct
    publications seen.  The compiled subscriber does the same in C.
    """
    if lanes <= 1:
        last = sub.last
        if seq == last + 1:
            sub.last = seq
            return 0
        if seq <= last:
            return 1
        sub.last = seq
        return 2
    lane, idx = (seq - 1) % lanes, (seq - 1) // lanes + 1
    seen = sub.lane_last
    if idx <= seen[lane]:
        return 1
    sub.last += 1
    gap = idx != seen[lane] + 1
    seen[lane] = idx
    return 2 if gap else 0


class Subscriber(WSListener):
    """One subscriber connection: subscribes, then accounts every event push."""

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self.stats = stats
        self.last = 0
        self.lane_last = [0] * MAX_LANES
        self.transport: WSTransport | None = None
        self.subscribed: asyncio.Future[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Remember the transport; subscribing is driven by the worker."""
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Hot path: find "t": and "seq": without a JSON decode, update counters.

        ``frame.msg_type`` costs ~0.3 µs (it builds an enum), so the payload is searched
        first and the type is only looked at for frames that are not event pushes.
        """
        buf = frame.get_payload_as_bytes()
        if frame.rsv1:          # permessage-deflate (--compression)
            self.stats.wire_bytes += len(buf)
            self.stats.compressed += 1
            buf = _inflate(buf)
        elif frame.msg_type is WSMsgType.TEXT:
            self.stats.wire_bytes += len(buf)
        i = buf.find(b'"t":')
        if i < 0:
            if frame.msg_type is WSMsgType.TEXT:
                self._reply(buf)
            else:
                self._control_frame(transport, frame)
            return
        st = self.stats
        now = _time_ns()
        j = buf.find(b",", i)
        try:
            t = int(buf[i + 4:j])
            if buf.startswith(b'"seq":', j + 1):
                seq = int(buf[j + 7:buf.find(b",", j + 7)])
            else:
                k = buf.find(b'"seq":', i)
                seq = int(buf[k + 6:buf.find(b",", k)])
        except ValueError:  # another key order or layout: decode for real
            try:
                data = orjson.loads(buf)["data"]
                t = int(data["t"])
                seq = int(data["seq"])
            except Exception:  # noqa: BLE001 - count, never crash the hot path
                st.bad_frames += 1
                return
        st.received += 1
        check = seq_check(self, st.lanes, seq)
        if check == 1:
            st.duplicates += 1
        elif check == 2:
            st.gaps += 1
        if st.win_start <= now < st.win_end:
            st.in_window += 1
            us = (now - t) // 1000
            if us < 32:
                idx = us if us > 0 else 0
            else:
                s = us.bit_length() - 5
                idx = (s << 4) + (us >> s)
                if idx >= HIST_BUCKETS:
                    idx = HIST_BUCKETS - 1
                if us > st.max_us:
                    st.max_us = us
            st.hist[idx] += 1

    def _reply(self, buf: bytes) -> None:
        on_reply(self, buf)

    def _control_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        on_control(self, transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Count connections that the server (or the network) dropped during the run."""
        if not self.stats.closing:
            self.stats.disconnected += 1
        fut = self.subscribed
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("disconnected before subscribed"))


def _inflate(payload: bytes) -> bytes:
    """One permessage-deflate message (the server keeps no context between messages)."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


#: What ``--compression`` subscribers offer: Chromium's offer.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"


def demo_events(bets: int = 2, n: int = 64, seed: int = 7) -> list[bytes]:
    """``n`` different publications shaped like the demo's indexed events
    (fastws.indexer's ``event_data`` of PredictionMarket ``BetPlaced`` logs): ``bets``
    bets in one block on one market, fresh tx hashes and bettors (the push is ~0.6 KB
    with one bet, ~1.1 KB with two, ~1.6 KB with three)."""
    rnd = random.Random(seed)

    def hx(k: int) -> str:
        return "0x" + rnd.randbytes(k).hex()

    out = []
    for i in range(n):
        block, market = hx(32), hx(20)
        yes, no = rnd.randrange(10**18, 10**21), rnd.randrange(10**18, 10**21)
        events = []
        for j in range(bets):
            amount = rnd.randrange(10**16, 10**19)
            outcome = rnd.random() < 0.5
            yes, no = (yes + amount, no) if outcome else (yes, no + amount)
            events.append({"eventType": "BetPlaced", "marketAddress": market,
                           "blockNumber": 1000 + i, "blockHash": block, "txHash": hx(32),
                           "logIndex": j, "timestamp": 1764900000 + i,
                           "args": {"marketId": i % 7, "bettor": hx(20), "outcome": outcome,
                                    "amount": str(amount), "yesPool": str(yes),
                                    "noPool": str(no)}})
        out.append(orjson.dumps(events))
    return out


def on_reply(sub: Any, buf: bytes) -> None:
    """A TEXT frame that is not an event push: the `subscribed` reply, or an error."""
    fut = sub.subscribed
    if fut is not None and not fut.done():
        fut.set_result(buf)
        return
    if b'"error"' in buf and not sub.stats.first_error:
        sub.stats.first_error = buf.decode(errors="replace")[:300]


def on_control(sub: Any, transport: WSTransport, frame: WSFrame) -> None:
    """CLOSE (count its code, answer, disconnect) or an unexpected BINARY frame."""
    if frame.msg_type is WSMsgType.CLOSE:
        code = int(frame.get_close_code())
        codes = sub.stats.close_codes
        codes[code] = codes.get(code, 0) + 1
        with contextlib.suppress(Exception):
            transport.send_close(WSCloseCode.OK)
        transport.disconnect()
    elif frame.msg_type is WSMsgType.BINARY:
        sub.stats.bad_frames += 1


def subscriber_classes(client: str, inflate_every: int = 1) -> tuple[Any, Any, str]:
    """(stats class, listener factory taking stats, client name) for --client;
    ``inflate_every``: see --inflate-every (compiled subscribers only)."""
    if client in ("auto", "compiled"):
        try:
            from loadtest._build import load_fastsub

            fast = load_fastsub()
            fast.set_inflate_every(inflate_every)
            return (fast.CStats,
                    lambda st: fast.FastSubscriber(st, on_reply, on_control), "compiled")
        except Exception as exc:  # noqa: BLE001 - no compiler: fall back, say so
            if client == "compiled":
                raise
            print(f"[fanout] compiled subscriber unavailable ({exc!r}); using Python",
                  file=sys.stderr)
    return Stats, Subscriber, "python"


async def _connect_one(url: str, stats: Any, local_addr: tuple[str, int] | None,
                       timeout: float, attempts: int = 5, factory: Any = None,
                       raw: bool = False, compress: bool = False) -> Any:
    """Connect and subscribe one subscriber, retrying transient connect failures.

    ``raw``: the server has no subscribe request (an anchor: a connection is a
    subscription); the connection counts as subscribed once the handshake is done.
    """
    kwargs: dict[str, Any] = {"local_addr": local_addr} if local_addr else {}
    if compress:
        kwargs["extra_headers"] = {"Sec-WebSocket-Extensions": DEFLATE_OFFER}
    factory = factory or Subscriber
    delay = 0.05
    for attempt in range(attempts):
        try:
            transport, listener = await ws_connect(
                lambda: factory(stats), url, websocket_handshake_timeout=timeout,
                read_buffer_init_size=4096, enable_auto_pong=True, **kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - retried, then reported
            if attempt == attempts - 1:
                raise ConnectionError(f"connect failed: {exc!r}") from exc
            await asyncio.sleep(delay)
            delay *= 2
    if raw:
        return listener
    listener.subscribed = asyncio.get_running_loop().create_future()
    request = b'{"id":1,"type":"subscribe","channel":"' + CHANNEL.encode() + b'"}'
    answer = transport.response.headers.get("sec-websocket-extensions", "") if compress else ""
    if "permessage-deflate" in answer:   # as a compressing browser would: RSV1, deflated
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        transport.send(WSMsgType.TEXT, (packer.compress(request)
                                        + packer.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv1=True)
    else:
        transport.send(WSMsgType.TEXT, request)
    reply = await asyncio.wait_for(listener.subscribed, timeout)
    listener.subscribed = None
    if b'"subscribed"' not in reply:
        transport.disconnect()
        raise ConnectionError(f"subscribe refused: {reply[:200]!r}")
    return listener


async def _recv(conn: Connection) -> Any:
    """Receive one control message from the parent without blocking the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        while not conn.poll():
            await fut
            fut = loop.create_future()
    finally:
        loop.remove_reader(fd)
    return conn.recv()


async def _worker_main(conn: Connection, cfg: dict[str, Any]) -> None:
    stats_cls, factory, _ = subscriber_classes(cfg.get("client", "auto"),
                                               cfg.get("inflate_every", 1))
    stats = stats_cls()
    stats.lanes = cfg.get("lanes", 1)
    raw = cfg.get("protocol", "fastws") == "raw"
    subs: list[Any] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(cfg["batch"])
    local_addr = (cfg["source_ip"], 0) if cfg["source_ip"] else None
    errors_count = [0]

    async def one() -> None:
        async with sem:
            try:
                subs.append(await _connect_one(cfg["url"], stats, local_addr,
                                               cfg["connect_timeout"], factory=factory,
                                               raw=raw, compress=cfg.get("compress", False)))
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                if len(errors) < 5:
                    errors.append(str(exc)[:300])
                errors_count[0] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(cfg["n"])))
    conn.send({"ready": len(subs), "failed": errors_count[0], "errors": errors,
               "connect_s": time.monotonic() - t0})

    while True:
        msg = await _recv(conn)
        cmd = msg[0]
        if cmd == "window":
            stats.win_start, stats.win_end = msg[1], msg[2]
            cpu0 = os.times()
            conn.send("ok")
        elif cmd == "finish":
            n_pub: int = msg[1]
            deadline = time.monotonic() + msg[2]
            last_progress, last_received = time.monotonic(), stats.received
            while time.monotonic() < deadline:
                if all(s.last >= n_pub for s in subs):
                    break
                await asyncio.sleep(0.05)
                if stats.received != last_received:
                    last_progress, last_received = time.monotonic(), stats.received
                elif time.monotonic() - last_progress > 3.0:
                    break
            cpu1 = os.times()
            conn.send({
                "subscribers": len(subs),
                "complete": sum(1 for s in subs if s.last >= n_pub),
                "received": stats.received, "in_window": stats.in_window,
                "duplicates": stats.duplicates, "gaps": stats.gaps,
                "max_us": stats.max_us, "hist": stats.hist,
                "disconnected": stats.disconnected, "close_codes": stats.close_codes,
                "bad_frames": stats.bad_frames, "first_error": stats.first_error,
                "spread": stats.spread() if hasattr(stats, "spread") else None,
                "wire_bytes": stats.wire_bytes, "compressed": stats.compressed,
                "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            })
        elif cmd == "close":
            stats.closing = True
            for s in subs:
                tr = s.transport
                if tr is not None and not tr.is_disconnected:
                    with contextlib.suppress(Exception):
                        tr.send_close(WSCloseCode.OK)
                    tr.disconnect(False)
            await asyncio.sleep(0.2)
            conn.send("closed")
            return


def worker_entry(conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of one client process: pin, connect, account, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    if cfg.get("cpus"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cfg["cpus"])
    try:
        uvloop.run(_worker_main(conn, cfg))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# Publisher (runs in the parent process)
# ---------------------------------------------------------------------------------------
class Publisher(WSListener):
    """Keeps `inflight` publish requests outstanding; sends the next one from the reply."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.seq = 0            # last seq sent
        self.accepted = 0       # `published` replies
        self.rejected = 0       # `error` replies
        self.first_error = ""
        self.outstanding = 0
        self.end_ns = 0
        self.win_start = 0
        self.win_end = 0
        self.accepted_in_window = 0
        self.pad = b'"' + b"x" * 60 + b'"'     # any JSON value (--event demo: ~1 KB)
        self.pads: list[bytes] = []
        self.done: asyncio.Future[None] | None = None
        self.disconnected = False
        self.paced = False      # --rate: a timer sends, replies only free window slots
        self.inflight = 0
        self.skipped = 0        # paced ticks that found the window full
        self.raw = False        # an anchor: send the bare payload, any reply is the ack

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Remember the transport."""
        self.transport = transport

    def send_next(self) -> None:
        """Send one publication stamped with the current wall-clock time."""
        self.seq += 1
        self.outstanding += 1
        pad = self.pads[self.seq % len(self.pads)] if self.pads else self.pad
        if self.raw:
            self._write(b'{"t":%d,"seq":%d,"pad":%s}' % (time.time_ns(), self.seq, pad))
        else:
            self._write(
                b'{"id":%d,"type":"publish","channel":"%s","data":{"t":%d,"seq":%d,"pad":%s}}'
                % (self.seq, CHANNEL.encode(), time.time_ns(), self.seq, pad))

    def _write(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, payload)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """One reply: count it and, while time remains, refill the window."""
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                self.first_error = self.first_error or f"closed {int(frame.get_close_code())}"
                transport.disconnect()
            return
        self._answer(frame.get_payload_as_bytes())

    def _answer(self, buf: bytes, ok: bool | None = None) -> None:
        """One reply (``ok`` None: judge by the payload): count it, refill the window."""
        now = time.time_ns()
        self.outstanding -= 1
        if ok if ok is not None else (self.raw or b'"published"' in buf):
            self.accepted += 1
            if self.win_start <= now < self.win_end:
                self.accepted_in_window += 1
        else:
            self.rejected += 1
            if not self.first_error:
                self.first_error = buf.decode(errors="replace")[:300]
        if now < self.end_ns and not self.rejected:
            if not self.paced:
                self.send_next()
        elif self.outstanding <= 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """The publisher must not lose its connection: fail the run if it does."""
        self.disconnected = True
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class HttpPublisher(Publisher):
    """Publishes with ``POST`` requests on keep-alive HTTP/1.1 connections; each
    response is the ack.

    One connection (``lanes`` 1): every request pipelined on it.  ``lanes`` > 1: that
    many connections, one request in flight on each; connection ``k`` numbers its
    publications k+1, k+1+lanes, ... (see :func:`seq_check`).  ``api``: the body is
    fastws' ``{"channel", "data"}`` with the bench API key; otherwise the bare payload
    (nginx+Nchan's publisher location).
    """

    def __init__(self, url: str, lanes: int = 1, api: bool = False) -> None:
        super().__init__()
        self.raw = True
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.lanes = lanes
        self.lane = 0                   # the connection the next send goes to
        self.lane_seq = list(range(1 - lanes, 1))   # last seq sent on each
        self.api = api
        self.head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s" % (
            self.path.encode(), self.host.encode(),
            b"Authorization: Bearer %s\r\n" % API_KEY.encode() if api else b"")
        self.writers: list[asyncio.StreamWriter] = []
        self.reader_tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        for lane in range(self.lanes):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            sock = writer.get_extra_info("socket")
            if sock is not None:     # each request leaves at once (no Nagle delay)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.writers.append(writer)
            self.reader_tasks.append(asyncio.ensure_future(self._read(reader, lane)))

    def send_next(self) -> None:
        """Send one publication on the current lane, stamped with the wall-clock time."""
        lane = self.lane
        self.lane_seq[lane] += self.lanes
        seq = self.lane_seq[lane]
        self.seq += 1
        self.outstanding += 1
        data = b'{"t":%d,"seq":%d,"pad":%s}' % (time.time_ns(), seq, self.pad)
        if self.api:
            data = b'{"channel":"%s","data":%s}' % (CHANNEL.encode(), data)
        self.writers[lane].write(b"%sContent-Length: %d\r\n\r\n%s"
                                 % (self.head, len(data), data))

    async def _read(self, reader: asyncio.StreamReader, lane: int) -> None:
        try:
            while True:
                status = await reader.readline()
                if not status:
                    raise ConnectionError("publisher connection closed")
                code = int(status.split()[1])
                length, chunked = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                body = b""
                if chunked:
                    while (size := int((await reader.readline()).strip() or b"0", 16)):
                        body += await reader.readexactly(size + 2)
                    await reader.readline()
                elif length:
                    body = await reader.readexactly(length)
                self.lane = lane
                self._answer(body, 200 <= code < 300)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            self.first_error = self.first_error or f"HTTP publisher: {exc!r}"
            self.disconnected = True
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def close(self) -> None:
        for task in self.reader_tasks:
            task.cancel()
        for writer in self.writers:
            writer.close()


class _EventAck(WSListener):
    """The redis publisher's own subscription: each event it gets acks a publication."""

    def __init__(self, pub: Publisher) -> None:
        super().__init__()
        self.pub = pub
        self.subscribed: asyncio.Future[bytes] | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        buf = frame.get_payload_as_bytes()
        if b'"type":"event"' in buf:
            self.pub._answer(buf, True)
        elif self.subscribed is not None and not self.subscribed.done():
            self.subscribed.set_result(buf)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.pub.on_ws_disconnected(transport)


class RedisPublisher(Publisher):
    """Pipelines raw ``PUBLISH bench:fanout PAYLOAD`` commands into Redis (as
    ``redis-cli`` would send them).

    Redis answers a PUBLISH as soon as it has queued the message for its subscribers,
    so its replies cannot bound the backlog: a publication is acked when it comes back
    on the publisher's own WebSocket subscription to the server (``ack_url``), which
    keeps ``--inflight`` publications between Redis and the subscribers.  A reply of
    0 receivers (the server is not subscribed) counts as a rejection.
    """

    def __init__(self, url: str, ack_url: str) -> None:
        super().__init__()
        self.raw = True
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 6379
        self.ack_url = ack_url
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.ack_transport: WSTransport | None = None

    async def open(self) -> None:
        transport, ack = await ws_connect(lambda: _EventAck(self), self.ack_url,
                                          websocket_handshake_timeout=10)
        self.ack_transport = transport
        ack.subscribed = asyncio.get_running_loop().create_future()
        transport.send(WSMsgType.TEXT,
                       b'{"id":1,"type":"subscribe","channel":"' + CHANNEL.encode() + b'"}')
        reply = await asyncio.wait_for(ack.subscribed, 10)
        if b'"subscribed"' not in reply:
            raise ConnectionError(f"redis publisher: subscribe refused: {reply[:200]!r}")
        reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.reader_task = asyncio.ensure_future(self._read(reader))

    def _write(self, payload: bytes) -> None:
        assert self.writer is not None
        self.writer.write(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                          % (len(CHANNEL), CHANNEL.encode(), len(payload), payload))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("redis connection closed")
                # ":N" is the number of subscribers (fastws nodes) that got it
                if not line.startswith(b":") or int(line[1:]) < 1:
                    self._answer(line, False)
        except (ConnectionError, ValueError) as exc:
            self.first_error = self.first_error or f"redis publisher: {exc!r}"
            self.disconnected = True
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def close(self) -> None:
        if self.reader_task is not None:
            self.reader_task.cancel()
        if self.writer is not None:
            self.writer.close()
        if self.ack_transport is not None:
            with contextlib.suppress(Exception):
                self.ack_transport.send_close(WSCloseCode.OK)
                self.ack_transport.disconnect()


async def run_publisher(url: str, inflight: int, start_ns: int, warmup_s: float,
                        duration_s: float, rate: float = 0.0,
                        mode: str = "fastws", lanes: int = 1,
                        api: bool = False, ack_url: str = "",
                        event: str = "small") -> dict[str, Any]:
    """Publish from start_ns for warmup + duration seconds; return the publisher counts.

    rate 0: closed loop, `inflight` publications always outstanding (saturation).
    rate > 0: open loop, one publication every 1/rate s while fewer than `inflight` are
    outstanding (latency at a given load).  ``mode``: ``fastws`` (publish requests on a
    WebSocket), ``raw`` (bare payloads on a WebSocket, any reply acks one) or ``http``
    (``url`` is an HTTP publish endpoint, one POST per publication; ``lanes``
    connections, ``api``: fastws' API body and key) or ``redis`` (``url`` is a Redis
    server: raw PUBLISH commands).
    """
    transport: Any = None
    pub: Publisher
    if mode == "http":
        pub = HttpPublisher(url, lanes, api)
        await pub.open()
        inflight = lanes if lanes > 1 else inflight    # one request per connection
    elif mode == "redis":
        pub = RedisPublisher(url, ack_url)
        await pub.open()
    else:
        transport, listener = await ws_connect(Publisher, url, websocket_handshake_timeout=10)
        assert isinstance(listener, Publisher)
        pub = listener
        pub.raw = mode == "raw"
        if event.startswith("demo"):
            pub.pads = demo_events(int(event[4:] or 2))
    pub.done = asyncio.get_running_loop().create_future()
    pub.win_start = start_ns + int(warmup_s * 1e9)
    pub.win_end = pub.win_start + int(duration_s * 1e9)
    pub.end_ns = pub.win_end
    delay = (start_ns - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    pub.inflight = inflight
    if rate > 0:
        pub.paced = True
        interval = 1.0 / rate
        t0 = loop.time()
        tick = [0]

        def on_tick() -> None:
            if pub.disconnected or pub.rejected or time.time_ns() >= pub.end_ns:
                if pub.outstanding <= 0 and pub.done is not None and not pub.done.done():
                    pub.done.set_result(None)
                return
            if pub.outstanding < pub.inflight:
                pub.send_next()
            else:
                pub.skipped += 1
            tick[0] += 1
            loop.call_at(t0 + tick[0] * interval, on_tick)

        on_tick()
    else:
        for i in range(inflight):
            if isinstance(pub, HttpPublisher):
                pub.lane = i % pub.lanes
            pub.send_next()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(pub.done, warmup_s + duration_s + 30)
    result = {"sent": pub.seq, "accepted": pub.accepted, "rejected": pub.rejected,
              "accepted_in_window": pub.accepted_in_window, "outstanding": pub.outstanding,
              "first_error": pub.first_error, "disconnected": pub.disconnected,
              "skipped": pub.skipped}
    if isinstance(pub, HttpPublisher | RedisPublisher):
        pub.close()
    with contextlib.suppress(Exception):
        transport.send_close(WSCloseCode.OK)
        transport.disconnect()
    return result


# ---------------------------------------------------------------------------------------
# Orchestration (parent process)
# ---------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--workers N`` supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def rss_kib_one(pid: int) -> int | None:
    """VmRSS of one process in KiB, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s_one(pid: int) -> float | None:
    """utime + stime of one process in seconds, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def read_rss_kib(pid: int) -> int | None:
    """VmRSS in KiB of a process and its descendants (summed), or None if unreadable."""
    found = [r for r in map(rss_kib_one, process_tree(pid)) if r is not None]
    return sum(found) if found else None


def read_cpu_s(pid: int) -> float | None:
    """utime + stime in seconds of a process and its descendants (summed), or None."""
    found = [c for c in map(cpu_s_one, process_tree(pid)) if c is not None]
    return sum(found) if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(host: str, port: int, proc: subprocess.Popen | None, timeout: float) -> None:
    """Wait until /healthz answers (or at least the port accepts) within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet, or no /healthz: try TCP
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                time.sleep(0.2)  # accepting: give the server a moment to finish starting
                with contextlib.suppress(Exception), urllib.request.urlopen(
                        f"http://{host}:{port}/healthz", timeout=1):
                    return
        time.sleep(0.05)
    raise TimeoutError(f"server at {host}:{port} not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, tmp: Path) -> int | None:
    """Stop a server subprocess (SIGTERM, bounded wait, SIGKILL), remove its temp dir,
    and return its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    shutil.rmtree(tmp, ignore_errors=True)
    return proc.returncode


class ServerProcess:
    """A `python -m fastws serve` subprocess, optionally pinned with taskset."""

    def __init__(self, port: int, cpu: int | None, config_text: str,
                 extra: list[str]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fastws-bench-"))
        self.config = self.tmp / "fastws.toml"
        self.config.write_text(config_text)
        self.log = self.tmp / "server.log"
        cmd = [sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--config", str(self.config), *extra]
        if cpu is not None:
            taskset = shutil.which("taskset")
            if taskset:
                cmd = [taskset, "-c", str(cpu), *cmd]
        self.cmd = cmd
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        root = Path(__file__).resolve().parent.parent
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=root)
        self.pid = self.proc.pid  # taskset execs the server: same pid
        self.port = port

    def output(self, tail: int = 3000) -> str:
        """The tail of the server's stdout+stderr."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-tail:]
        return ""

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL; returns the exit status."""
        return stop_process(self.proc, self.tmp)


class RedisProcess:
    """A private ``redis-server`` (no persistence), optionally pinned with taskset."""

    def __init__(self, port: int, cpu: int | None) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.tmp = Path(tempfile.mkdtemp(prefix="fastws-bench-redis-"))
        cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.tmp)]
        if cpu is not None and shutil.which("taskset"):
            cmd = [shutil.which("taskset") or "taskset", "-c", str(cpu), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {port}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)

    def stop(self) -> int | None:
        """Stop it and remove its directory."""
        return stop_process(self.proc, self.tmp)


def path_config(path: str) -> str:
    """The server configuration the harness writes for ``--path``."""
    return CLIENT_PUBLISH_CONFIG if path == "client" else PATH_CONFIG.format(extra="")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m loadtest.fanout", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--url", help="benchmark a running server (ws://127.0.0.1:PORT/ws); it "
                   "must let clients publish on bench:* (default: start one)")
    p.add_argument("--server-pid", type=int, help="with --url: pid for RSS/CPU readings")
    p.add_argument("--port", type=int, default=0, help="port for the started server")
    p.add_argument("--server-cpu", type=int, default=None,
                   help="pin the started server to this CPU (taskset -c)")
    p.add_argument("--client-cpus", default=None,
                   help="CPUs for client processes, e.g. 1 or 1-3 (default: all but the "
                   "server's)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for `fastws serve` (repeatable)")
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--procs", type=int, default=None,
                   help="client processes (default: one per client CPU, at least "
                   f"subscribers/{MAX_PER_PROC_DEFAULT})")
    p.add_argument("--inflight", type=int, default=32,
                   help="publications awaiting their `published` reply, at most")
    p.add_argument("--rate", type=float, default=0.0,
                   help="publications/s, paced (open loop, for latency at a given load); "
                   "default 0 = as fast as the inflight window allows (saturation)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--connect-batch", type=int, default=64,
                   help="connections being opened at once, over all processes")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--source-ips", action="store_true",
                   help="bind each client process to its own 127.0.0.x (automatic above "
                   f"{PORTS_PER_SOURCE_IP} subscribers)")
    p.add_argument("--smoke", action="store_true",
                   help="quick check: 1000 subscribers (at most), 2 s after 0.5 s warm-up, "
                   "100 publications/s (each unless given)")
    p.add_argument("--client", choices=("auto", "compiled", "python"), default="auto",
                   help="subscriber hot path: compiled (Cython, built on first use into "
                   "loadtest/build/), python, or auto (compiled if it builds)")
    p.add_argument("--protocol", choices=("fastws", "raw"), default="fastws",
                   help="raw: the server has no subscribe request (an anchor; with --url)")
    p.add_argument("--pub-url", help="publish here instead of --url (an anchor's publisher)")
    p.add_argument("--pub-mode", choices=("fastws", "raw", "http"), default=None,
                   help="publish requests (fastws), bare payloads on a WebSocket (raw) or "
                   "HTTP POSTs (http); default: follows --protocol")
    p.add_argument("--path", choices=PATHS, default="client",
                   help="how publications reach the server (see above): client publish "
                   "requests, pipelined POST /api/publish (http), POSTs over --connections "
                   "connections (http-conns), raw PUBLISH into a Redis broker (redis)")
    p.add_argument("--connections", type=int, default=8,
                   help=f"--path http-conns: publishing connections (at most {MAX_LANES})")
    p.add_argument("--redis-url", help="--path redis with --url: the Redis the server uses "
                   "(default: start a redis-server on the server's CPU)")
    p.add_argument("--compression", action="store_true",
                   help="subscribers offer permessage-deflate (as Chromium does) and "
                        "inflate what arrives compressed")
    p.add_argument("--inflate-every", type=int, default=1, metavar="K",
                   help="with --compression (compiled subscribers): inflate one push in K "
                        "and count the others as the next numbers (a loss or duplicate "
                        "still shows at the next inflated one); latency from the inflated "
                        "ones. Lets 2 vCPUs of clients keep up with the server")
    p.add_argument("--event", choices=("small", "demo", "demo1", "demo3"), default="small",
                   help="publication data: small (~80 B) or demo (~1.1 KB pushes: two "
                        "indexed events of one block, like the demo's; demo1/demo3: one "
                        "or three events, ~0.6 / ~1.6 KB)")
    p.add_argument("--label", default="fastws", help="name of the server in the results")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        given = set(argv if argv is not None else sys.argv[1:])
        if not any(a.startswith("--duration") for a in given):
            args.duration = 2.0
        if not any(a.startswith("--warmup") for a in given):
            args.warmup = 0.5
        if args.subscribers > 1000:
            args.subscribers = 1000
        if not any(a.startswith("--rate") for a in given) and args.path != "http-conns":
            args.rate = 100.0  # paced: far below capacity, so a busy box cannot drop anyone
    for name in ("subscribers", "inflight"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be > 0 and --warmup >= 0")
    if not 1 <= args.connections <= MAX_LANES:
        p.error(f"--connections must be 1..{MAX_LANES}")
    if args.path == "http-conns" and args.rate:
        p.error("--rate needs one publishing connection: not with --path http-conns")
    if args.path == "redis" and args.url and not args.redis_url and not args.pub_url:
        p.error("--path redis with --url needs --redis-url (the server's Redis)")
    return args


def publisher_of(args: argparse.Namespace, url: str,
                 redis_url: str | None) -> tuple[str, str, int, bool]:
    """(publish URL, mode, lanes, api body) of a run: an anchor's publisher when
    ``--pub-url`` is given, else the one ``--path`` names."""
    lanes = args.connections if args.path == "http-conns" else 1
    if args.pub_url:
        mode = args.pub_mode or args.protocol
        return args.pub_url, mode, lanes if mode == "http" else 1, False
    if args.path in ("http", "http-conns"):
        u = urllib.parse.urlsplit(url)
        return f"http://{u.netloc}/api/publish", "http", lanes, True
    if args.path == "redis":
        assert redis_url is not None
        return redis_url, "redis", 1, False
    return url, args.pub_mode or args.protocol, 1, False


def parse_cpus(spec: str) -> list[int]:
    """'1', '1-3' or '1,3' → list of CPU numbers."""
    cpus: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            cpus.extend(range(int(a), int(b) + 1))
        elif part.strip():
            cpus.append(int(part))
    return cpus


def collect_ready(workers: list[tuple[Any, Any]], timeout: float) -> tuple[int, int, list[str]]:
    """Wait for every client process's "ready" report; (connected, failed, errors)."""
    connected = failed = 0
    errors: list[str] = []
    for _, conn in workers:
        if not conn.poll(timeout):
            raise RuntimeError("a client process did not finish connecting")
        ready = conn.recv()
        connected += ready["ready"]
        failed += ready["failed"]
        errors += ready["errors"]
    return connected, failed, errors


def stop_workers(workers: list[tuple[Any, Any]]) -> None:
    """Ask each (process, pipe) client worker to close, then join it (kill if stuck)."""
    for _, conn in workers:
        with contextlib.suppress(Exception):
            conn.send(("close",))
    for proc, conn in workers:
        with contextlib.suppress(Exception):
            if conn.poll(10):
                conn.recv()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark and return the result dict (also printed / written)."""
    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[fanout] {msg}", file=sys.stderr, flush=True)

    all_cpus = sorted(os.sched_getaffinity(0))
    if args.client_cpus:
        client_cpus = parse_cpus(args.client_cpus)
    elif args.server_cpu is not None and not args.url:
        client_cpus = [c for c in all_cpus if c != args.server_cpu] or all_cpus
    else:
        client_cpus = all_cpus
    min_procs = -(-args.subscribers // MAX_PER_PROC_DEFAULT)
    procs = args.procs or max(1, len(client_cpus) if args.server_cpu is not None
                              else max(1, len(client_cpus) - 1))
    procs = max(procs, min_procs)
    procs = min(procs, args.subscribers)

    server: ServerProcess | None = None
    redis: RedisProcess | None = None
    redis_url = args.redis_url
    if args.url:
        url = args.url
        server_pid = args.server_pid
    else:
        port = args.port or free_port()
        extra = ["--api-key", API_KEY, *args.server_arg]
        if args.path == "redis" and not args.pub_url:
            if not redis_url:
                redis = RedisProcess(free_port(), args.server_cpu)
                redis_url = redis.url
            extra = ["--broker", redis_url, *extra]
        try:
            server = ServerProcess(port, args.server_cpu, path_config(args.path), extra)
        except Exception:
            if redis is not None:
                redis.stop()
            raise
        log("server: " + shlex.join(server.cmd))
        try:
            wait_ready("127.0.0.1", port, server.proc, 30)
        except Exception as exc:
            out = server.output()
            server.stop()
            if redis is not None:
                redis.stop()
            raise RuntimeError(f"fastws server did not start ({exc}):\n{out}") from None
        url = f"ws://127.0.0.1:{port}/ws"
        server_pid = server.pid
    host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    use_source_ips = (args.source_ips or args.subscribers > PORTS_PER_SOURCE_IP) \
        and host.startswith("127.")

    pub_url, pub_mode, lanes, api_body = publisher_of(args, url, redis_url)
    redis_pid = redis.pid if redis is not None else None

    def server_cpu_s() -> float | None:
        """The server's CPU time, and its redis-server's when the harness started one."""
        a = read_cpu_s(server_pid) if server_pid else None
        b = read_cpu_s(redis_pid) if redis_pid else 0.0
        return None if a is None or b is None else a + b

    ctx = mp.get_context("fork")
    workers: list[tuple[Any, Connection]] = []
    result: dict[str, Any] = {}
    client_name = subscriber_classes(args.client)[2]  # builds it once, before forking
    try:
        time.sleep(0.3)
        rss_before = read_rss_kib(server_pid) if server_pid else None
        share, extra = divmod(args.subscribers, procs)
        batch = max(4, args.connect_batch // procs)
        log(f"connecting {args.subscribers} subscribers over {procs} process(es) "
            f"on CPUs {client_cpus} to {url}")
        t_conn = time.monotonic()
        for k in range(procs):
            parent_end, child_end = ctx.Pipe()
            cfg = {"url": url, "n": share + (1 if k < extra else 0), "batch": batch,
                   "client": args.client, "protocol": args.protocol, "lanes": lanes,
                   "compress": args.compression, "inflate_every": args.inflate_every,
                   "connect_timeout": args.connect_timeout, "cpus": client_cpus,
                   "source_ip": f"127.0.0.{2 + k}" if use_source_ips else None}
            proc = ctx.Process(target=worker_entry, args=(child_end, cfg), daemon=True)
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, client_cpus)
        connected, failed, errors = collect_ready(workers, args.connect_timeout * 4 + 60)
        connect_s = time.monotonic() - t_conn
        log(f"{connected} subscribed ({failed} failed) in {connect_s:.1f} s")
        if failed:
            log("connect errors: " + " | ".join(errors[:3]))
        if connected == 0:
            raise RuntimeError("no subscriber could connect: " + " | ".join(errors[:3]))
        time.sleep(1.0)  # let the server settle before reading idle RSS
        rss_idle = read_rss_kib(server_pid) if server_pid else None

        start_ns = time.time_ns() + 200_000_000
        win_start = start_ns + int(args.warmup * 1e9)
        win_end = win_start + int(args.duration * 1e9)
        for _, conn in workers:
            conn.send(("window", win_start, win_end))
        for _, conn in workers:
            if not conn.poll(30):
                raise RuntimeError("a client process stopped answering")
            conn.recv()
        log(f"publishing for {args.warmup:g} s warm-up + {args.duration:g} s, "
            f"{args.inflight} in flight" + (f", {args.rate:g}/s" if args.rate else ""))
        cpu_srv0 = server_cpu_s()
        cpu_redis0 = read_cpu_s(redis_pid) if redis_pid else None
        cpu_self0 = os.times()

        async def publish_with_cpu() -> tuple[dict[str, Any], float | None]:
            # read the server's CPU time exactly at the window edges
            srv_cpu: list[float | None] = [None, None]

            async def sample() -> None:
                await asyncio.sleep(max(0.0, (win_start - time.time_ns()) / 1e9))
                srv_cpu[0] = server_cpu_s()
                await asyncio.sleep(max(0.0, (win_end - time.time_ns()) / 1e9))
                srv_cpu[1] = server_cpu_s()

            sampler = asyncio.ensure_future(sample())
            pub = await run_publisher(pub_url, args.inflight, start_ns,
                                      args.warmup, args.duration, args.rate,
                                      pub_mode, lanes, api_body, url, args.event)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sampler, 5)
            a, b = srv_cpu
            return pub, (b - a if a is not None and b is not None else None)

        pub, srv_cpu_window = uvloop.run(publish_with_cpu())
        cpu_self1 = os.times()
        cpu_srv1 = server_cpu_s()
        cpu_redis1 = read_cpu_s(redis_pid) if redis_pid else None
        log(f"publisher: {pub['accepted']} accepted, {pub['rejected']} rejected")
        n_pub = pub["accepted"]
        for _, conn in workers:
            conn.send(("finish", n_pub, 15.0))
        parts = []
        for _, conn in workers:
            if not conn.poll(60):
                raise RuntimeError("a client process did not report")
            parts.append(conn.recv())
        rss_after = read_rss_kib(server_pid) if server_pid else None

        hist = [0] * HIST_BUCKETS
        for part in parts:
            for i, n in enumerate(part["hist"]):
                hist[i] += n
        subs = sum(p["subscribers"] for p in parts)
        received = sum(p["received"] for p in parts)
        duplicates = sum(p["duplicates"] for p in parts)
        in_window = sum(p["in_window"] for p in parts)
        max_us = max((p["max_us"] for p in parts), default=0)
        if max_us == 0 and in_window:
            max_us = max(hist_bounds(i)[1] for i, n in enumerate(hist) if n)
        expected = n_pub * subs
        close_codes: dict[str, int] = {}
        for part in parts:
            for code, n in part["close_codes"].items():
                close_codes[str(code)] = close_codes.get(str(code), 0) + n
        client_cpu = sum(p["cpu_s"] for p in parts)
        # per publication: publish → its last subscriber received it (compiled client)
        reach_all = None
        if all(p.get("spread") is not None for p in parts) and n_pub:
            slowest: dict[int, int] = {}
            for part in parts:
                for seq, us in part["spread"].items():
                    if us > slowest.get(seq, 0):
                        slowest[seq] = us
            vals = sorted(slowest.values())
            if vals:
                reach_all = {"publications": len(vals),
                             "p50": round(vals[len(vals) // 2] / 1000, 3),
                             "p99": round(vals[min(len(vals) - 1, int(len(vals) * 0.99))]
                                          / 1000, 3),
                             "max": round(vals[-1] / 1000, 3)}
        per_conn = None
        if rss_before is not None and rss_idle is not None and connected:
            per_conn = (rss_idle - rss_before) * 1024 / connected

        def ms(us: float | None) -> float | None:
            return None if us is None else round(us / 1000, 3)

        result = {
            "benchmark": "fanout",
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "python -m loadtest.fanout " + shlex.join(
                sys.argv[1:] if args._argv is None else args._argv),
            "machine": machine_info(),
            "params": {"subscribers": args.subscribers, "procs": procs,
                       "inflight": args.inflight, "rate": args.rate or None,
                       "duration_s": args.duration,
                       "warmup_s": args.warmup, "server_cpu": args.server_cpu,
                       "client_cpus": client_cpus, "url": url if args.url else None,
                       "channel": CHANNEL, "client": client_name,
                       "protocol": args.protocol, "path": args.path,
                       "compression": args.compression, "event": args.event,
                       "inflate_every": args.inflate_every,
                       "publisher": {"mode": pub_mode, "connections": lanes,
                                     "inflight": lanes if lanes > 1 else args.inflight,
                                     "url": pub_url}},
            "server": args.label,
            "connected": connected, "connect_failed": failed, "connect_errors": errors[:3],
            "connect_s": round(connect_s, 3),
            "publications": n_pub,
            "publications_per_s": round(pub["accepted_in_window"] / args.duration, 1),
            "publish_rejected": pub["rejected"], "publish_error": pub["first_error"],
            "publish_skipped": pub["skipped"],
            "publisher_disconnected": pub["disconnected"],
            "deliveries": received,
            "deliveries_in_window": in_window,
            "deliveries_per_s": round(in_window / args.duration, 1),
            "latency_ms": {"p50": ms(hist_percentile(hist, 0.50, max_us)),
                           "p90": ms(hist_percentile(hist, 0.90, max_us)),
                           "p99": ms(hist_percentile(hist, 0.99, max_us)),
                           "p999": ms(hist_percentile(hist, 0.999, max_us)),
                           "max": ms(max_us if in_window else None)},
            "reach_all_ms": reach_all,
            "expected_deliveries": expected,
            "lost": expected - (received - duplicates),
            "duplicates": duplicates,
            "out_of_order": sum(p["gaps"] for p in parts),
            "subscribers_complete": sum(p["complete"] for p in parts),
            "disconnected": sum(p["disconnected"] for p in parts),
            "close_codes": close_codes,
            "bad_frames": sum(p["bad_frames"] for p in parts),
            "client_error": next((p["first_error"] for p in parts if p["first_error"]), ""),
            "wire_bytes": sum(p["wire_bytes"] for p in parts),
            "wire_bytes_per_delivery": round(sum(p["wire_bytes"] for p in parts)
                                             / received, 1) if received else None,
            "compressed_deliveries": sum(p["compressed"] for p in parts),
            "server_pid": server_pid,
            "server_rss_kib": {"before": rss_before, "idle": rss_idle, "after": rss_after},
            "server_rss_per_conn_bytes": None if per_conn is None else round(per_conn),
            "server_cpu_window": None if srv_cpu_window is None
            else round(srv_cpu_window / args.duration, 3),
            "server_cpu_s_total": None if cpu_srv0 is None or cpu_srv1 is None
            else round(cpu_srv1 - cpu_srv0, 3),
            # with --path redis: the part of server_cpu_* that redis-server spent
            "redis_cpu_s_total": None if cpu_redis0 is None or cpu_redis1 is None
            else round(cpu_redis1 - cpu_redis0, 3),
            "client_cpu_s": round(client_cpu, 3),
            "publisher_cpu_s": round((cpu_self1.user - cpu_self0.user)
                                     + (cpu_self1.system - cpu_self0.system), 3),
        }
        return result
    except Exception as exc:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{exc}; the server exited with status "
                               f"{server.proc.returncode}:\n{server.output()}") from exc
        if isinstance(exc, RuntimeError):
            raise
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        stop_workers(workers)
        if server is not None:
            if result and server.proc.poll() is not None:
                result["server_exit"] = server.proc.returncode
                result["server_output"] = server.output()
            server.stop()
        if redis is not None:
            redis.stop()


def format_table(r: dict[str, Any]) -> str:
    """Human-readable summary of one run."""
    lat = r["latency_ms"]
    p = r["params"]

    def f(v: Any, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"

    rows = [
        ("subscribers", f"{r['connected']:,} connected over {p['procs']} process(es)"
                        + (f", {r['connect_failed']} failed" if r["connect_failed"] else "")),
        ("window", f"{p['duration_s']:g} s after {p['warmup_s']:g} s warm-up, "
                   + (f"paced at {p['rate']:g}/s (≤ {p['inflight']} in flight"
                      f", {r['publish_skipped']} ticks skipped)" if p["rate"]
                      else f"{p.get('publisher', p)['inflight']} publications in flight")),
        ("publish path", f"{p.get('path', 'client')}"
         + (f" ({p['publisher']['mode']}, {p['publisher']['connections']} connection(s))"
            if p.get("publisher") else "")),
        ("publications/s", f"{r['publications_per_s']:,.0f}  ({r['publications']:,} total)"),
        ("deliveries/s", f"{r['deliveries_per_s']:,.0f}"),
        ("wire bytes/delivery", f(r.get("wire_bytes_per_delivery"))
         + (f"  ({r['compressed_deliveries']:,} compressed)"
            if r.get("compressed_deliveries") else "")),
        ("latency p50", f(lat["p50"], " ms")),
        ("latency p99", f(lat["p99"], " ms")),
        ("latency max", f(lat["max"], " ms")),
        ("reach all", "n/a" if not r.get("reach_all_ms") else
         f"{r['reach_all_ms']['p50']} ms median, {r['reach_all_ms']['max']} ms max "
         "(publish → its last subscriber, per publication)"),
        ("lost", f(r["lost"])),
        ("duplicates", f(r["duplicates"])),
        ("out of order", f(r["out_of_order"])),
        ("disconnected", f(r["disconnected"])
         + (f"  close codes {r['close_codes']}" if r["close_codes"] else "")),
        ("server RSS/conn", f(r["server_rss_per_conn_bytes"], " B")
         + ("" if r["server_rss_kib"]["idle"] is None else
            f"  (idle {r['server_rss_kib']['before']:,} → {r['server_rss_kib']['idle']:,} KiB)")),
        ("server CPU", f(r["server_cpu_window"], " cores busy in the window")),
        ("client CPU", f"{r['client_cpu_s']:.1f} s subscribers, "
                       f"{r['publisher_cpu_s']:.1f} s publisher"),
    ]
    if r["publish_rejected"] or r["publish_error"]:
        rows.append(("publish errors", f"{r['publish_rejected']}: {r['publish_error']}"))
    if r["client_error"]:
        rows.append(("client error", r["client_error"]))
    if r["disconnected"]:
        rows.append(("note", "subscribers were dropped by the server: offered load beyond what "
                     "the clients read (slow consumer, 4008?); lower --rate or add client CPUs"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{r.get('server', 'fastws')} fan-out benchmark ({r['date']}, "
             f"{r['machine']['cpus']} CPUs, {p.get('client', 'python')} subscribers)"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit 0 when the run is clean (nothing lost, duplicated or dropped)."""
    args = parse_args(argv)
    args._argv = argv
    try:
        result = run(args)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    clean = (result["lost"] == 0 and result["duplicates"] == 0
             and result["out_of_order"] == 0 and result["disconnected"] == 0
             and result["connect_failed"] == 0 and result["publish_rejected"] == 0
             and not result["publisher_disconnected"] and result["publications"] > 0)
    return 0 if clean else 3


if __name__ == "__main__":
    sys.exit(main())
