"""The Redis Cluster broker (``redis+cluster://host:port[,host:port…]``): sharded pub/sub.

Connections of one node:

* one **command connection per master** (pipelined, in order): the publish and history
  scripts run on the master of the channel's slot (all of a channel's keys share its
  hash tag); redis-py's ``RedisCluster`` only reads the slot map;
* one **shard link per master**, ``SSUBSCRIBE``-ing the channels local clients hold
  whose slot that master owns: a publication made through fastws is an ``SPUBLISH``
  to the channel itself, so it travels only inside its shard;
* one **global link** to any master, ``SUBSCRIBE``/``PSUBSCRIBE``-ing the channels and
  patterns local clients hold: a producer's raw ``PUBLISH`` is broadcast by the cluster
  to every node, so one link sees all of them.

**Patterns and sharded publications.**  ``PSUBSCRIBE`` does not see ``SPUBLISH``.  So
the publish script also ``SPUBLISH``-es ``CHANNEL\\nENVELOPE`` to the *feed* of the
channel's slot, ``fws:feed:{T}`` where ``T`` is a tag hashing to that slot (one per
slot, computed once).  A node holding at least one pattern ``SSUBSCRIBE``-s the 16384
feeds (each on its slot's master) and matches them locally; a node without patterns
receives no feed traffic.  Both copies of a publication come from one script on one
shard, back to back on the same shard link, so the link skips the feed copy exactly
when it holds the channel itself (it then got the channel's copy just before).  Raw
``SPUBLISH`` by a producer reaches channel subscribers only (not patterns).

**Faults, per shard.**  A shard (one master and this node's two connections to it) is
up or down on its own.  A shard link or command connection lost, a ``MOVED``/``ASK``/
``READONLY`` answer, or Redis unsubscribing a shard link (its slots moved: a failover)
takes that shard down: publications, history and subscriptions of the channels whose
slot it owned answer 503 (:class:`BrokerUnavailable`), every other channel keeps
working.  The broker reads the slot map again at once and then with backoff, connects
the master(s) now owning those slots, resubscribes there, and only then tells the
handler which channels may have lost publications (``handle_shard_gap``: those of the
lost shard's slots; the node closes their subscribers, and every pattern subscriber,
whose feeds cover every slot, with 4010).  The broker is :attr:`up` while the global
link and at least one shard are; losing the global link (raw ``PUBLISH`` of every
channel may have been missed) is a gap of every subscription (``handle_gap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from fastws._match import is_pattern
from fastws.broker.base import BrokerUnavailable, Publication, PublishResult, StreamAppend
from fastws.broker.redis import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    CONNECT_ERRORS,
    IDEMPOTENCY_TTL_MS,
    RedisBroker,
    client_options,
)
from fastws.broker.redis_scripts import SCRIPTS
from fastws.broker.resp import (
    CONNECT_TIMEOUT,
    CommandConnection,
    PubSubConnection,
    RedisTarget,
)

__all__ = ["RedisClusterBroker", "FEED_PREFIX", "slot_tags", "stream_idempotency_key"]

log = logging.getLogger("fastws.broker")

FEED_PREFIX = "fws:feed:"
_FEED = FEED_PREFIX.encode()
SLOTS = 16384
_TAGS: list[str] | None = None


def slot_tags() -> list[str]:
    """For each of the 16384 slots, a short tag that hashes to it (computed once)."""
    global _TAGS
    if _TAGS is None:
        tags: list[str | None] = [None] * SLOTS
        missing, i = SLOTS, 0
        while missing:
            tag = format(i, "x")
            slot = key_slot(tag.encode())
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
            i += 1
        _TAGS = tags  # type: ignore[assignment]
    return _TAGS  # type: ignore[return-value]


def feed_of(slot: int) -> str:
    """The sharded channel that carries every publication of ``slot`` for patterns."""
    return f"{FEED_PREFIX}{{{slot_tags()[slot]}}}"


def stream_idempotency_key(stream: str, channel: str, key: str) -> str:
    """Where the append of ``channel``'s publication with idempotency ``key`` to
    ``stream`` is remembered: a key in the stream's slot (a channel name has no space,
    so ``CHANNEL KEY`` names one pair)."""
    return f"fws:si:{{{slot_tags()[key_slot(stream.encode())]}}}:{channel} {key}"


class _Shard:
    """One master of the cluster: this node's shard link and command connection to it.

    ``up`` once both are connected (and subscribed), until either is lost."""

    def __init__(self, broker: RedisClusterBroker, name: str, host: str, port: int) -> None:
        self.name, self.host, self.port = name, host, port
        lost = functools.partial(broker._on_shard_lost, self)
        self._deliver_to = broker._deliver
        self.link = PubSubConnection(f"shard-{name}", self._deliver, lost,
                                     exact="SSUBSCRIBE", pattern=None)
        self.cmd = CommandConnection(f"commands-{name}", lost)
        self.up = False

    def _deliver(self, channel: bytes, payload: bytes) -> None:
        """What the shard link reads, to the broker: a slot feed's copy
        (``CHANNEL\\nENVELOPE``) as the channel's publication, unless the link holds the
        channel itself (then the channel's own copy came just before on this link)."""
        if channel.startswith(_FEED):
            nl = payload.find(b"\n")
            real = payload[:nl]
            if self.link.holds(real.decode("utf-8", "replace")):
                return
            self._deliver_to(real, payload[nl + 1:])
            return
        self._deliver_to(channel, payload)

    async def connect(self, target: RedisTarget) -> None:
        """Open both connections; the link subscribes what it wants (its ``wanted``)."""
        await asyncio.gather(self.link.connect(self.host, self.port, target),
                             self.cmd.connect(self.host, self.port, target, SCRIPTS))

    def drop(self) -> None:
        """Close both connections (their waiters fail with BrokerUnavailable)."""
        self.up = False
        self.link.drop()
        self.cmd.drop()


class RedisClusterBroker(RedisBroker):
    """Broker on a Redis Cluster: sharded channels, feeds for patterns, one global link;
    each shard fails and recovers on its own."""

    def _setup_commands(self, url: str, max_connections: int) -> None:
        nodes = [ClusterNode(host, port) for host, port in self.target.hosts]
        self._sentinel = None
        self.redis = RedisCluster(startup_nodes=nodes, username=self.target.username,
                                  password=self.target.password,
                                  max_connections=max_connections, **client_options())
        self._global = PubSubConnection("global", self._deliver, self._on_global_lost)
        self._main = self._global
        self._global_up = False
        self._shards: dict[str, _Shard] = {}
        self._slot_owner: dict[int, str] = {}
        self._gap_slots: set[int] = set()   # lost delivery; a gap once their owner is up
        self._gap_all = False               # the global link was lost: every subscription
        self._wake: asyncio.Event | None = None

    def _links(self) -> list[PubSubConnection]:
        return [self._global, *(s.link for s in self._shards.values())]

    def _command_links(self) -> list[CommandConnection]:
        return [s.cmd for s in self._shards.values()]

    def _scan_links(self) -> list[CommandConnection]:
        """Every master that is up (its keys are its slots'; one that is down is read
        when it is back: ``handle_connected`` then)."""
        return [s.cmd for s in self._shards.values() if s.up]

    @property
    def shards(self) -> int:
        """Masters in the slot map."""
        return len(self._shards)

    @property
    def shards_up(self) -> int:
        """Masters this node is connected to (publications to their slots work)."""
        return sum(1 for s in self._shards.values() if s.up)

    def _owner_of(self, slot: int) -> _Shard:
        """The shard owning ``slot``, when it is up (else BrokerUnavailable: 503)."""
        owner = self._slot_owner.get(slot)
        shard = self._shards.get(owner) if owner is not None else None
        if shard is None or not shard.up:
            raise BrokerUnavailable(f"redis cluster: the master of slot {slot} "
                                    f"({owner or 'none'}) is not available")
        return shard

    def _command_for(self, channel: str) -> CommandConnection:
        return self._owner_of(key_slot(channel.encode())).cmd

    async def start(self, handler: Any) -> None:
        await asyncio.to_thread(slot_tags)
        await super().start(handler)

    # ------------------------------------------------------------------ shards

    async def _run(self, first: asyncio.Future) -> None:
        """Keep every shard and the global link connected: read the slot map and
        connect what is down, at once when something is lost, else with backoff while
        anything is missing."""
        self._wake = asyncio.Event()
        attempt = 0
        while not self._closed:
            self._wake.clear()
            try:
                fresh = await self._sync()
            except Exception as exc:  # noqa: BLE001 - whatever it was, try again later
                fresh = False
                if not isinstance(exc, CONNECT_ERRORS):
                    log.exception("redis cluster: unexpected error while connecting; "
                                  "retrying")
                elif attempt == 0:
                    log.warning("redis cluster: cannot read the slot map from %s: %s; "
                                "retrying", self.url, exc or type(exc).__name__)
            was_up = self.up
            self._set_up()
            if self.up and (fresh or not was_up):
                self._notify("handle_connected")  # a master's keys (revocations) may be new to us
            if self.up:
                self._after_connect(readd=fresh)  # re-add our presence on the new masters
                self._settle_gaps()
            if not first.done():
                first.set_result(None)
            if self._healthy():
                attempt = 0
                await self._wake.wait()
                continue
            attempt += 1
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(attempt, 10))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay * random.uniform(0.5, 1.0))

    def _healthy(self) -> bool:
        return (self._global_up and bool(self._shards) and not self._gap_slots
                and not self._gap_all and len(self._slot_owner) == SLOTS
                and all(s.up for s in self._shards.values()))

    def _set_up(self) -> None:
        self.up = self._global_up and any(s.up for s in self._shards.values())

    async def _sync(self) -> bool:
        """Read the slot map; keep the shards that are up and still masters, connect
        the other masters (each on its own: one that fails stays down), move
        subscriptions to their slots' owners, connect the global link if it is down.
        Returns whether a shard was (re)connected."""
        await asyncio.wait_for(self.redis.nodes_manager.initialize(), CONNECT_TIMEOUT * 2)
        masters = {n.name: n for n in self.redis.get_primaries()}
        if not masters:
            raise BrokerUnavailable("redis cluster: no master")
        owners = {slot: nodes[0].name
                  for slot, nodes in self.redis.nodes_manager.slots_cache.items() if nodes}
        for slot, owner in owners.items():
            old = self._slot_owner.get(slot)
            if old is not None and old != owner:  # moved: its old shard's deliveries end
                self._gap_slots.add(slot)
        for name, shard in list(self._shards.items()):
            if not shard.up or name not in masters:
                shard.drop()
                del self._shards[name]
        self._slot_owner = owners
        fresh = [_Shard(self, name, node.host, node.port) for name, node in masters.items()
                 if name not in self._shards]
        for shard in fresh:
            self._shards[shard.name] = shard
        wanted = self._wanted_by_shard()
        for shard in fresh:  # subscribed as they connect
            shard.link.wanted = wanted.get(shard.name, set())
        await asyncio.gather(*(self._connect_shard(s) for s in fresh))
        await self._reconcile()  # slots moved between live shards; subscribes meanwhile
        if not self._global_up:
            live = [s for s in self._shards.values() if s.up]
            if live:
                entry = random.choice(live)
                self._global.wanted = set(self._wanted)
                try:
                    await self._global.connect(entry.host, entry.port, self.target)
                except BaseException:
                    self._global.drop()
                    raise
                self._global_up = self._global.connected
        return any(s.up for s in fresh)

    async def _reconcile(self) -> None:
        """Make every live shard link hold what the slot map says it should (the
        channels and feeds of its slots); return once Redis confirmed the additions."""
        wanted = self._wanted_by_shard()
        confirms: list[asyncio.Future] = []
        for shard in self._shards.values():
            if not shard.up:
                continue
            want = wanted.get(shard.name, set())
            for name in shard.link.wanted - want:
                shard.link.unsubscribe(name)
            confirms.extend(shard.link.subscribe(name) for name in want - shard.link.wanted)
        if confirms:
            await asyncio.wait_for(asyncio.gather(*confirms), CONNECT_TIMEOUT * 2)

    def _wanted_by_shard(self) -> dict[str, set[str]]:
        """What each master's shard link should hold: the channels of its slots, and
        the feeds of its slots when the node holds a pattern."""
        out: dict[str, set[str]] = {}
        patterns = False
        for name in self._wanted:
            if is_pattern(name):
                patterns = True
                continue
            owner = self._slot_owner.get(key_slot(name.encode()))
            if owner is not None:
                out.setdefault(owner, set()).add(name)
        if patterns:
            for slot, owner in self._slot_owner.items():
                out.setdefault(owner, set()).add(feed_of(slot))
        return out

    async def _connect_shard(self, shard: _Shard) -> None:
        try:
            await shard.connect(self.target)
        except Exception as exc:  # noqa: BLE001 - it stays down; retried with backoff
            shard.drop()
            if not isinstance(exc, CONNECT_ERRORS):
                log.exception("redis cluster: unexpected error connecting to %s", shard.name)
            else:
                log.debug("redis cluster: cannot connect to the master %s: %s", shard.name,
                          exc or type(exc).__name__)
            return
        if self._shards.get(shard.name) is shard and shard.link.connected \
                and shard.cmd.connected:
            shard.up = True
        else:  # lost meanwhile
            shard.drop()

    def _on_shard_lost(self, shard: _Shard) -> None:
        """One of ``shard``'s connections is lost: the shard is down (its slots' channels
        answer 503); what it delivered may have a gap, told once its slots are back."""
        if self._shards.get(shard.name) is not shard:
            return  # retired already
        if shard.up:
            log.warning("redis cluster: lost the master %s; its slots are unavailable "
                        "until it or a replica of it is reachable", shard.name)
            self._gap_slots.update(slot for slot, owner in self._slot_owner.items()
                                   if owner == shard.name)
        shard.drop()
        self._set_up()
        if self._wake is not None:
            self._wake.set()

    def _on_global_lost(self) -> None:
        """The global link is lost: raw publications of any channel may be missed."""
        if self._global_up:
            log.warning("redis cluster: the global pub/sub link was lost; reconnecting")
            self._gap_all = True
        self._global_up = False
        self._global.drop()
        self._set_up()
        if self._wake is not None:
            self._wake.set()

    def _on_link_lost(self) -> None:
        """Everything is lost (what the single-Redis code calls): each shard and the
        global link, each with its own gap."""
        for shard in list(self._shards.values()):
            self._on_shard_lost(shard)
        self._on_global_lost()

    def _moved(self, cmd: CommandConnection) -> None:
        """A master answered MOVED/ASK/READONLY: its slots moved (a failover), so that
        shard is down until the slot map is read again."""
        for shard in list(self._shards.values()):
            if shard.cmd is cmd:
                self._on_shard_lost(shard)

    def _slot_up(self, slot: int) -> bool:
        owner = self._slot_owner.get(slot)
        shard = self._shards.get(owner) if owner is not None else None
        return shard is not None and shard.up

    def _settle_gaps(self) -> None:
        """Tell the handler about the gaps whose channels are delivered again: after a
        global link loss every subscription, else the channels of the slots whose
        (new) master is up (and every pattern)."""
        if not self._global_up:
            return
        if self._gap_all:
            self._gap_all = False
            self._gap_slots = {s for s in self._gap_slots if not self._slot_up(s)}
            self._tell_gap(None)
            return
        ready = {s for s in self._gap_slots if self._slot_up(s)}
        if ready:
            self._gap_slots -= ready
            self._tell_gap(ready)

    def _tell_gap(self, slots: set[int] | None) -> None:
        """Tell the handler that the channels of ``slots`` (None: every channel and
        pattern) may have lost publications (``handle_shard_gap``, else ``handle_gap``)."""
        self.reconnects += 1
        log.warning("redis cluster: %s resubscribed; closing their subscribers with 4010",
                    "every channel and pattern" if slots is None
                    else f"the channels of {len(slots)} slots")
        if slots is not None and hasattr(self._handler, "handle_shard_gap"):
            def lost(channel: str) -> bool:
                return key_slot(channel.encode()) in slots
            self._notify("handle_shard_gap", lost)
        else:
            self._notify("handle_gap")

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, name: str) -> None:
        """Return once Redis confirmed it on the global link and on the channel's shard
        (503 while that shard is down).  The first pattern subscribes the feeds of every
        slot whose shard is up (the others' once they are back)."""
        if not self.up:
            raise BrokerUnavailable("redis cluster is not connected")
        futs: list[asyncio.Future] = []
        if not is_pattern(name):
            shard = self._owner_of(key_slot(name.encode()))
            futs.append(shard.link.subscribe(name))
        elif not any(is_pattern(n) for n in self._wanted):
            for slot, owner in self._slot_owner.items():
                shard = self._shards.get(owner)
                if shard is not None and shard.up:
                    futs.append(shard.link.subscribe(feed_of(slot)))
        self._wanted.add(name)
        futs.append(self._global.subscribe(name))
        await asyncio.shield(asyncio.gather(*futs))

    async def unsubscribe(self, name: str) -> None:
        self._wanted.discard(name)
        self._global.unsubscribe(name)
        if not is_pattern(name):
            owner = self._slot_owner.get(key_slot(name.encode()))
            shard = self._shards.get(owner) if owner is not None else None
            if shard is not None:
                shard.link.unsubscribe(name)
        elif not any(is_pattern(n) for n in self._wanted):
            for slot, owner in self._slot_owner.items():
                shard = self._shards.get(owner)
                if shard is not None:
                    shard.link.unsubscribe(feed_of(slot))

    # ------------------------------------------------------------------ commands

    keeps_logs = False  # a namespace log's slot is not its channels': no atomic append
    _appends_in_script = False  # nor a stream's: appended first (_append)
    _publish_verb = "SPUBLISH"  # publications, presence, control: only to the channel's shard

    def _publish_route(self, channel: str) -> tuple[CommandConnection, str]:
        """The master of the channel's slot (BrokerUnavailable while it is down), and
        the slot's feed, for the pattern subscribers."""
        slot = key_slot(channel.encode())
        return self._owner_of(slot).cmd, feed_of(slot)

    # ------------------------------------------------------------------ stream namespaces

    async def publish(self, channel: str, data: bytes, *, history_size: int,
                      history_ttl: float, idempotency_key: str | None = None,
                      log: tuple[str, int] | None = None,
                      stream: StreamAppend | None = None, meta: bytes = b"",
                      sender: bytes = b"") -> PublishResult:
        """As :meth:`RedisBroker.publish`; with ``stream``, in two steps: the append on
        the stream's master, then the publish script on the channel's (see the module's
        notes).  BrokerUnavailable when either fails."""
        if stream is not None:
            if not self.up:
                raise BrokerUnavailable("redis cluster is not connected")
            pub = Publication(channel, data, history_size, history_ttl, idempotency_key,
                              log, stream, meta, sender)
            (failed,) = await self._append([pub])
            if failed is not None:
                raise failed
        return await super().publish(channel, data, history_size=history_size,
                                     history_ttl=history_ttl,
                                     idempotency_key=idempotency_key, log=log,
                                     stream=stream, meta=meta, sender=sender)

    async def publish_batch(self, pubs: list[Publication]
                            ) -> list[PublishResult | BrokerUnavailable]:
        """As :meth:`RedisBroker.publish_batch`; the appends of the stream namespaces'
        publications first (pipelined per master, in the batch's order), then the
        publish scripts of those appended and of the others.  An item whose append
        failed is a BrokerUnavailable, and is not published."""
        if all(p.stream is None for p in pubs):
            return await super().publish_batch(pubs)
        if not self.up:
            raise BrokerUnavailable("redis cluster is not connected")
        failed = await self._append(pubs)
        rest = [p for p, f in zip(pubs, failed, strict=True) if f is None]
        done = iter(await super().publish_batch(rest) if rest else [])
        return [f if f is not None else next(done) for f in failed]

    async def _append(self, pubs: list[Publication]) -> list[BrokerUnavailable | None]:
        """Step one of stream namespaces' publications: ``STREAM_APPEND_LUA`` on each
        stream's master, all written before any reply is awaited.  Per publication None
        (appended now or by an earlier try with its idempotency key, or no ``stream``)
        or the BrokerUnavailable it failed with.  Nothing is appended for a publication
        whose channel's master is down (its publish could not follow)."""
        calls: list[tuple[CommandConnection, asyncio.Future, list[str], list[Any]]
                    | BrokerUnavailable | None] = []
        for p in pubs:
            if p.stream is None:
                calls.append(None)
                continue
            try:
                self._publish_route(p.channel)  # its publish could run now
                link = self._owner_of(key_slot(p.stream.key.encode())).cmd
                keys = [p.stream.key]
                if p.idempotency_key is not None:
                    keys.append(stream_idempotency_key(p.stream.key, p.channel,
                                                       p.idempotency_key))
                args: list[Any] = [p.stream.maxlen, p.channel, p.data, p.stream.user,
                                   p.stream.client, int(time.time() * 1000),
                                   IDEMPOTENCY_TTL_MS]
                calls.append((link, self._issue(link, "sappend", keys, args, durable=True),
                              keys, args))
            except BrokerUnavailable as exc:
                calls.append(exc)
        pending = [c for c in calls if isinstance(c, tuple)]
        replies = iter(await asyncio.gather(
            *(self._reply(c[0], c[1], "sappend", c[2], c[3], durable=True)
              for c in pending), return_exceptions=True))
        out: list[BrokerUnavailable | None] = []
        for c in calls:
            res = next(replies) if isinstance(c, tuple) else c
            if res is None or isinstance(res, BrokerUnavailable):
                out.append(res)
            elif isinstance(res, ResponseError):  # e.g. the key holds another type
                out.append(BrokerUnavailable(f"stream append failed: {res}"))
            elif isinstance(res, BaseException):
                raise res
            else:
                out.append(None)
        return out
