"""The Redis broker: many processes and machines behind one Redis (docs/scaling.md).

Two kinds of connection per node:

* **one pub/sub connection**, owned by this module (an asyncio protocol feeding a
  hiredis reader): it SUBSCRIBEs the channels and PSUBSCRIBEs the patterns that local
  clients hold (the node counts references), pipelining every (un)subscribe issued in
  one loop pass into one write.  It reads continuously, whatever the node is doing, so
  Redis' pub/sub output buffer never grows on our account; a ``PING`` every second
  measures how far behind the reader is (``fastws_broker_lag_seconds``) and detects a
  dead link.
* **one command connection** (the same protocol, a FIFO of replies) for publish and
  history, which run as Lua scripts (:mod:`fastws.broker.redis_scripts`): commands run
  in the order the node issued them, so publications in flight together keep their
  order.  redis-py is used only to find the master through Sentinel (and the slot map
  of a cluster, :mod:`fastws.broker.cluster`).

**Exactly once per node.**  A node holding ``SUBSCRIBE events:x`` and ``PSUBSCRIBE
events:*`` gets one ``PUBLISH events:x`` twice from Redis (a ``message`` and a
``pmessage``).  Redis executes a ``PUBLISH`` atomically, so all the copies one
connection gets are contiguous in its stream, and the subscription confirmations in
the same stream say exactly which channels and patterns were active when it ran.  The
reader keeps that confirmed set in a matcher; on the first copy of a publication it
counts the active subscriptions that match the channel (``k``), hands the publication
to the node once and skips the next ``k - 1`` messages (checked: same channel, same
bytes).  The node then fans it out once per connection, however many of the
connection's subscriptions match.

**Faults.**  When the pub/sub connection drops, :attr:`up` turns False at once
(``/readyz`` 503, publications refused with :class:`BrokerUnavailable`); the broker
reconnects with jittered exponential backoff, resubscribes everything, and then tells
the handler (``handle_gap``) that publications may have been lost, so that the node
closes its subscribed connections with 4010 and their clients recover with ``since``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import orjson
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fastws._match import Trie, is_pattern
from fastws.broker.base import (
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    HistoryResult,
    Publication,
    PublishResult,
    Revocation,
)
from fastws.broker.redis_scripts import (
    ENVELOPE_PREFIX,
    HISTORY_LUA,
    LOG_PREFIX,
    LOG_SINCE_LUA,
    PRESENCE_GET_LUA,
    PRESENCE_JOIN_LUA,
    PRESENCE_LEAVE_LUA,
    PRESENCE_PREFIX,
    PRESENCE_REFRESH_LUA,
    PUBLISH_LUA,
    keys_for,
    log_keys,
    presence_keys,
    presence_user,
    presence_value,
)

SCRIPTS = {"publish": PUBLISH_LUA, "history": HISTORY_LUA, "logsince": LOG_SINCE_LUA,
           "join": PRESENCE_JOIN_LUA, "leave": PRESENCE_LEAVE_LUA,
           "presence": PRESENCE_GET_LUA, "prefresh": PRESENCE_REFRESH_LUA}

__all__ = ["RedisBroker", "encode_command", "decode_payload"]

log = logging.getLogger("fastws.broker")

IDEMPOTENCY_TTL_MS = 300_000
ONCE_PREFIX = "fws:once:"    # claim_once keys (SET NX PX), e.g. fws:once:siwe:NONCE
REVOKED_PREFIX = "fws:revoked:"  # token revocations: fws:revoked:user:U, fws:revoked:jti:J
SCAN_COUNT = 1000            # keys a SCAN step looks at (loading revocations)
# store a revocation, merged with the one already there (the later "at", the later
# "until"); the value is "AT UNTIL" (unix seconds), the key expires at UNTIL
REVOKE_LUA = """
local at, untl = tonumber(ARGV[1]), tonumber(ARGV[2])
local old = redis.call('GET', KEYS[1])
if old then
  local oat, ountl = string.match(old, '^(%S+) (%S+)$')
  if oat and tonumber(oat) and tonumber(oat) > at then at = tonumber(oat) end
  if ountl and tonumber(ountl) and tonumber(ountl) > untl then untl = tonumber(ountl) end
end
local ttl = math.ceil((untl - tonumber(ARGV[3])) * 1000)
if ttl < 1 then ttl = 1 end
local val = string.format('%.6f %.6f', at, untl)
redis.call('SET', KEYS[1], val, 'PX', ttl)
return val
"""
PING_INTERVAL = 1.0          # seconds between pub/sub PINGs (lag probe + liveness)
DEAD_AFTER = 10.0            # a PING unanswered this long: the link is dead, reconnect
CONNECT_TIMEOUT = 3.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
BATCH = 1000                 # names per SUBSCRIBE command
WAIT_TIMEOUT_MS = 500        # a durable publish waits this long for a replica's ack
REPLICA_GRACE = 60.0         # seconds without replicas before publishing unacknowledged
PRESENCE_REFRESH = 10.0      # seconds between a node's refreshes (and sweeps) of presence
PRESENCE_EXPIRY = 20.0       # seconds a presence entry lives without its node's refresh
# a dead node's clients are swept, with a leave push, within this many seconds of its
# death: their entries expire within PRESENCE_EXPIRY, and every node holding members of
# the channel sweeps it every PRESENCE_REFRESH
PRESENCE_TTL = PRESENCE_EXPIRY + PRESENCE_REFRESH
PRESENCE_BATCH = 500         # clients re-added per refresh script call
# what connecting may raise when Redis is away or busy (retried quietly)
CONNECT_ERRORS = (TimeoutError, OSError, BrokerUnavailable, ResponseError,
                  RedisConnectionError, RedisTimeoutError, RedisClusterException)
# node-to-node control messages (send_control): a name with a space, which no client
# can subscribe to or publish on (channel names are printable ASCII without space)
CONTROL_CHANNEL = "fws control"
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY",
                        "NOREPLICAS", "BUSY")
_ENV_LEN = len(ENVELOPE_PREFIX)
_SUB_KINDS = {b"subscribe", b"psubscribe", b"ssubscribe"}
_UNSUB_KINDS = {b"unsubscribe", b"punsubscribe", b"sunsubscribe"}


def encode_command(*args: str | bytes | int) -> bytes:
    """One command in RESP (what the pub/sub connection writes)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def decode_payload(payload: bytes, now: float) -> tuple[bytes, int, str, float]:
    """(JSON data, offset, epoch, accepted monotonic time) of one pub/sub payload.

    A fastws envelope carries offset, epoch and the publisher's clock; anything else is
    a raw publication: delivered as is when it is JSON, else as a JSON string.
    """
    if payload.startswith(ENVELOPE_PREFIX):
        nl = payload.find(b"\n", _ENV_LEN)
        offset, epoch, stamp = payload[_ENV_LEN:nl].split(b" ", 3)[:3]
        delay = time.time() - float(stamp)
        return payload[nl + 1:], int(offset), epoch.decode(), now - delay if delay > 0 else now
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return orjson.dumps(payload.decode("utf-8", "replace")), 0, "", now
    return payload, 0, "", now


class _Link(asyncio.Protocol):
    """The pub/sub socket: feeds a hiredis reader and hands every reply to the broker."""

    def __init__(self, on_reply: Callable[[Any], None],
                 on_lost: Callable[[_Link], None]) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.aborted = False
        self._on_reply = on_reply
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        on_reply = self._on_reply
        while not self.aborted:  # after abort() the rest is dropped: the link is dead
            reply = reader.gets()
            if reply is False:
                return
            on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        self.aborted = True
        if self.transport is not None:
            self.transport.abort()


class _Target:
    """Where the pub/sub connection goes: host, port, credentials, TLS (from the URL)."""

    def __init__(self, url: str) -> None:
        scheme = url.partition("://")[0].lower()
        self.sentinel: tuple[list[tuple[str, int]], str] | None = None
        self.hosts: list[tuple[str, int]] = []
        if scheme in ("redis+sentinel", "redis+cluster"):
            default = 26379 if scheme == "redis+sentinel" else 6379
            parts = urlsplit(url)
            for hp in parts.netloc.rpartition("@")[2].split(","):
                host, _, port = hp.rpartition(":") if ":" in hp else (hp, "", "")
                self.hosts.append((host.strip("[]"), int(port or default)))
            path = [p for p in parts.path.split("/") if p]
            if scheme == "redis+sentinel":
                self.sentinel = (self.hosts, path[0] if path else "mymaster")
            self.db = int(path[1]) if len(path) > 1 else 0
            self.username = unquote(parts.username) if parts.username else None
            self.password = unquote(parts.password) if parts.password else None
            self.host, self.port, self.ssl = self.hosts[0][0], self.hosts[0][1], None
            return
        params = parse_url(url)
        self.host = params.get("host", "localhost")
        self.port = int(params.get("port", 6379))
        self.db = int(params.get("db", 0) or 0)
        self.username = params.get("username")
        self.password = params.get("password")
        self.ssl: ssl.SSLContext | None = None
        if params.get("connection_class") is SSLConnection:
            ctx = ssl.create_default_context(cafile=params.get("ssl_ca_certs"))
            if str(params.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl = ctx

    def auth_args(self) -> tuple[str, ...] | None:
        """The arguments of the AUTH command for this URL's credentials, or None."""
        if not self.password:
            return None
        return (self.username, self.password) if self.username else (self.password,)

    async def open(self, host: str, port: int, link: _Link) -> _Link:
        """Connect ``link`` to host:port (TLS when the URL asks for it), within the timeout."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(
            loop.create_connection(lambda: link, host, port, ssl=self.ssl,
                                   server_hostname=host if self.ssl else None),
            CONNECT_TIMEOUT)
        return link


class _Connection:
    """What the pub/sub and the command connections share: the link, its opening
    handshake (AUTH, CLIENT SETNAME) and what happens when it is lost."""

    def __init__(self, label: str, on_lost: Callable[[], None]) -> None:
        self.label = label
        self._on_lost_cb = on_lost
        self.link: _Link | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.transport is not None

    async def _open(self, host: str, port: int, target: _Target,
                    send: Callable[..., asyncio.Future]) -> list[asyncio.Future]:
        """Connect, then send AUTH (when the URL has credentials) and CLIENT SETNAME
        through ``send``; returns their replies' futures."""
        self.loop = asyncio.get_running_loop()
        link = self.link = _Link(self._on_reply, self._lost)  # current before it can be lost
        await target.open(host, port, link)
        if self.link is not link:  # dropped while connecting
            link.abort()
            raise BrokerUnavailable("redis connection dropped while connecting")
        waits = []
        if (auth := target.auth_args()) is not None:
            waits.append(send("AUTH", *auth))
        waits.append(send("CLIENT", "SETNAME", f"fastws-{os.getpid()}-{self.label}"))
        return waits

    def _on_reply(self, reply: Any) -> None:
        raise NotImplementedError

    def _lost(self, link: _Link) -> None:
        """``link`` was lost.  Only the current link counts: one the connection dropped
        itself (``drop``) reports its end later, maybe after a new link was opened."""
        if link is not self.link:
            return
        self.drop()
        self._on_lost_cb()

    def _abort_link(self) -> None:
        if self.link is not None:
            self.link.abort()
            self.link = None

    def drop(self) -> None:
        """Close the connection and fail whoever waits on it."""
        raise NotImplementedError


class _PubSub(_Connection):
    """One pub/sub connection and its subscriptions (what is wanted, sent, confirmed).

    ``exact`` and ``pattern`` are the verbs it subscribes with (``SUBSCRIBE`` /
    ``PSUBSCRIBE``, or ``SSUBSCRIBE`` and no patterns for a cluster shard).  Every
    publication it reads goes to ``deliver(channel, payload)`` once, however many of
    its confirmed subscriptions match (see the module docstring).
    """

    def __init__(self, label: str, deliver: Callable[[bytes, bytes], None],
                 on_lost: Callable[[], None], exact: str = "SUBSCRIBE",
                 pattern: str | None = "PSUBSCRIBE") -> None:
        super().__init__(label, on_lost)
        self.exact, self.pattern = exact, pattern
        self._deliver = deliver
        self.wanted: set[str] = set()
        self._sent: set[str] = set()
        self._active = Trie()
        self._confirm: dict[str, asyncio.Future] = {}
        self._expect: collections.deque[tuple[str, Any]] = collections.deque()
        self._flush_scheduled = False
        self._skip = 0
        self._skip_channel = b""
        self._skip_data = b""
        self.lag = 0.0
        self._pings: collections.deque[float] = collections.deque()

    async def connect(self, host: str, port: int, target: _Target) -> None:
        """Open the connection, authenticate, (re)subscribe everything wanted; wait for it."""
        waits = await self._open(host, port, target, self._command)
        waits.extend(self.flush())
        self.ping()
        await asyncio.wait_for(asyncio.gather(*waits), CONNECT_TIMEOUT * 2)

    def _command(self, *args: str | bytes | int) -> asyncio.Future:
        fut = self.loop.create_future()
        self._expect.append(("reply", fut))
        self.link.write(encode_command(*args))
        return fut

    def ping(self) -> None:
        """Send a PING down the connection; its answer, in order, measures the lag."""
        if not self.connected:
            return
        self._pings.append(time.monotonic())
        self._expect.append(("pong", None))
        self.link.write(encode_command("PING", "lag"))

    def barrier(self) -> asyncio.Future:
        """A PING whose answer comes after every message Redis queued for this connection
        before it ran the PING: the future is done once all of them were delivered."""
        if not self.connected:
            raise BrokerUnavailable("redis is not connected")
        fut = self.loop.create_future()
        self._pings.append(time.monotonic())
        self._expect.append(("pong", fut))
        self.link.write(encode_command("PING", "lag"))
        return fut

    def holds(self, name: str) -> bool:
        """True if Redis confirmed ``name`` on this connection (as it reads now)."""
        return bool(self._active.keys(name))

    def current_lag(self) -> float:
        if self._pings:
            return max(self.lag, time.monotonic() - self._pings[0])
        return self.lag

    def drop(self) -> None:
        """Close the connection and forget its state; fail whoever waits on it."""
        self._abort_link()
        exc = BrokerUnavailable("redis connection lost")
        for _, fut in self._expect:
            _fail(fut, exc)
        for fut in self._confirm.values():
            _fail(fut, exc)
        self._expect.clear()
        self._confirm.clear()
        self._sent.clear()
        self._active = Trie()
        self._pings.clear()
        self._skip = 0

    # ------------------------------------------------------------------ replies

    def _on_reply(self, reply: Any) -> None:
        if reply.__class__ is list:
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                self._on_message(reply[1], reply[2])
                return
            if kind == b"pmessage":
                self._on_message(reply[2], reply[3])
                return
            if kind in _SUB_KINDS or kind in _UNSUB_KINDS:
                self._on_confirm(kind, reply[1])
                return
        # a reply to PING / AUTH / CLIENT: in order
        if not self._expect:
            log.warning("redis pub/sub: unexpected reply %r", reply)
            return
        what, fut = self._expect.popleft()
        if what == "pong":
            sent = self._pings.popleft() if self._pings else time.monotonic()
            self.lag = time.monotonic() - sent
            if fut is not None and not fut.done():
                fut.set_result(None)  # a barrier (see barrier())
        elif fut is not None and not fut.done():
            if isinstance(reply, Exception):
                fut.set_exception(BrokerUnavailable(f"redis: {reply}"))
                fut.exception()
                if self.link is not None:
                    self.link.abort()
            else:
                fut.set_result(reply)

    def _on_confirm(self, kind: bytes, raw: bytes) -> None:
        self._skip = 0
        name = raw.decode("utf-8", "replace")
        if self._expect and self._expect[0][0] == "sub":
            _, fut = self._expect.popleft()
        else:  # not ours: Redis moved a sharded channel away (cluster); start again
            if kind in _UNSUB_KINDS and self.link is not None:
                log.warning("redis pub/sub: server unsubscribed %s; reconnecting", name)
                self.link.abort()
            return
        if kind in _SUB_KINDS:
            self._active.add(name, name)
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:
            self._active.remove(name, name)

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        if self._skip:
            if channel == self._skip_channel and payload == self._skip_data:
                self._skip -= 1
                return
            self._skip = 0
        copies = len(self._active.match(channel.decode("utf-8", "replace")))
        if copies > 1:
            self._skip = copies - 1
            self._skip_channel = channel
            self._skip_data = payload
        self._deliver(channel, payload)

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, name: str) -> asyncio.Future:
        """Want ``name``; the future is done once Redis confirmed it on this connection."""
        self.wanted.add(name)
        fut = self._confirm.get(name)
        if fut is None:
            fut = self._confirm[name] = self.loop.create_future()
            self._schedule_flush()
        return fut

    def unsubscribe(self, name: str) -> None:
        self.wanted.discard(name)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> list[asyncio.Future]:
        """Send the (un)subscribes that make Redis hold exactly what is wanted (one write)."""
        self._flush_scheduled = False
        if not self.connected:
            return []
        add = self.wanted - self._sent
        remove = self._sent - self.wanted
        for name in [n for n in self._confirm if n not in self.wanted and n not in self._sent]:
            fut = self._confirm.pop(name)
            if not fut.done():
                fut.set_result(None)  # subscribed and unsubscribed in one pass
        out: list[bytes] = []
        futs: list[asyncio.Future] = []
        for chunk, verb in self._commands(add, subscribe=True):
            out.append(encode_command(verb, *chunk))
            for n in chunk:
                fut = self._confirm.get(n)
                if fut is None:
                    fut = self._confirm[n] = self.loop.create_future()
                self._expect.append(("sub", fut))
                futs.append(fut)
        for chunk, verb in self._commands(remove, subscribe=False):
            out.append(encode_command(verb, *chunk))
            for n in chunk:
                self._confirm.pop(n, None)
                self._expect.append(("sub", None))
        self._sent |= add
        self._sent -= remove
        if out:
            self.link.write(b"".join(out))
        return futs

    def _commands(self, names: set[str], subscribe: bool) -> list[tuple[list[str], str]]:
        """(names, verb) of each command that (un)subscribes ``names``: at most BATCH
        names per command; sharded verbs take the names of one hash slot at a time."""
        exact = sorted(n for n in names if not is_pattern(n))
        verb = self.exact if subscribe else self.exact.replace("SUB", "UNSUB", 1)
        groups: list[tuple[list[str], str]] = []
        if verb.startswith("S"):
            by_slot: dict[int, list[str]] = {}
            for n in exact:
                by_slot.setdefault(key_slot(n.encode()), []).append(n)
            groups.extend((g, verb) for g in by_slot.values())
        else:
            groups.append((exact, verb))
        if self.pattern is not None:
            pverb = self.pattern if subscribe else self.pattern.replace("SUB", "UNSUB", 1)
            groups.append((sorted(n for n in names if is_pattern(n)), pverb))
        return [(g[i:i + BATCH], v) for g, v in groups for i in range(0, len(g), BATCH)]


class _Commands(_Connection):
    """One pipelined command connection: commands go out in call order, Redis runs them
    in that order, and replies come back in that order (a FIFO of futures).

    Publications of one node therefore reach Redis, get their offsets and are fanned
    out in the order the node issued them (a pool of connections would reorder two
    publications in flight at once).  The scripts are loaded on every (re)connect,
    before anything else on the connection.

    **Durable calls.**  When the master has replicas, a ``durable`` call (publish)
    answers only once a replica has it: the commands written in one loop pass are
    followed by one ``WAIT 1 WAIT_TIMEOUT_MS``, and their futures settle on its reply.
    What the API answered 200 for then survives a failover; a publication no replica
    acknowledged in time answers 503 (its outcome is unknown: retry it with an
    idempotency key).
    """

    def __init__(self, label: str, on_lost: Callable[[], None]) -> None:
        super().__init__(label, on_lost)
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._out: list[bytes] = []
        self.shas: dict[str, bytes] = {}
        self.replid = ""     # this master's replication ids (see redis_scripts.PUBLISH_LUA)
        self.replid2 = ""
        self.replicas = 0    # connected replicas: durable calls WAIT for one of them
        self._no_replica_since: float | None = None
        self._durable: list[tuple[asyncio.Future, asyncio.Future]] = []

    async def connect(self, host: str, port: int, target: _Target,
                      scripts: dict[str, str]) -> None:
        waits = await self._open(host, port, target, self.call)
        if target.db:
            waits.append(self.call("SELECT", target.db))
        names = list(scripts)
        loads = [self.call("SCRIPT", "LOAD", scripts[n]) for n in names]
        await asyncio.wait_for(asyncio.gather(*waits), CONNECT_TIMEOUT * 2)
        info = self.call("INFO", "replication")
        shas = await asyncio.wait_for(asyncio.gather(*loads), CONNECT_TIMEOUT * 2)
        self.shas = dict(zip(names, shas, strict=True))
        self._read_info(await asyncio.wait_for(info, CONNECT_TIMEOUT))

    def _read_info(self, info: bytes, connecting: bool = True) -> None:
        fields = dict(line.split(":", 1) for line in info.decode().split("\r\n")
                      if ":" in line)
        if fields.get("role") == "slave":  # demoted (failover): find the master again
            if connecting:
                raise BrokerUnavailable(f"redis {self.label}: this server is a replica now")
            if self.link is not None:
                self.link.abort()
            return
        self.replid = fields.get("master_replid", "")
        self.replid2 = fields.get("master_replid2", "")
        replicas = int(fields.get("connected_slaves", "0") or 0)
        if connecting or replicas:
            self.replicas, self._no_replica_since = replicas, None
        elif self.replicas:
            # Lost its replicas: a failover may be under way (this master is about to be
            # demoted, and what it acknowledged now would be lost), so keep refusing
            # unacknowledged publications (503) for REPLICA_GRACE before going on
            # without a replica.
            now = time.monotonic()
            if self._no_replica_since is None:
                self._no_replica_since = now
            elif now - self._no_replica_since > REPLICA_GRACE:
                log.warning("redis %s: no replica for %.0f s; publishing without replica "
                            "acknowledgement", self.label, REPLICA_GRACE)
                self.replicas = 0

    async def refresh_replicas(self) -> None:
        """Read the replica count again (replicas come and go)."""
        with contextlib.suppress(BrokerUnavailable, ResponseError, TimeoutError):
            self._read_info(await asyncio.wait_for(self.call("INFO", "replication"),
                                                   CONNECT_TIMEOUT), connecting=False)

    def call(self, *args: str | bytes | int, durable: bool = False) -> asyncio.Future:
        """Write one command now; the future gets its reply (BrokerUnavailable if lost)."""
        if not self.connected:
            raise BrokerUnavailable("redis is not connected")
        fut = self.loop.create_future()
        self._waiting.append(fut)
        if not self._out:  # the first command of this loop pass: write them all at its end
            self.loop.call_soon(self._write)
        self._out.append(encode_command(*args))
        if durable and self.replicas:
            outer = self.loop.create_future()
            self._durable.append((fut, outer))
            return outer
        return fut

    def _write(self) -> None:
        out, self._out = self._out, []
        if self._durable:
            pairs, self._durable = self._durable, []
            wait = self.loop.create_future()
            self._waiting.append(wait)
            out.append(encode_command("WAIT", 1, WAIT_TIMEOUT_MS))
            wait.add_done_callback(functools.partial(self._settle, pairs))
        if self.link is not None and out:
            self.link.write(b"".join(out))

    def _settle(self, pairs: list[tuple[asyncio.Future, asyncio.Future]],
                wait: asyncio.Future) -> None:
        """WAIT answered (or the link died): settle the durable calls written before it."""
        exc = wait.exception() if not wait.cancelled() else BrokerUnavailable("cancelled")
        acked = exc is None and isinstance(wait.result(), int) and wait.result() >= 1
        if exc is None and not acked and self.loop is not None:
            self.loop.create_task(self.refresh_replicas())  # a replica may have gone
        for inner, outer in pairs:
            if outer.done():
                continue
            if not inner.done():
                _fail(outer, BrokerUnavailable("redis connection lost"))
            elif inner.exception() is not None:
                outer.set_exception(inner.exception())
                outer.exception()
            elif not acked:
                _fail(outer, BrokerUnavailable(
                    "no replica acknowledged the publication in time; its outcome is "
                    "unknown (retry it with an idempotency key)"))
            else:
                outer.set_result(inner.result())

    def _on_reply(self, reply: Any) -> None:
        if not self._waiting:
            log.warning("redis: unexpected reply %r", reply)
            return
        fut = self._waiting.popleft()
        if fut.done():
            return
        if isinstance(reply, hiredis.ReplyError):
            fut.set_exception(ResponseError(str(reply)))
            fut.exception()  # retrieved: a failed handshake leaves the rest unawaited
        else:
            fut.set_result(reply)

    def drop(self) -> None:
        """Close the connection; fail the calls in flight (503)."""
        self._abort_link()
        self._out.clear()
        exc = BrokerUnavailable("redis connection lost")
        for _, outer in self._durable:
            _fail(outer, exc)
        self._durable.clear()
        while self._waiting:
            _fail(self._waiting.popleft(), exc)


class RedisBroker(Broker):
    """Broker on one Redis (``redis://``, ``rediss://``) or a Sentinel-watched master."""

    def __init__(self, url: str, *, max_connections: int = 64) -> None:
        self.url = url
        self.target = _Target(url)
        self.up = False
        self.reconnects = 0
        self._handler: BrokerHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: asyncio.Event | None = None
        self._closed = False
        self._runner: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self._wanted: set[str] = {CONTROL_CHANNEL}   # every node hears control messages
        self.node_id = os.urandom(6).hex()
        # channel -> {client id: user JSON} of this node's presence members
        self._presence_local: dict[str, dict[str, bytes]] = {}
        self._refresher: asyncio.Task | None = None
        self._readd: asyncio.Task | None = None
        self._setup_commands(url, max_connections)

    def _setup_commands(self, url: str, max_connections: int) -> None:
        """The pub/sub and command connections (and Sentinel, to find the master)."""
        self.redis: Any = None
        self._sentinel: Any = None
        if self.target.sentinel is not None:
            from redis.asyncio.sentinel import Sentinel

            hosts, _master = self.target.sentinel
            self._sentinel = Sentinel(hosts, password=self.target.password,
                                      username=self.target.username, **_command_options())
        self._main = _PubSub("pubsub", self._deliver, self._on_link_lost)
        self._cmd = _Commands("commands", self._on_link_lost)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        """Start the pub/sub link(s); returns after the first attempt (connected or not)."""
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        first = self._loop.create_future()
        self._runner = self._loop.create_task(self._run(first))
        await first

    async def close(self) -> None:
        self._closed = True
        self.up = False
        for task in (self._runner, self._pinger, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for link in self._links():
            link.drop()
        for cmd in self._command_links():
            cmd.drop()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    @property
    def lag(self) -> float:
        """Seconds the pub/sub reader is behind Redis (the oldest unanswered PING)."""
        return max((link.current_lag() for link in self._links()), default=0.0)

    def _links(self) -> list[_PubSub]:
        return [self._main]

    def _command_links(self) -> list[_Commands]:
        return [self._cmd]

    def _command_for(self, channel: str) -> _Commands:
        """The command connection that runs ``channel``'s scripts."""
        return self._cmd

    async def _connect(self) -> None:
        """Connect every pub/sub link and resubscribe what the node holds."""
        if self._sentinel is not None:
            host, port = await asyncio.wait_for(
                self._sentinel.discover_master(self.target.sentinel[1]), CONNECT_TIMEOUT)
        else:
            host, port = self.target.host, self.target.port
        self._main.wanted = set(self._wanted)
        await asyncio.gather(self._main.connect(host, port, self.target),
                             self._cmd.connect(host, port, self.target, SCRIPTS))

    async def _run(self, first: asyncio.Future) -> None:
        attempt = 0
        ever_up = False
        while not self._closed:
            self._lost = asyncio.Event()
            try:
                await self._connect()
            except Exception as exc:  # noqa: BLE001 - whatever it was, try again later
                for link in self._links():
                    link.drop()
                for cmd in self._command_links():
                    cmd.drop()
                if not isinstance(exc, CONNECT_ERRORS):
                    log.exception("redis: unexpected error while connecting; retrying")
                elif attempt == 0:
                    log.warning("redis pub/sub: cannot connect to %s: %s; retrying",
                                _safe(self.url), exc or type(exc).__name__)
                if not first.done():
                    first.set_result(None)
                attempt += 1
                delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(attempt, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if self._lost.is_set():  # lost while connecting
                continue
            attempt = 0
            self.up = True
            self._notify("handle_connected")
            if self._pinger is None or self._pinger.done():
                self._pinger = self._loop.create_task(self._ping_loop())
            if self._refresher is None or self._refresher.done():
                self._refresher = self._loop.create_task(self._presence_loop())
            elif self._presence_local:  # re-add our entries (Redis may have lost them)
                self._readd = self._loop.create_task(self._presence_refresh())
            if ever_up:
                self.reconnects += 1
                log.warning("redis pub/sub: reconnected, %d channels and patterns "
                            "resubscribed; closing subscribers with 4010", len(self._wanted))
                self._notify("handle_gap")
            ever_up = True
            if not first.done():
                first.set_result(None)
            await self._lost.wait()
            if not self._closed:
                log.warning("redis pub/sub: connection to %s lost; reconnecting",
                            _safe(self.url))

    def _notify(self, hook: str, *args: Any) -> None:
        """Call the handler's optional ``hook(*args)`` (``handle_gap``,
        ``handle_connected``, ``handle_control``); a failure is logged, not raised."""
        fn = getattr(self._handler, hook, None)
        if fn is not None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", hook)

    def _moved(self, cmd: _Commands) -> None:
        """``cmd``'s server is no longer the master of what it was asked (MOVED, ASK,
        READONLY): find the master(s) again.  With one Redis, everything reconnects."""
        self._on_link_lost()

    def _on_link_lost(self) -> None:
        """Any pub/sub link lost: not up; drop them all and start again (gap afterwards)."""
        self.up = False
        for link in self._links():
            link.drop()
        for cmd in self._command_links():
            cmd.drop()
        if self._lost is not None:
            self._lost.set()

    async def _ping_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(PING_INTERVAL)
            for link in self._links():
                if not link.connected:
                    continue
                if link.current_lag() > DEAD_AFTER:
                    log.warning("redis pub/sub: no answer for %.0f s; reconnecting",
                                DEAD_AFTER)
                    link.link.abort()
                    break
                link.ping()

    # ------------------------------------------------------------------ delivery

    def _deliver(self, channel: bytes, payload: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        if name == CONTROL_CHANNEL:
            self._deliver_control(payload)
            return
        if payload.startswith(PRESENCE_PREFIX):
            self._deliver_presence(name, payload)
            return
        try:
            if payload.startswith(LOG_PREFIX):  # + "LOG_OFFSET LOG_EPOCH\n" + envelope
                nl = payload.index(b"\n")
                loff, lepoch = payload[len(LOG_PREFIX):nl].split(b" ")
                data, offset, epoch, accepted = decode_payload(payload[nl + 1:],
                                                               time.monotonic())
                self._handler.handle_publication(name, data, offset, epoch, accepted,
                                                 int(loff), lepoch.decode())
                return
            data, offset, epoch, accepted = decode_payload(payload, time.monotonic())
            self._handler.handle_publication(name, data, offset, epoch, accepted)
        except Exception:
            log.exception("redis pub/sub: cannot deliver a publication on %s", name)

    def _deliver_control(self, payload: bytes) -> None:
        """``NODE_ID PAYLOAD`` on the control channel: another node's control message."""
        node, _, body = payload.partition(b" ")
        if node.decode("ascii", "replace") == self.node_id:
            return  # our own: the sending node acted on it already
        self._notify("handle_control", body)

    async def send_control(self, payload: bytes) -> None:
        """Publish ``NODE_ID PAYLOAD`` on the control channel (SPUBLISH on a cluster)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        link = self._command_for(CONTROL_CHANNEL)
        await link.call(self._presence_command, CONTROL_CHANNEL,
                        self.node_id.encode() + b" " + payload)

    def _deliver_presence(self, channel: str, payload: bytes) -> None:
        try:
            nl = payload.index(b"\n")
            typ, node, client = payload[len(PRESENCE_PREFIX):nl].decode().split(" ")
            if node == self.node_id:
                return  # our own: the node pushed it already
            user = orjson.loads(payload[nl + 1:])
            handle = getattr(self._handler, "handle_presence", None)
            if handle is not None:
                handle(channel, typ, client, user)
        except Exception:
            log.exception("redis pub/sub: bad presence event on %s", channel)

    # ------------------------------------------------------------------ presence

    def _presence_event(self, typ: str, client: str, user_json: bytes) -> bytes:
        return (PRESENCE_PREFIX + f"{typ} {self.node_id} {client}\n".encode() + user_json)

    async def presence_join(self, channel: str, client: str, user: str | None) -> None:
        user_json = orjson.dumps(user)
        self._presence_local.setdefault(channel, {})[client] = user_json
        await self._presence_call(channel, "join", [client,
                                                    presence_value(self.node_id, user_json),
                                                    int(PRESENCE_EXPIRY * 1000),
                                                    self._presence_command, channel,
                                                    self._presence_event("join", client,
                                                                         user_json)])

    async def presence_leave(self, channel: str, client: str, user: str | None) -> None:
        members = self._presence_local.get(channel)
        user_json = members.pop(client, None) if members is not None else None
        if members is not None and not members:
            del self._presence_local[channel]
        await self._presence_call(channel, "leave", [client, self._presence_command, channel,
                                                     self._presence_event(
                                                         "leave", client,
                                                         user_json or orjson.dumps(user))])

    async def presence(self, channel: str) -> dict[str, str | None] | None:
        """Every node's clients in ``channel``'s presence; expired entries (a dead node's)
        are swept first, with their leave pushes (see redis_scripts)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        flat = await self._eval(channel, "presence", list(presence_keys(channel)),
                                [self._presence_command, channel])
        return {flat[i].decode(): orjson.loads(presence_user(flat[i + 1]))
                for i in range(0, len(flat), 2)}

    @property
    def _presence_command(self) -> str:
        return "PUBLISH"

    async def _presence_call(self, channel: str, script: str, args: list[Any]) -> None:
        """Joins and leaves never fail the caller: a lost one is repaired by the refresh
        (joins) or by the entry's expiry and sweep (leaves)."""
        if not self.up:
            return
        try:
            await self._eval(channel, script, list(presence_keys(channel)), args)
        except (BrokerUnavailable, ResponseError) as exc:
            log.debug("presence %s on %s not stored: %s", script, channel, exc)

    async def _presence_refresh(self) -> None:
        """Per channel with local presence members: sweep the expired entries (a dead
        node's: their leaves are published) and re-add ours (expiry PRESENCE_EXPIRY
        ahead; one that was swept meanwhile is published as a join again)."""
        await asyncio.gather(*(self._refresh_channel(channel)
                               for channel in list(self._presence_local)))

    async def _refresh_channel(self, channel: str) -> None:
        """Refresh ``channel``'s local members, PRESENCE_BATCH per script.  Each batch is
        read from :attr:`_presence_local` in the same loop step that writes its script,
        so a leave issued meanwhile is never undone (nor announced as a join again)."""
        ttl = int(PRESENCE_EXPIRY * 1000)
        clients = list(self._presence_local.get(channel, ()))
        for i in range(0, len(clients), PRESENCE_BATCH):
            members = self._presence_local.get(channel, {})
            args: list[Any] = [ttl, self._presence_command, channel, self.node_id]
            for client in clients[i:i + PRESENCE_BATCH]:
                if client in members:
                    args += (client, presence_value(self.node_id, members[client]))
            if len(args) > 4:
                await self._presence_call(channel, "prefresh", args)

    async def _presence_loop(self) -> None:
        """Every PRESENCE_REFRESH seconds: refresh (and sweep) presence, and read each
        master's replica count again (durable publishes wait for a replica)."""
        while not self._closed:
            await asyncio.sleep(PRESENCE_REFRESH)
            try:
                await self._presence_refresh()
            except Exception:
                log.exception("presence refresh failed")
            for cmd in self._command_links():
                if cmd.connected:
                    await cmd.refresh_replicas()

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, name: str) -> None:
        """Return once Redis confirmed the (P)SUBSCRIBE: later publications reach us."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        self._wanted.add(name)
        await asyncio.shield(self._main.subscribe(name))

    async def unsubscribe(self, name: str) -> None:
        self._wanted.discard(name)
        self._main.unsubscribe(name)

    async def sync(self) -> None:
        """Return once every publication Redis ran before this call reached the handler:
        a PING down each pub/sub connection, answered after what was queued before it."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        await asyncio.gather(*(link.barrier() for link in self._links() if link.connected))

    # ------------------------------------------------------------------ commands

    def _publish_args(self, channel: str, data: bytes, history_size: int,
                      history_ttl: float) -> list[Any]:
        link = self._command_for(channel)
        # With replicas a publication answers once one has it (durable), so a promoted
        # replica holds every acknowledged one.  The meta's `r` says so (":d"), and a
        # promoted replica starts a new epoch only after a write that was not durable.
        replid = link.replid + (":d" if link.replicas else "")
        return [channel, data, max(0, history_size), max(1, int(history_ttl * 1000)),
                os.urandom(4).hex(), f"{time.time():.6f}", IDEMPOTENCY_TTL_MS, "PUBLISH", "",
                replid, link.replid2]

    keeps_logs = True  # namespace logs (not on a cluster: the log's slot is not the channel's)

    def _publish_call(self, channel: str, data: bytes, history_size: int,
                      history_ttl: float, idempotency_key: str | None,
                      log: tuple[str, int] | None) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the publish script for one publication."""
        meta, stream, idem = keys_for(channel)
        keys = [meta, stream]
        if idempotency_key is not None:
            keys.append(idem + idempotency_key)
        args = self._publish_args(channel, data, history_size, history_ttl)
        if log is not None and log[1] > 0 and self.keeps_logs:
            keys.extend(log_keys(log[0]))
            args.append(log[1])  # ARGV[12]: the namespace log's size
        return keys, args

    async def publish(self, channel: str, data: bytes, *, history_size: int,
                      history_ttl: float, idempotency_key: str | None = None,
                      log: tuple[str, int] | None = None) -> PublishResult:
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        keys, args = self._publish_call(channel, data, history_size, history_ttl,
                                        idempotency_key, log)
        res = await self._eval(channel, "publish", keys, args, durable=True)
        offset, _, epoch = res.partition(b" ")
        return PublishResult(int(offset), epoch.decode())

    async def publish_batch(self, pubs: list[Publication]
                            ) -> list[PublishResult | BrokerUnavailable]:
        """Every publish script of the batch is written before any reply is awaited:
        one pipeline per command connection (one round trip, and with replicas one
        ``WAIT`` for all), run by Redis in the batch's order."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        calls: list[tuple[str, _Commands, asyncio.Future, list[str], list[Any]]
                   | BrokerUnavailable] = []
        for p in pubs:
            keys, args = self._publish_call(p.channel, p.data, p.history_size,
                                            p.history_ttl, p.idempotency_key, p.log)
            try:
                link = self._command_for(p.channel)
                fut = self._issue(link, "publish", keys, args, durable=True)
            except BrokerUnavailable as exc:  # e.g. the channel's cluster shard is down
                calls.append(exc)
                continue
            calls.append((p.channel, link, fut, keys, args))
        replies = await asyncio.gather(
            *(self._reply(c[1], c[2], "publish", c[3], c[4], durable=True)
              for c in calls if not isinstance(c, BrokerUnavailable)),
            return_exceptions=True)
        out: list[PublishResult | BrokerUnavailable] = []
        it = iter(replies)
        for c in calls:
            res = c if isinstance(c, BrokerUnavailable) else next(it)
            if isinstance(res, BrokerUnavailable):
                out.append(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                offset, _, epoch = res.partition(b" ")
                out.append(PublishResult(int(offset), epoch.decode()))
        return out

    async def log_history(self, namespace: str, *, limit: int, since_channel: str,
                          since_offset: int, since_epoch: str) -> HistoryResult:
        if not self.keeps_logs:
            return HistoryResult([], 0, "", False)
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        if not since_channel:  # a position in the log itself
            keys = list(log_keys(namespace))
            res = await self._eval(namespace, "history", keys,
                                   [max(0, limit), str(min(since_offset, 2**62))])
            if res and since_epoch not in ("", res[1].decode()):
                return HistoryResult([], int(res[0]), res[1].decode(), False)
            res = [*res, str(since_offset).encode()] if res else res
        else:
            meta, stream, _ = keys_for(since_channel)
            res = await self._eval(namespace, "logsince",
                                   [*log_keys(namespace), meta, stream],
                                   [max(0, limit), min(since_offset, 2**62), since_epoch])
        if not res:
            return HistoryResult([], 0, "", not since_channel and since_offset == 0)
        top, epoch = int(res[0]), res[1].decode()
        first = int(res[2].partition(b"-")[0]) if res[2] else top + 1
        if not res[4]:
            return HistoryResult([], top, epoch, False)
        found = int(res[4])
        pubs = []
        for eid, fields in res[3]:
            f = dict(zip(fields[::2], fields[1::2], strict=True))
            pubs.append((int(eid.partition(b"-")[0]), f[b"c"].decode(), int(f[b"o"]),
                         f[b"e"].decode(), f[b"d"]))
        return HistoryResult(pubs, top, epoch, found + 1 >= first and found <= top)

    async def history(self, channel: str, *, limit: int, since_offset: int | None = None,
                      since_epoch: str | None = None) -> HistoryResult:
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        meta, stream, _ = keys_for(channel)
        since = "" if since_offset is None else str(min(since_offset, 2**62))
        res = await self._eval(channel, "history", [meta, stream], [max(0, limit), since])
        if not res:
            return HistoryResult([], 0, "", since_offset is None or since_offset == 0)
        top, epoch = int(res[0]), res[1].decode()
        first = int(res[2].partition(b"-")[0]) if res[2] else top + 1
        items = [(int(eid.partition(b"-")[0]), fields[1]) for eid, fields in res[3]]
        if since_offset is None:
            items.reverse()
            return HistoryResult(items, top, epoch, True)
        if since_epoch not in (None, "", epoch):
            return HistoryResult([], top, epoch, False)
        recovered = since_offset + 1 >= first and since_offset <= top
        return HistoryResult(items, top, epoch, recovered)

    async def claim_once(self, key: str, ttl: float) -> bool:
        """``SET fws:once:KEY 1 NX PX ttl`` on the key's master (its slot's, on a cluster).

        Durable as a publish is: with replicas, it answers once one has the key (else
        BrokerUnavailable), so a failover cannot hand a claimed key out again.
        """
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        rkey = ONCE_PREFIX + key
        cmd = self._command_for(rkey)
        try:
            reply = await cmd.call("SET", rkey, "1", "NX", "PX", max(1, int(ttl * 1000)),
                                   durable=True)
        except ResponseError as exc:
            msg = str(exc)
            if msg.startswith(("MOVED", "ASK", "READONLY")):
                self._moved(cmd)  # as in _eval: find the master(s) again
            if msg.startswith(("MOVED", "ASK", "READONLY", *_UNAVAILABLE_REPLIES)):
                raise BrokerUnavailable(f"redis: {msg}") from None
            raise
        return reply is not None

    # ------------------------------------------------------------------ revocations

    async def revoke(self, rev: Revocation) -> Revocation:
        """``fws:revoked:KIND:KEY`` = ``"AT UNTIL"``, expiring at UNTIL, merged with the
        record already there, on the key's master (its slot's, on a cluster); durable
        as a publish is (a replica has it before this answers)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        rkey = f"{REVOKED_PREFIX}{rev.kind}:{rev.key}"
        cmd = self._command_for(rkey)
        try:
            reply = await cmd.call("EVAL", REVOKE_LUA, 1, rkey, repr(rev.at), repr(rev.until),
                                   repr(time.time()), durable=True)
        except ResponseError as exc:
            msg = str(exc)
            if msg.startswith(("MOVED", "ASK", "READONLY")):
                self._moved(cmd)
            if msg.startswith(("MOVED", "ASK", "READONLY", *_UNAVAILABLE_REPLIES)):
                raise BrokerUnavailable(f"redis: {msg}") from None
            raise
        return _revocation(rkey.encode(), reply) or rev

    def _scan_links(self) -> list[_Commands]:
        """The command connections whose keys make up the whole keyspace (one per
        master that is up, on a cluster)."""
        return [self._cmd]

    async def revocations(self) -> list[Revocation]:
        """SCAN every master for ``fws:revoked:*`` keys, then GET them (pipelined)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        keys: list[bytes] = []
        gets: list[asyncio.Future] = []
        for link in self._scan_links():
            cursor: bytes | str = "0"
            while True:
                cursor, batch = await link.call("SCAN", cursor, "MATCH", REVOKED_PREFIX + "*",
                                                "COUNT", SCAN_COUNT)
                keys.extend(batch)
                gets.extend(link.call("GET", k) for k in batch)   # where it lives
                if cursor in (b"0", "0"):
                    break
        values = await asyncio.gather(*gets)
        now = time.time()
        out = [_revocation(k, v) for k, v in zip(keys, values, strict=True)]
        return [r for r in out if r is not None and r.until > now]

    async def _eval(self, channel: str, script: str, keys: list[str],
                    args: list[Any], durable: bool = False) -> Any:
        """Run one of SCRIPTS for ``channel`` on its command connection, in call order."""
        link = self._command_for(channel)
        fut = self._issue(link, script, keys, args, durable)
        return await self._reply(link, fut, script, keys, args, durable)

    @staticmethod
    def _issue(link: _Commands, script: str, keys: list[str], args: list[Any],
               durable: bool) -> asyncio.Future:
        """Queue the script's EVALSHA on ``link`` now (written at the end of this loop
        pass with every other command queued in it); the future gets the reply."""
        try:
            sha = link.shas[script]
        except KeyError:
            raise BrokerUnavailable("redis is not connected") from None
        return link.call("EVALSHA", sha, len(keys), *keys, *args, durable=durable)

    async def _reply(self, link: _Commands, fut: asyncio.Future, script: str,
                     keys: list[str], args: list[Any], durable: bool) -> Any:
        """The reply of an :meth:`_issue`; a flushed script runs again, and replies that
        mean the master moved or is busy become :class:`BrokerUnavailable`."""
        try:
            return await fut
        except ResponseError as exc:
            msg = str(exc)
            if msg.startswith("NOSCRIPT"):  # flushed behind our back: not run, run it now
                return await link.call("EVAL", SCRIPTS[script], len(keys), *keys, *args,
                                       durable=durable)
            if msg.startswith(("MOVED", "ASK", "READONLY")):
                # cluster slots moved, or this master became a replica (failover):
                # find the master(s) again, resubscribe, tell the clients (4010)
                self._moved(link)
                raise BrokerUnavailable(f"redis: {msg}") from None
            if msg.startswith(_UNAVAILABLE_REPLIES):
                raise BrokerUnavailable(f"redis: {msg}") from None
            raise

    # ------------------------------------------------------------------ for tests

    def wanted(self) -> frozenset[str]:
        """The channels and patterns this node holds in Redis for its clients."""
        return frozenset(self._wanted - {CONTROL_CHANNEL})


def _command_options() -> dict[str, Any]:
    """Options of command connections: short timeouts, and never a retry, so that a
    publication whose outcome is unknown is reported (503), not sent twice."""
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0}


def _fail(fut: asyncio.Future | None, exc: Exception) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(exc)
        fut.exception()  # retrieved: no "never retrieved" warning when nobody waits


def _revocation(key: bytes, value: Any) -> Revocation | None:
    """The record of a ``fws:revoked:KIND:KEY`` key holding ``"AT UNTIL"``, or None
    when it is not one (a foreign key under the prefix, or gone)."""
    if not isinstance(value, bytes) or not key.startswith(REVOKED_PREFIX.encode()):
        return None
    kind, sep, name = key[len(REVOKED_PREFIX):].decode("utf-8", "replace").partition(":")
    try:
        at, until = (float(x) for x in value.split())
    except ValueError:
        return None
    if not sep or kind not in ("user", "jti") or not name:
        return None
    return Revocation(kind, name, at, until)


def _safe(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url
