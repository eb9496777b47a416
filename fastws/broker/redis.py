"""The Redis broker: many processes and machines behind one Redis (docs/scaling.md).

Two kinds of connection per node (:mod:`fastws.broker.resp`):

* **one pub/sub connection**: it SUBSCRIBEs the channels and PSUBSCRIBEs the patterns
  that local clients hold (the node counts references), pipelining every
  (un)subscribe issued in one loop pass into one write.  It reads continuously,
  whatever the node is doing, so Redis' pub/sub output buffer never grows on our
  account; a ``PING`` every second measures how far behind the reader is
  (``fastws_broker_lag_seconds``) and detects a dead link.
* **one command connection** (a FIFO of replies) for publish and history, which run as
  Lua scripts (:mod:`fastws.broker.redis_scripts`): commands run in the order the node
  issued them, so publications in flight together keep their order.  redis-py is used
  only to find the master through Sentinel (and the slot map of a cluster,
  :mod:`fastws.broker.cluster`).

**Exactly once per node.**  A node holding ``SUBSCRIBE events:x`` and ``PSUBSCRIBE
events:*`` gets one ``PUBLISH events:x`` twice from Redis; the pub/sub connection hands
it to the node once (see :mod:`fastws.broker.resp`).  The node then fans it out once
per connection, however many of the connection's subscriptions match.

**Faults.**  When the pub/sub connection drops, :attr:`up` turns False at once
(``/readyz`` 503, publications refused with :class:`BrokerUnavailable`); the broker
reconnects with jittered exponential backoff, resubscribes everything, and then tells
the handler (``handle_gap``) that publications may have been lost, so that the node
closes its subscribed connections with 4010 and their clients recover with ``since``.

**Extending it** (:class:`~fastws.broker.cluster.RedisClusterBroker`): the hooks are
``_setup_commands`` (the connections), ``_links`` / ``_command_links`` /
``_scan_links`` / ``_command_for`` (which connection serves what), ``_publish_route``
(where a publication goes), ``_publish_verb`` (``PUBLISH`` or ``SPUBLISH``),
``keeps_logs``, ``_appends_in_script``, ``_moved`` and ``_on_link_lost`` (faults),
``_after_connect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fastws.broker.base import (
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    HistoryResult,
    Publication,
    PublishResult,
    Revocation,
    StreamAppend,
)
from fastws.broker.redis_scripts import (
    LOG_PREFIX,
    META_PREFIX,
    PRESENCE_PREFIX,
    REVOKED_PREFIX,
    SCRIPTS,
    SENDER_PREFIX,
    decode_payload,
    keys_for,
    log_keys,
    presence_keys,
    presence_user,
    presence_value,
)
from fastws.broker.resp import (
    CONNECT_TIMEOUT,
    CommandConnection,
    PubSubConnection,
    RedisTarget,
    encode_command,
)

__all__ = ["RedisBroker", "encode_command", "decode_payload"]

log = logging.getLogger("fastws.broker")

IDEMPOTENCY_TTL_MS = 300_000
ONCE_PREFIX = "fws:once:"    # claim_once keys (SET NX PX), e.g. fws:once:siwe:NONCE
SCAN_COUNT = 1000            # keys a SCAN step looks at (loading revocations)
PING_INTERVAL = 1.0          # seconds between pub/sub PINGs (lag probe + liveness)
DEAD_AFTER = 10.0            # a PING unanswered this long: the link is dead, reconnect
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
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


class RedisBroker(Broker):
    """Broker on one Redis (``redis://``, ``rediss://``) or a Sentinel-watched master."""

    def __init__(self, url: str, *, max_connections: int = 64) -> None:
        self.url = url
        self.target = RedisTarget(url)
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
        """Hook, called once by ``__init__``: build the pub/sub and command connections
        (and Sentinel, to find the master); nothing connects before :meth:`start`."""
        self.redis: Any = None
        self._sentinel: Any = None
        if self.target.sentinel is not None:
            from redis.asyncio.sentinel import Sentinel

            hosts, _master = self.target.sentinel
            self._sentinel = Sentinel(hosts, password=self.target.password,
                                      username=self.target.username, **client_options())
        self._main = PubSubConnection("pubsub", self._deliver, self._on_link_lost)
        self._cmd = CommandConnection("commands", self._on_link_lost)

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

    def _links(self) -> list[PubSubConnection]:
        """Hook: every pub/sub connection (a cluster's global link and shard links)."""
        return [self._main]

    def _command_links(self) -> list[CommandConnection]:
        """Hook: every command connection (one per master, on a cluster)."""
        return [self._cmd]

    def _command_for(self, channel: str) -> CommandConnection:
        """Hook: the command connection that runs ``channel``'s (or a key's) scripts and
        commands (its slot's master, on a cluster: BrokerUnavailable while it is down)."""
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
            self._after_connect(readd=True)
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

    def _after_connect(self, readd: bool) -> None:
        """Call once (re)connected and :attr:`up`: start the ping and presence loops
        when they are not running, else (``readd``) re-add this node's presence entries
        at once (the server(s) connected may have lost them)."""
        if self._pinger is None or self._pinger.done():
            self._pinger = self._loop.create_task(self._ping_loop())
        if self._refresher is None or self._refresher.done():
            self._refresher = self._loop.create_task(self._presence_loop())
        elif readd and self._presence_local:
            self._readd = self._loop.create_task(self._presence_refresh())

    def _notify(self, hook: str, *args: Any) -> None:
        """Call the handler's optional ``hook(*args)`` (``handle_gap``,
        ``handle_shard_gap``, ``handle_connected``, ``handle_control``); a failure is
        logged, not raised."""
        fn = getattr(self._handler, hook, None)
        if fn is not None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", hook)

    def _moved(self, cmd: CommandConnection) -> None:
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
            if payload.startswith(META_PREFIX):  # + "META\n" + the rest (SPEC §13)
                self._deliver_meta(name, payload)
                return
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

    def _deliver_meta(self, name: str, payload: bytes) -> None:
        """A publication with the node's meta (``META_PREFIX META\n`` before the rest)."""
        nl = payload.index(b"\n")
        meta, rest = payload[len(META_PREFIX):nl], payload[nl + 1:]
        loff, lepoch = 0, ""
        if rest.startswith(LOG_PREFIX):
            nl = rest.index(b"\n")
            lo, le = rest[len(LOG_PREFIX):nl].split(b" ")
            loff, lepoch, rest = int(lo), le.decode(), rest[nl + 1:]
        data, offset, epoch, accepted = decode_payload(rest, time.monotonic())
        self._handler.handle_publication(name, data, offset, epoch, accepted, loff, lepoch,
                                         meta=meta)

    def _deliver_control(self, payload: bytes) -> None:
        """``NODE_ID PAYLOAD`` on the control channel: another node's control message."""
        node, _, body = payload.partition(b" ")
        if node.decode("ascii", "replace") == self.node_id:
            return  # our own: the sending node acted on it already
        self._notify("handle_control", body)

    async def send_control(self, payload: bytes) -> int:
        """Publish ``NODE_ID PAYLOAD`` on the control channel (SPUBLISH on a cluster);
        returns how many nodes received it (this one included)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        link = self._command_for(CONTROL_CHANNEL)
        return await link.call(self._publish_verb, CONTROL_CHANNEL,
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
                                                    self._publish_verb, channel,
                                                    self._presence_event("join", client,
                                                                         user_json)])

    async def presence_leave(self, channel: str, client: str, user: str | None) -> None:
        members = self._presence_local.get(channel)
        user_json = members.pop(client, None) if members is not None else None
        if members is not None and not members:
            del self._presence_local[channel]
        await self._presence_call(channel, "leave", [client, self._publish_verb, channel,
                                                     self._presence_event(
                                                         "leave", client,
                                                         user_json or orjson.dumps(user))])

    async def presence(self, channel: str) -> dict[str, str | None] | None:
        """Every node's clients in ``channel``'s presence; expired entries (a dead node's)
        are swept first, with their leave pushes (see redis_scripts)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        flat = await self._eval(channel, "presence", list(presence_keys(channel)),
                                [self._publish_verb, channel])
        return {flat[i].decode(): orjson.loads(presence_user(flat[i + 1]))
                for i in range(0, len(flat), 2)}

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
            args: list[Any] = [ttl, self._publish_verb, channel, self.node_id]
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

    # The command that publishes on a channel (the publish script, presence events,
    # control messages): SPUBLISH on a cluster, where a channel lives in its slot.
    _publish_verb = "PUBLISH"
    keeps_logs = True  # namespace logs (not on a cluster: the log's slot is not the channel's)
    # a stream namespace's append is part of the publish script (a cluster's is not)
    _appends_in_script = True

    def _publish_route(self, channel: str) -> tuple[CommandConnection, str]:
        """Hook: where a publication on ``channel`` goes: the command connection that
        runs its publish script, and the feed the script also SPUBLISHes it to ('' for
        none; a cluster's slot feed, for the pattern subscribers).  BrokerUnavailable
        when that server is down.  Called once per publication."""
        return self._cmd, ""

    def _publish_call(self, channel: str, data: bytes, history_size: int,
                      history_ttl: float, idempotency_key: str | None,
                      log: tuple[str, int] | None, append: StreamAppend | None = None,
                      pub_meta: bytes = b"", sender: bytes = b""
                      ) -> tuple[CommandConnection, list[str], list[Any]]:
        """The command connection, keys and arguments of the publish script for one
        publication (see redis_scripts.PUBLISH_LUA)."""
        link, feed = self._publish_route(channel)
        meta, stream, idem = keys_for(channel)
        keys = [meta, stream]
        if idempotency_key is not None:
            keys.append(idem + idempotency_key)
        # With replicas a publication answers once one has it (durable), so a promoted
        # replica holds every acknowledged one.  The meta's `r` says so (":d"), and a
        # promoted replica starts a new epoch only after a write that was not durable.
        replid = link.replid + (":d" if link.replicas else "")
        args = [channel, data, max(0, history_size), max(1, int(history_ttl * 1000)),
                os.urandom(4).hex(), f"{time.time():.6f}", IDEMPOTENCY_TTL_MS,
                self._publish_verb, feed, replid, link.replid2]
        if log is not None and log[1] > 0 and self.keeps_logs:
            keys.extend(log_keys(log[0]))
            args.append(log[1])  # ARGV[12]: the namespace log's size
        if append is not None and self._appends_in_script:  # ARGV[13-16], its key last
            if len(args) == 11:
                args.append(0)
            args += [append.maxlen, append.user, append.client, int(time.time() * 1000)]
            keys.append(append.key)
        if pub_meta:  # after ARGV[12] (the log size): the meta, found by its prefix
            if len(args) == 11:
                args.append(0)
            args.append(META_PREFIX + pub_meta + b"\n")
        if sender and history_size > 0:  # kept with it (field f), found by its prefix
            if len(args) == 11:
                args.append(0)
            args.append(SENDER_PREFIX + sender)
        return link, keys, args

    async def publish(self, channel: str, data: bytes, *, history_size: int,
                      history_ttl: float, idempotency_key: str | None = None,
                      log: tuple[str, int] | None = None,
                      stream: StreamAppend | None = None, meta: bytes = b"",
                      sender: bytes = b"") -> PublishResult:
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        link, keys, args = self._publish_call(channel, data, history_size, history_ttl,
                                              idempotency_key, log, stream, meta, sender)
        try:
            res = await self._run_script(link, "publish", keys, args, durable=True)
        except ResponseError as exc:
            if stream is None:
                raise
            raise BrokerUnavailable(f"stream append failed: {exc}") from None
        offset, _, epoch = res.partition(b" ")
        return PublishResult(int(offset), epoch.decode())

    async def publish_batch(self, pubs: list[Publication]
                            ) -> list[PublishResult | BrokerUnavailable]:
        """Every publish script of the batch is written before any reply is awaited:
        one pipeline per command connection (one round trip, and with replicas one
        ``WAIT`` for all), run by Redis in the batch's order."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        calls: list[tuple[CommandConnection, asyncio.Future, list[str], list[Any]]
                    | BrokerUnavailable] = []
        for p in pubs:
            try:
                link, keys, args = self._publish_call(p.channel, p.data, p.history_size,
                                                      p.history_ttl, p.idempotency_key, p.log,
                                                      p.stream, p.meta, p.sender)
                fut = self._issue(link, "publish", keys, args, durable=True)
            except BrokerUnavailable as exc:  # e.g. the channel's cluster shard is down
                calls.append(exc)
                continue
            calls.append((link, fut, keys, args))
        replies = await asyncio.gather(
            *(self._reply(c[0], c[1], "publish", c[2], c[3], durable=True)
              for c in calls if not isinstance(c, BrokerUnavailable)),
            return_exceptions=True)
        out: list[PublishResult | BrokerUnavailable] = []
        it = iter(replies)
        for p, c in zip(pubs, calls, strict=True):
            res = c if isinstance(c, BrokerUnavailable) else next(it)
            if isinstance(res, BrokerUnavailable):
                out.append(res)
            elif isinstance(res, ResponseError) and p.stream is not None:
                out.append(BrokerUnavailable(f"stream append failed: {res}"))
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
            pub = (int(eid.partition(b"-")[0]), f[b"c"].decode(), int(f[b"o"]),
                   f[b"e"].decode(), f[b"d"])
            pubs.append((*pub, f[b"f"]) if b"f" in f else pub)
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
        # an entry's fields: d DATA, then f SENDER for a client's publication (SPEC §13)
        items = [(int(eid.partition(b"-")[0]), f[1], f[3])
                 if len(f) > 3 and f[2] == b"f" else (int(eid.partition(b"-")[0]), f[1])
                 for eid, f in res[3]]
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
            if (unavailable := self._unavailable(cmd, exc)) is None:
                raise
            raise unavailable from None
        return reply is not None

    # ------------------------------------------------------------------ revocations

    async def revoke(self, rev: Revocation) -> Revocation:
        """``fws:revoked:KIND:KEY`` = ``"AT UNTIL"``, expiring at UNTIL, merged with the
        record already there, on the key's master (its slot's, on a cluster); durable
        as a publish is (a replica has it before this answers)."""
        if not self.up:
            raise BrokerUnavailable("redis is not connected")
        rkey = f"{REVOKED_PREFIX}{rev.kind}:{rev.key}"
        reply = await self._eval(rkey, "revoke", [rkey],
                                 [repr(rev.at), repr(rev.until), repr(time.time())],
                                 durable=True)
        return _revocation(rkey.encode(), reply) or rev

    def _scan_links(self) -> list[CommandConnection]:
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
        return await self._run_script(self._command_for(channel), script, keys, args,
                                      durable)

    async def _run_script(self, link: CommandConnection, script: str, keys: list[str],
                          args: list[Any], durable: bool = False) -> Any:
        """Run one of SCRIPTS on ``link`` (:meth:`_issue`, then :meth:`_reply`)."""
        fut = self._issue(link, script, keys, args, durable)
        return await self._reply(link, fut, script, keys, args, durable)

    @staticmethod
    def _issue(link: CommandConnection, script: str, keys: list[str], args: list[Any],
               durable: bool) -> asyncio.Future:
        """Queue the script's EVALSHA on ``link`` now (written at the end of this loop
        pass with every other command queued in it); the future gets the reply."""
        try:
            sha = link.shas[script]
        except KeyError:
            raise BrokerUnavailable("redis is not connected") from None
        return link.call("EVALSHA", sha, len(keys), *keys, *args, durable=durable)

    async def _reply(self, link: CommandConnection, fut: asyncio.Future, script: str,
                     keys: list[str], args: list[Any], durable: bool) -> Any:
        """The reply of an :meth:`_issue`; a flushed script runs again, and replies that
        mean the master moved or is busy become :class:`BrokerUnavailable`."""
        try:
            return await fut
        except ResponseError as exc:
            if str(exc).startswith("NOSCRIPT"):  # flushed behind our back: not run, run it now
                return await link.call("EVAL", SCRIPTS[script], len(keys), *keys, *args,
                                       durable=durable)
            if (unavailable := self._unavailable(link, exc)) is None:
                raise
            raise unavailable from None

    def _unavailable(self, link: CommandConnection, exc: ResponseError
                     ) -> BrokerUnavailable | None:
        """What an error reply of ``link`` means: a master that moved (MOVED, ASK,
        READONLY: cluster slots moved, or this master became a replica in a failover;
        the master(s) are found again, subscriptions resubscribed, the clients told
        with 4010) or is busy is a BrokerUnavailable (503); None for any other error."""
        msg = str(exc)
        if msg.startswith(("MOVED", "ASK", "READONLY")):
            self._moved(link)
            return BrokerUnavailable(f"redis: {msg}")
        if msg.startswith(_UNAVAILABLE_REPLIES):
            return BrokerUnavailable(f"redis: {msg}")
        return None

    # ------------------------------------------------------------------ for tests

    def wanted(self) -> frozenset[str]:
        """The channels and patterns this node holds in Redis for its clients."""
        return frozenset(self._wanted - {CONTROL_CHANNEL})


def client_options() -> dict[str, Any]:
    """Options of the redis-py clients (Sentinel, a cluster's slot map): short timeouts,
    and never a retry, so that a publication whose outcome is unknown is reported
    (503), not sent twice."""
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0}



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
