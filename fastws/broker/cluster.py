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

Any link lost, or a slot moved (Redis unsubscribes the link): the broker is down until
every link is back, with the slot map read again; then subscribed clients are closed
with 4010 and recover with ``since``, as with one Redis.
"""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from fastws._match import is_pattern
from fastws.broker.base import BrokerUnavailable
from fastws.broker.redis import (
    CONNECT_TIMEOUT,
    SCRIPTS,
    RedisBroker,
    _command_options,
    _Commands,
    _PubSub,
)

__all__ = ["RedisClusterBroker", "FEED_PREFIX", "slot_tags"]

FEED_PREFIX = "fws:feed:"
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
    return f"{FEED_PREFIX}{{{slot_tags()[slot]}}}"


class RedisClusterBroker(RedisBroker):
    """Broker on a Redis Cluster: sharded channels, feeds for patterns, one global link."""

    def _setup_commands(self, url: str, max_connections: int) -> None:
        nodes = [ClusterNode(host, port) for host, port in self.target.hosts]
        self._sentinel = None
        self.redis = RedisCluster(startup_nodes=nodes, username=self.target.username,
                                  password=self.target.password,
                                  max_connections=max_connections, **_command_options())
        self._global = _PubSub("global", self._deliver, self._on_link_lost)
        self._main = self._global
        self._shards: dict[str, _PubSub] = {}
        self._cmds: dict[str, _Commands] = {}
        self._slot_owner: dict[int, str] = {}

    def _links(self) -> list[_PubSub]:
        return [self._global, *self._shards.values()]

    def _command_links(self) -> list[_Commands]:
        return list(self._cmds.values())

    def _command_for(self, channel: str) -> _Commands:
        owner = self._slot_owner.get(key_slot(channel.encode()))
        cmd = self._cmds.get(owner) if owner is not None else None
        if cmd is None:
            raise BrokerUnavailable("redis cluster: the channel's slot has no master")
        return cmd

    async def start(self, handler: Any) -> None:
        await asyncio.to_thread(slot_tags)
        await super().start(handler)

    # ------------------------------------------------------------------ links

    async def _connect(self) -> None:
        await asyncio.wait_for(self.redis.nodes_manager.initialize(), CONNECT_TIMEOUT * 2)
        masters = self.redis.get_primaries()
        if not masters:
            raise BrokerUnavailable("redis cluster: no master")
        self._slot_owner = {}
        for slot, nodes in self.redis.nodes_manager.slots_cache.items():
            if nodes:
                self._slot_owner[slot] = nodes[0].name
        self._shards = {}
        self._cmds = {n.name: _Commands(f"commands-{n.name}", self._on_link_lost)
                      for n in masters}
        for node in masters:
            link = _PubSub(f"shard-{node.name}", self._deliver, self._on_link_lost,
                           exact="SSUBSCRIBE", pattern=None)
            link._deliver = functools.partial(self._deliver_shard, link)
            self._shards[node.name] = link
        self._global.wanted = set(self._wanted)
        for name in self._wanted:
            if not is_pattern(name):
                self._shard_for(name).wanted.add(name)
        if any(is_pattern(n) for n in self._wanted):
            for slot in range(SLOTS):
                self._shard_of_slot(slot).wanted.add(feed_of(slot))
        entry = random.choice(masters)
        coros = [self._global.connect(entry.host, entry.port, self.target)]
        for node in masters:
            coros.append(self._shards[node.name].connect(node.host, node.port, self.target))
            coros.append(self._cmds[node.name].connect(node.host, node.port, self.target,
                                                       SCRIPTS))
        await asyncio.gather(*coros)

    def _shard_of_slot(self, slot: int) -> _PubSub:
        owner = self._slot_owner.get(slot)
        link = self._shards.get(owner) if owner is not None else None
        if link is None:
            raise BrokerUnavailable(f"redis cluster: slot {slot} has no master")
        return link

    def _shard_for(self, channel: str) -> _PubSub:
        return self._shard_of_slot(key_slot(channel.encode()))

    def _deliver_shard(self, link: _PubSub, channel: bytes, payload: bytes) -> None:
        if channel.startswith(b"fws:feed:"):
            nl = payload.find(b"\n")
            real = payload[:nl]
            if link.holds(real.decode("utf-8", "replace")):
                return  # the channel's own copy came just before on this link
            self._deliver(real, payload[nl + 1:])
            return
        self._deliver(channel, payload)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, name: str) -> None:
        if not self.up:
            raise BrokerUnavailable("redis cluster is not connected")
        first_pattern = is_pattern(name) and not any(is_pattern(n) for n in self._wanted)
        self._wanted.add(name)
        try:
            futs = [self._global.subscribe(name)]
            if not is_pattern(name):
                futs.append(self._shard_for(name).subscribe(name))
            elif first_pattern:
                futs.extend(self._shard_of_slot(s).subscribe(feed_of(s)) for s in range(SLOTS))
        except BrokerUnavailable:
            self._on_link_lost()  # the slot map changed: start again
            raise
        await asyncio.shield(asyncio.gather(*futs))

    async def unsubscribe(self, name: str) -> None:
        self._wanted.discard(name)
        self._global.unsubscribe(name)
        if not self.up:
            return
        try:
            if not is_pattern(name):
                self._shard_for(name).unsubscribe(name)
            elif not any(is_pattern(n) for n in self._wanted):
                for s in range(SLOTS):
                    self._shard_of_slot(s).unsubscribe(feed_of(s))
        except BrokerUnavailable:
            self._on_link_lost()

    keeps_logs = False  # a namespace log's slot is not its channels': no atomic append

    @property
    def _presence_command(self) -> str:
        return "SPUBLISH"  # join/leave go only to the channel's shard

    # ------------------------------------------------------------------ commands

    def _publish_args(self, channel: str, data: bytes, history_size: int,
                      history_ttl: float) -> list[Any]:
        args = super()._publish_args(channel, data, history_size, history_ttl)
        args[7] = "SPUBLISH"
        args[8] = feed_of(key_slot(channel.encode()))
        return args
