"""The RESP link to one Redis server: what the Redis brokers (:mod:`fastws.broker.redis`,
:mod:`fastws.broker.cluster`) talk through.

* :func:`encode_command`: one command in RESP;
* :class:`RespProtocol`: the asyncio protocol of one socket, feeding a hiredis reader
  and handing every reply on;
* :class:`RedisTarget`: where a broker URL says to connect (host, port, credentials,
  database, TLS; the Sentinel or cluster seeds);
* :class:`Connection`: what both kinds of connection share (the opening handshake,
  losing the link);
* :class:`PubSubConnection`: one pub/sub connection and its subscriptions;
* :class:`CommandConnection`: one pipelined command connection (a FIFO of replies).

**Exactly once per connection.**  A connection holding ``SUBSCRIBE events:x`` and
``PSUBSCRIBE events:*`` gets one ``PUBLISH events:x`` twice from Redis (a ``message``
and a ``pmessage``).  Redis executes a ``PUBLISH`` atomically, so all the copies one
connection gets are contiguous in its stream, and the subscription confirmations in
the same stream say exactly which channels and patterns were active when it ran.  The
pub/sub connection keeps that confirmed set in a matcher; on the first copy of a
publication it counts the active subscriptions that match the channel (``k``), hands
the publication on once and skips the next ``k - 1`` messages (checked: same channel,
same bytes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.connection import SSLConnection, parse_url
from redis.crc import key_slot
from redis.exceptions import ResponseError

from fastws._match import Trie, is_pattern
from fastws.broker.base import BrokerUnavailable

__all__ = ["encode_command", "RespProtocol", "RedisTarget", "Connection", "PubSubConnection",
           "CommandConnection", "CONNECT_TIMEOUT"]

log = logging.getLogger("fastws.broker")

CONNECT_TIMEOUT = 3.0
BATCH = 1000                 # names per SUBSCRIBE command
WAIT_TIMEOUT_MS = 500        # a durable publish waits this long for a replica's ack
REPLICA_GRACE = 60.0         # seconds without replicas before publishing unacknowledged
_SUB_KINDS = {b"subscribe", b"psubscribe", b"ssubscribe"}
_UNSUB_KINDS = {b"unsubscribe", b"punsubscribe", b"sunsubscribe"}


def _encode_command_py(*args: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


_pack = getattr(hiredis, "pack_command", None)   # hiredis >= 2.1: the same bytes, in C


def encode_command(*args: str | bytes | int) -> bytes:
    """One command in RESP, ready to write (every command the connections send).

    hiredis' C ``pack_command`` when it has one: 2.4 µs instead of 7 µs for a publish
    script's ~26 arguments, measured; the Python encoder otherwise."""
    if _pack is not None:
        return _pack(args)
    return _encode_command_py(*args)


class RespProtocol(asyncio.Protocol):
    """One socket to Redis: feeds a hiredis reader and hands every reply, in order, to
    ``on_reply`` (its connection's parser); ``on_lost(self)`` when the socket ends."""

    def __init__(self, on_reply: Callable[[Any], None],
                 on_lost: Callable[[RespProtocol], None]) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.aborted = False
        self._on_reply = on_reply
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Every complete reply in ``data`` (and what was left of the last read) goes to
        ``on_reply``, in order, in this loop step."""
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
        """Write ``data`` (encoded commands); nothing once the socket is gone."""
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """Close the socket now, dropping what it still holds; ``on_lost`` follows."""
        self.aborted = True
        if self.transport is not None:
            self.transport.abort()


class RedisTarget:
    """Where a broker URL says to connect: host, port, credentials, database, TLS; the
    seeds of a Sentinel (``sentinel``) or a cluster (``hosts``).  Built once per broker."""

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

    async def open(self, host: str, port: int, link: RespProtocol) -> RespProtocol:
        """Connect ``link`` to host:port (TLS when the URL asks for it), within the timeout."""
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(
            loop.create_connection(lambda: link, host, port, ssl=self.ssl,
                                   server_hostname=host if self.ssl else None),
            CONNECT_TIMEOUT)
        return link


class Connection:
    """What the pub/sub and the command connections share: the link, its opening
    handshake (AUTH, CLIENT SETNAME) and what happens when it is lost."""

    def __init__(self, label: str, on_lost: Callable[[], None]) -> None:
        self.label = label
        self._on_lost_cb = on_lost
        self.link: RespProtocol | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        """True while the socket is open (commands may be written)."""
        return self.link is not None and self.link.transport is not None

    async def _open(self, host: str, port: int, target: RedisTarget,
                    send: Callable[..., asyncio.Future]) -> list[asyncio.Future]:
        """Connect, then send AUTH (when the URL has credentials) and CLIENT SETNAME
        through ``send``; returns their replies' futures."""
        self.loop = asyncio.get_running_loop()
        link = self.link = RespProtocol(self._on_reply, self._lost)  # current before it can be lost
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

    def _lost(self, link: RespProtocol) -> None:
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


class PubSubConnection(Connection):
    """One pub/sub connection and its subscriptions (what is wanted, sent, confirmed).

    ``exact`` and ``pattern`` are the verbs it subscribes with (``SUBSCRIBE`` /
    ``PSUBSCRIBE``, or ``SSUBSCRIBE`` and no patterns for a cluster shard).  Every
    publication it reads goes to ``deliver(channel, payload)`` once, however many of
    its confirmed subscriptions match (exactly once: see the module docstring).
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

    async def connect(self, host: str, port: int, target: RedisTarget) -> None:
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
        """Seconds the reader is behind: the last PING's round trip, or the age of the
        oldest unanswered one when that is more (the broker's ``lag``)."""
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
        """Stop wanting ``name``; the UNSUBSCRIBE goes out with this loop pass's flush."""
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


class CommandConnection(Connection):
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

    async def connect(self, host: str, port: int, target: RedisTarget,
                      scripts: dict[str, str]) -> None:
        """Open the connection: authenticate, select the database, load ``scripts``
        (name -> Lua, e.g. redis_scripts.SCRIPTS: their SHA1s in :attr:`shas`) and read
        the replication state; returns once all of it answered.  Call on every
        (re)connect, before any :meth:`call`."""
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



def _fail(fut: asyncio.Future | None, exc: Exception) -> None:
    """Fail ``fut`` with ``exc`` unless it is done already (or None)."""
    if fut is not None and not fut.done():
        fut.set_exception(exc)
        fut.exception()  # retrieved: no "never retrieved" warning when nobody waits

