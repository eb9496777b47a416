"""locust scenarios for fastws: ``subscribers``, ``churn`` and ``publishers``.

    FASTWS_API_KEY=secret locust -f loadtest/locustfile.py --headless \\
        --host ws://127.0.0.1:8765 -u 10000 -r 1000 -t 30s --csv OUT --processes 2

against ``fastws serve --api-key secret``.  Stock locust flags only; the user classes
run mixed by weight (or name some on the command line: ``... SubscriberUser``):

* ``SubscriberUser`` (``subscribers``, weight 18): one WebSocket, seed-style
  subscriptions, channels and patterns mixed (``events:*``, ``events:bet_placed``,
  ``market:0x…``, ``market:0x*``), kept for the whole run.
* ``ChurnUser`` (``churn``, weight 2): connect, subscribe, stay 1–3 s, close, again.
* ``PublisherUser`` (``publishers``, 1 user): ``POST /api/publish`` with
  ``Authorization: Bearer $FASTWS_API_KEY`` to the seed channels in turn, every
  ``FASTWS_LOCUST_PUBLISH_INTERVAL`` seconds (0.25).

Every delivery is a locust request (type ``WS``, named by subscription kind) whose
response time is publish → receive, from the ``t`` (time_ns) the publisher put in the
payload.  Per subscription and (publisher, channel) the ``seq`` must go up by one:
a skipped seq is reported as ``lost`` failures, a repeated one as ``duplicate``.
Failed connects and subscribes are failures too.

At the end the master (or the single process) prints one line, ``fastws load test:
PASS`` or ``FAIL``: PASS when the peak of concurrently subscribed connections reached
the target, no failure of any kind was counted (failed connects or subscribes, lost or
duplicated events) and at least one event was delivered; the exit status is 1 on FAIL.
The target is ``FASTWS_LOCUST_TARGET`` when set, else the number of users (``-u``): every
user holds one subscribed connection (a churn user opens its next one before closing
the last, the publisher watches ``events:*``), so all ``-u`` users must be in at once.

Only locust, websocket-client and the standard library are imported here: importing
uvloop, picows or redis into a locust process crashed it (shared/FIELD-NOTES.md).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import time
import urllib.request
import uuid
from typing import Any

import gevent
import gevent.event
import websocket
from locust import User, between, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

DEFAULT_TARGET = 10_000   # without FASTWS_LOCUST_TARGET nor -u (the web UI)
PUBLISH_INTERVAL = float(os.environ.get("FASTWS_LOCUST_PUBLISH_INTERVAL", "0.25"))
WS_PATH = os.environ.get("FASTWS_LOCUST_PATH", "/ws")
MARKETS = [f"0x{n:040x}" for n in (0xA11CE, 0xB0B, 0xC0FFEE, 0xDEC0DE)]
# what the demo chain emits (fastws/demo.py): events by type and per market
PUBLISH_CHANNELS = ["events:bet_placed", "events:market_created",
                    *(f"market:{m}" for m in MARKETS)]
# (name, weight): channels and patterns mixed, as the seed's clients subscribe
SUBSCRIPTIONS = [("events:*", 3), ("events:bet_placed", 3), (f"market:{MARKETS[0]}", 1),
                 (f"market:{MARKETS[1]}", 1), (f"market:{MARKETS[2]}", 1),
                 ("market:0x*", 1)]
_NAMES = [n for n, w in SUBSCRIPTIONS for _ in range(w)]
_PATTERN_CHARS = set("*?[\\")

_open = 0          # subscribed connections of this process now
_peak = 0          # ... at most (this process)
_worker_open: dict[str, int] = {}   # master: latest count per worker
_cluster_peak = 0


def _kind(name: str) -> str:
    return "pattern" if _PATTERN_CHARS & set(name) else "channel"


class LostEvents(Exception):
    """Publications skipped in a subscription's seq sequence."""


class DuplicateEvent(Exception):
    """A publication delivered twice (or out of order)."""


def _opened(delta: int) -> None:
    global _open, _peak
    _open += delta
    _peak = max(_peak, _open)


class FastWSSocket:
    """One fastws WebSocket (websocket-client, gevent-friendly) with exact accounting."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.env = user.environment
        self.ws: websocket.WebSocket | None = None
        self.ids = itertools.count(1)
        self.last: dict[tuple[str, str], int] = {}    # (publisher, channel) -> seq
        self.pending: dict[int, gevent.event.AsyncResult] = {}
        self.kind = "channel"
        self.reader: gevent.Greenlet | None = None
        self.subscribed = False

    def _fire(self, rtype: str, name: str, ms: float, length: int = 0,
              exc: Exception | None = None) -> None:
        self.env.events.request.fire(request_type=rtype, name=name, response_time=ms,
                                     response_length=length, exception=exc, context={})

    def connect(self) -> bool:
        t0 = time.perf_counter()
        try:
            self.ws = websocket.create_connection(self.user.host.rstrip("/") + WS_PATH,
                                                  timeout=30, enable_multithread=False,
                                                  skip_utf8_validation=True)
            self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception as exc:  # noqa: BLE001 - reported as a locust failure
            self._fire("WS", "connect", (time.perf_counter() - t0) * 1000, exc=exc)
            self.ws = None
            return False
        self._fire("WS", "connect", (time.perf_counter() - t0) * 1000)
        self.reader = gevent.spawn(self._read)
        return True

    def subscribe(self, name: str) -> bool:
        assert self.ws is not None
        self.kind = _kind(name)
        rid = next(self.ids)
        result = gevent.event.AsyncResult()
        self.pending[rid] = result
        t0 = time.perf_counter()
        try:
            self.ws.send(json.dumps({"id": rid, "type": "subscribe", "channel": name}))
            reply = result.get(timeout=30)
        except Exception as exc:  # noqa: BLE001
            self._fire("WS", f"subscribe {self.kind}", (time.perf_counter() - t0) * 1000,
                       exc=exc)
            return False
        finally:
            self.pending.pop(rid, None)
        ms = (time.perf_counter() - t0) * 1000
        if reply.get("type") != "subscribed":
            self._fire("WS", f"subscribe {self.kind}", ms,
                       exc=RuntimeError(f"subscribe refused: {reply}"))
            return False
        self._fire("WS", f"subscribe {self.kind}", ms)
        self.subscribed = True
        _opened(1)
        return True

    def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        name = f"recv {self.kind}"
        while True:
            try:
                raw = ws.recv()
            except Exception:  # noqa: BLE001 - closed: by us, or reported below
                break
            if not raw:
                break
            now = time.time_ns()
            try:
                msg = json.loads(raw)
            except ValueError:
                self._fire("WS", "bad frame", 0, len(raw), ValueError(raw[:100]))
                continue
            if msg.get("type") != "event":
                rid = msg.get("id")
                if rid in self.pending:
                    self.pending[rid].set(msg)
                elif msg.get("type") == "disconnect":
                    self._fire("WS", "disconnect", 0, exc=RuntimeError(str(msg)))
                continue
            data = msg.get("data") or {}
            t, seq, pub = data.get("t"), data.get("seq"), data.get("pub")
            if not isinstance(t, int) or not isinstance(seq, int):
                continue     # not one of ours (the demo chain, another test)
            name = f"recv {self.kind}"
            key = (pub, msg.get("channel"))
            last = self.last.get(key)
            self.last[key] = max(seq, last or 0)
            if last is not None and seq <= last:
                self._fire("WS", "duplicate", 0, len(raw),
                           DuplicateEvent(f"seq {seq} after {last} on {key[1]}"))
                continue
            if last is not None and seq > last + 1:
                for _ in range(seq - last - 1):
                    self._fire("WS", "lost", 0, 0, LostEvents(f"seq gap on {key[1]}"))
            self._fire("WS", name, max(0.0, (now - t) / 1e6), len(raw))
        if self.subscribed:
            self.subscribed = False
            _opened(-1)

    def close(self) -> None:
        if self.subscribed:
            self.subscribed = False
            _opened(-1)
        if self.ws is not None:
            try:   # a close frame, but no waiting for the answer: the reader may be gone
                self.ws.send_close()
            except Exception:  # noqa: BLE001, S110 - closing anyway
                pass
            self.ws.shutdown()
            self.ws = None
        if self.reader is not None:
            self.reader.kill(block=False)
            self.reader = None


class SubscriberUser(User):
    """``subscribers``: one long-lived connection with one seed-style subscription."""

    weight = 18
    wait_time = constant(5)

    def on_start(self) -> None:
        self.sock = FastWSSocket(self)
        if self.sock.connect():
            self.sock.subscribe(random.choice(_NAMES))

    @task
    def idle(self) -> None:
        """Deliveries are read by the socket's greenlet; the task only keeps it open."""
        if self.sock.ws is None or not self.sock.subscribed:   # lost it: reconnect
            self.sock.close()
            if self.sock.connect():
                self.sock.subscribe(random.choice(_NAMES))

    def on_stop(self) -> None:
        self.sock.close()


class ChurnUser(User):
    """``churn``: reconnect every 1–3 s: a new connection subscribes, then the old one
    closes (as a client moving between nodes does), so a user is never offline."""

    weight = 2
    wait_time = between(1.0, 3.0)
    sock: FastWSSocket | None = None

    @task
    def cycle(self) -> None:
        new = FastWSSocket(self)
        if new.connect():
            new.subscribe(random.choice(_NAMES))
        old, self.sock = self.sock, new
        if old is not None:
            old.close()

    def on_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()


class PublisherUser(User):
    """``publishers``: HTTP API publications (FASTWS_API_KEY) to the seed channels; it
    also watches ``events:*`` on a WebSocket of its own, like a dashboard would."""

    fixed_count = 1
    wait_time = constant(PUBLISH_INTERVAL)

    def on_start(self) -> None:
        self.sock = FastWSSocket(self)
        if self.sock.connect():
            self.sock.subscribe("events:*")
        base = self.host.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.url = base.rstrip("/") + "/api/publish"
        self.key = os.environ.get("FASTWS_API_KEY", "")
        self.pub = uuid.uuid4().hex[:8]
        self.seq = dict.fromkeys(PUBLISH_CHANNELS, 0)
        self.turn = itertools.cycle(PUBLISH_CHANNELS)

    @task
    def publish(self) -> None:
        channel = next(self.turn)
        self.seq[channel] += 1
        body = json.dumps({"channel": channel, "data": {
            "t": time.time_ns(), "seq": self.seq[channel], "pub": self.pub,
            "eventType": channel.split(":")[-1], "pad": "x" * 40}}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        t0 = time.perf_counter()
        exc: Exception | None = None
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except Exception as e:  # noqa: BLE001 - a failed publish is a failure
            exc = e
            self.seq[channel] -= 1   # not published: subscribers must not expect it
        self.environment.events.request.fire(
            request_type="HTTP", name="publish", response_time=(time.perf_counter() - t0)
            * 1000, response_length=len(body), exception=exc, context={})

    def on_stop(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- pass/fail report


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    data["fastws_open"] = _open
    data["fastws_peak"] = _peak


@events.worker_report.add_listener
def _worker_report(client_id: str, data: dict[str, Any]) -> None:
    global _cluster_peak
    if "fastws_open" in data:
        _worker_open[client_id] = data["fastws_open"]
        _cluster_peak = max(_cluster_peak, sum(_worker_open.values()))


def _target(environment: Any) -> tuple[int, str]:
    """The peak to reach and where it comes from: FASTWS_LOCUST_TARGET, else -u."""
    if os.environ.get("FASTWS_LOCUST_TARGET"):
        return int(os.environ["FASTWS_LOCUST_TARGET"]), "FASTWS_LOCUST_TARGET"
    users = getattr(environment.parsed_options, "num_users", None)
    if users:
        return int(users), "-u"
    users = getattr(environment.runner, "target_user_count", None)
    if users:
        return int(users), "users"
    return DEFAULT_TARGET, "default"


@events.quitting.add_listener
def _verdict(environment: Any, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    peak = _cluster_peak if isinstance(environment.runner, MasterRunner) else _peak
    total = environment.stats.total
    failures = total.num_failures
    lost = environment.stats.get("lost", "WS").num_failures
    dup = environment.stats.get("duplicate", "WS").num_failures
    recv = sum(e.num_requests for (name, method), e in environment.stats.entries.items()
               if name.startswith("recv "))
    p99 = [e.get_response_time_percentile(0.99) for (name, _), e in
           environment.stats.entries.items() if name.startswith("recv ") and e.num_requests]
    target, source = _target(environment)
    ok = peak >= target and failures == 0 and recv > 0
    print(f"fastws load test: {'PASS' if ok else 'FAIL'}: peak {peak:,} concurrently "
          f"subscribed connections (target {target:,}, {source}), {recv:,} deliveries "
          f"(p99 publish→receive ≤ {max(p99) if p99 else 'n/a'} ms), {failures:,} failures "
          f"({lost:,} lost, {dup:,} duplicated)", flush=True)
    if not ok:
        environment.process_exit_code = 1
