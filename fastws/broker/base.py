"""The broker contract: outbound calls (`Broker`) and inbound events (`BrokerHandler`).

A node calls the broker to publish, to (un)subscribe the channels and patterns its
clients hold, and to read history; the broker calls the handler back with every
publication that reaches this node, in per-channel order.  Data travels as encoded
JSON bytes so that the frame can be built around it without decoding it again.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fastws import channels
from fastws.errors import BrokerUnavailable

if TYPE_CHECKING:
    from fastws.config import NamespaceConfig

__all__ = ["Broker", "BrokerHandler", "BrokerUnavailable", "PublishResult", "HistoryResult",
           "Publication", "Revocation", "StreamAppend", "NS_LOG_SIZE", "STREAM_PREFIX",
           "EPHEMERAL_META", "stream_key", "publication_for", "publish_args"]

NS_LOG_SIZE = 10_000            # publications a namespace's log keeps (pattern recovery)
STREAM_PREFIX = "fastws:stream:"  # + namespace ("*" for channels without one): SPEC §12
EPHEMERAL_META = b'{"e":1}'     # the meta of an ephemeral publication without a sender


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """Where a publication of a ``stream = true`` namespace is also appended (SPEC §12):
    ``XADD key MAXLEN ~ maxlen *`` with the publisher's ``user`` and ``client`` ("" for
    publications without a connection), before the publication is acknowledged."""

    key: str
    maxlen: int
    user: str = ""
    client: str = ""



@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a publication landed in its channel's stream (offset 0, epoch "" = no history)."""

    offset: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication of a batch (:meth:`Broker.publish_batch`): the arguments of
    :meth:`Broker.publish`."""

    channel: str
    data: bytes
    history_size: int
    history_ttl: float
    idempotency_key: str | None = None
    log: tuple[str, int] | None = None
    stream: StreamAppend | None = None
    meta: bytes = b""  # opaque to the broker, handed back with the publication (SPEC §13)
    sender: bytes = b""  # kept with it in history and the log (see Broker.publish)


def stream_key(channel: str) -> str:
    """The Redis stream a ``stream = true`` namespace appends ``channel``'s
    publications to: ``fastws:stream:<namespace>`` (``*`` for channels without one)."""
    return STREAM_PREFIX + (channels.namespace_of(channel) or "*")


def publication_for(ns: NamespaceConfig, channel: str, data: bytes,
                    idempotency_key: str | None = None, *, user: str = "",
                    client: str = "", ephemeral: bool = False, meta: bytes = b"",
                    sender: bytes = b"") -> Publication:
    """The broker :class:`Publication` of encoded JSON ``data`` on ``channel`` under its
    namespace's rules ``ns``: the one place every producer (the node, the indexer's
    broker publisher) gets them from.

    - history: ``ns.history_size`` and ``ns.history_ttl``;
    - the namespace log (pattern recovery, docs/history.md): ``(namespace,
      NS_LOG_SIZE)`` when the namespace keeps history and is not private;
    - ``ns.stream``: a :class:`StreamAppend` to :func:`stream_key` with ``user`` and
      ``client`` (the publisher; "" for publications without a connection, SPEC §12);
    - ``ephemeral`` (SPEC §13): none of these, live subscribers only, with ``meta``
      (or :data:`EPHEMERAL_META`) so that nodes frame it as ephemeral.

    ``meta`` is handed to every node with the publication, ``sender`` (its ``from``)
    kept with it in history and the log."""
    if ephemeral:  # live subscribers only: no history, no log, no stream, no offset
        return Publication(channel, data, 0, ns.history_ttl, idempotency_key, None, None,
                           meta or EPHEMERAL_META)
    log = None
    if ns.history_size > 0 and not ns.private:
        space = channels.namespace_of(channel)
        if space:
            log = (space, NS_LOG_SIZE)
    stream = (StreamAppend(stream_key(channel), ns.stream_maxlen, user, client)
              if ns.stream else None)
    return Publication(channel, data, ns.history_size, ns.history_ttl, idempotency_key, log,
                       stream, meta, sender)


def publish_args(pub: Publication) -> dict[str, Any]:
    """The keyword arguments of :meth:`Broker.publish` for ``pub``: ``stream``, ``meta``
    and ``sender`` only when set (a broker may not take them)."""
    args: dict[str, Any] = {"history_size": pub.history_size, "history_ttl": pub.history_ttl,
                            "idempotency_key": pub.idempotency_key, "log": pub.log}
    if pub.stream is not None:
        args["stream"] = pub.stream
    if pub.meta:
        args["meta"] = pub.meta
    if pub.sender:
        args["sender"] = pub.sender
    return args


@dataclass(frozen=True, slots=True)
class Revocation:
    """A token revocation (``POST /api/revoke``), kept until ``until``.

    ``kind`` "user": every token of the user ``key`` whose ``iat`` is at most ``at``
    (or that has no ``iat``) is refused; ``kind`` "jti": the token whose ``jti`` claim
    is ``key``.  ``at`` and ``until`` are unix times (seconds).  Two revocations of the
    same record merge into the later ``at`` and the later ``until`` (:meth:`merge`).
    """

    kind: str
    key: str
    at: float
    until: float

    def merge(self, other: Revocation | None) -> Revocation:
        """This record combined with an earlier one of the same kind and key."""
        if other is None:
            return self
        return Revocation(self.kind, self.key, max(self.at, other.at),
                          max(self.until, other.until))


@dataclass(slots=True)
class HistoryResult:
    """A page of a channel's history, oldest first, and the stream's current top.

    Each publication is ``(offset, data)``, or ``(offset, data, sender)`` for one
    published with a ``sender`` (see :meth:`Broker.publish`); unpack it as
    ``offset, data, *sender``."""

    publications: list[tuple[Any, ...]] = field(default_factory=list)
    offset: int = 0
    epoch: str = ""
    recovered: bool = True


class BrokerHandler(Protocol):
    """Receives what the broker delivers to this node."""

    def handle_publication(self, channel: str, data: bytes, offset: int, epoch: str,
                           accepted: float, log_offset: int = 0, log_epoch: str = "") -> None:
        """One publication for local subscribers; ``accepted`` is a time.monotonic() stamp.

        ``log_offset``/``log_epoch``: its position in its namespace's log, passed (as
        two more positional arguments) only when it has one (see ``Broker.publish``).
        A publication made with ``meta`` comes with ``meta=META`` too (see there).
        """

    def handle_gap(self) -> None:
        """Delivery was interrupted and is back (a broker reconnect): publications may
        have been lost meanwhile for every channel and pattern, so the node tells its
        subscribed clients to recover (close 4010).  Brokers that cannot lose
        deliveries never call it.

        A handler may also have ``handle_shard_gap(lost: Callable[[str], bool])``, for a
        gap of part of the channels only: a Redis Cluster shard was lost and is back
        (maybe on a promoted replica), so publications may have been lost for every
        channel ``lost(channel)`` is true for, and for every pattern (a pattern's feeds
        span every shard).  The cluster broker calls it when the handler has it, else
        this method (every subscription)."""

    def handle_presence(self, channel: str, typ: str, client: str, user: str | None) -> None:
        """A client of *another* node joined or left ``channel`` (``typ`` "join"/"leave");
        push it to this node's subscribers of the channel."""

    def handle_control(self, payload: bytes) -> None:
        """A control message another node sent with :meth:`Broker.send_control` (e.g.
        disconnect a user's connections).  Optional: brokers call it when it exists."""

    def handle_connected(self) -> None:
        """The broker (re)connected: state kept in it (token revocations) may have
        changed meanwhile without this node hearing of it; read it again
        (:meth:`Broker.revocations`).  Optional: brokers that can lose control messages
        call it, when it exists, on every connect, before ``start`` returns the first
        time."""


class Broker(ABC):
    """Carries publications between nodes; keeps per-channel offsets, epochs and history."""

    up: bool = False

    @property
    def shards(self) -> int:
        """How many independent parts (Redis Cluster masters) the broker spans."""
        return 1

    @property
    def shards_up(self) -> int:
        """How many of :attr:`shards` are connected now (a cluster may lose one)."""
        return 1 if self.up else 0

    @abstractmethod
    async def start(self, handler: BrokerHandler) -> None:
        """Connect and start delivering to ``handler``."""

    @abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections."""

    @abstractmethod
    async def publish(self, channel: str, data: bytes, *, history_size: int,
                      history_ttl: float, idempotency_key: str | None = None,
                      log: tuple[str, int] | None = None,
                      stream: StreamAppend | None = None, meta: bytes = b"",
                      sender: bytes = b"") -> PublishResult:
        """Publish encoded JSON ``data``; append to history when ``history_size`` > 0.

        The same ``idempotency_key`` on a channel within 5 minutes returns the first
        result and publishes nothing more.  ``log`` = (namespace, size): also append
        it to that namespace's log (kept ``size`` long, for pattern recovery) and hand
        its log position to every node's handler (``log_offset``, ``log_epoch``), when
        the broker keeps logs (:attr:`keeps_logs`); it is ignored otherwise.
        ``stream``: also append it to that Redis stream first, exactly once per
        idempotency key; when the append fails nothing is published or kept and
        BrokerUnavailable is raised (brokers without streams ignore it: the config
        refuses ``stream = true`` with them).

        ``meta`` (keyword, optional): bytes the broker does not read and hands back to
        every node's handler with this publication, as ``meta=`` (the sender and the
        ephemeral flag of a client's publication, SPEC §13); a publication without it
        is handed over without the keyword.  It is not kept in history.

        ``sender`` (keyword, optional): the JSON object ``{"user", "client"}`` of the
        client that made it (SPEC §13), kept with the publication wherever it is kept
        (history, the namespace log) and read back by :meth:`history` and
        :meth:`log_history` as one more item of its tuple.  Callers pass it only when
        it is set; a publication without one is kept as before.
        """

    async def publish_batch(self, pubs: list[Publication]
                            ) -> list[PublishResult | BrokerUnavailable]:
        """Publish ``pubs`` in their order (per channel, a later one gets a later
        offset); one result per item, a :class:`BrokerUnavailable` for an item that was
        not published (the others still are).  The default publishes one at a time; the
        Redis broker sends the whole batch in one pipeline (one round trip).
        """
        out: list[PublishResult | BrokerUnavailable] = []
        for p in pubs:
            try:
                out.append(await self.publish(p.channel, p.data, **publish_args(p)))
            except BrokerUnavailable as exc:
                out.append(exc)
        return out

    keeps_logs: bool = False

    async def log_history(self, namespace: str, *, limit: int, since_channel: str,
                          since_offset: int, since_epoch: str) -> HistoryResult:
        """Up to ``limit`` entries of ``namespace``'s log after the publication
        ``since_offset`` of ``since_channel`` in ``since_epoch`` (the last event a pattern
        subscription delivered); ``publications`` are ``(log offset, channel, channel
        offset, channel epoch, data)`` tuples (with the ``sender`` as a sixth item when
        it was published with one), ``offset``/``epoch`` the log's top.
        ``recovered`` is False when that publication is no longer in the log.  With
        ``since_channel`` empty, ``since_offset``/``since_epoch`` are a position in the
        log itself (0 and "" = its beginning; ``limit`` 0 reads only the top).

        The default (a broker that keeps no logs) recovers nothing.
        """
        return HistoryResult([], 0, "", False)

    @abstractmethod
    async def subscribe(self, name: str) -> None:
        """Start receiving a channel or pattern on this node (the caller counts references)."""

    @abstractmethod
    async def unsubscribe(self, name: str) -> None:
        """Stop receiving a channel or pattern on this node."""

    async def sync(self) -> None:
        """Return once every publication the broker made before this call was handed to
        the handler.  A node reads history, calls this, and only then merges what the
        handler delivered meanwhile (subscribe with ``since``): nothing published before
        the read can arrive after the merge.  The default suits brokers that deliver
        inside ``publish`` (the in-memory one): it returns without suspending."""
        return None

    async def send_control(self, payload: bytes) -> int | None:
        """Hand ``payload`` to the ``handle_control`` of every *other* node sharing this
        broker, on a channel no client can name; returns how many nodes received it
        (this one included) when the broker knows, else None.  Raises
        :class:`BrokerUnavailable` when it could not be sent.  The default (a
        single-process broker) has no other node and does nothing."""
        return None

    #: the revocations of a single-process broker: (kind, key) -> record
    _revoked: dict[tuple[str, str], Revocation] | None = None

    async def revoke(self, rev: Revocation) -> Revocation:
        """Store a token revocation for every node sharing this broker until
        ``rev.until`` (merged with a record of the same kind and key already there);
        returns the record now stored.  Raises :class:`BrokerUnavailable` when it could
        not be stored.  The default keeps it in this process (a single-process broker).
        """
        if self._revoked is None:
            self._revoked = {}
        store = self._revoked
        now = time.time()
        for k in [k for k, r in store.items() if r.until <= now]:
            del store[k]
        merged = store[(rev.kind, rev.key)] = rev.merge(store.get((rev.kind, rev.key)))
        return merged

    async def revocations(self) -> list[Revocation]:
        """Every stored revocation that has not expired (a node loads them when it
        starts and after a reconnect).  Raises :class:`BrokerUnavailable`."""
        now = time.time()
        return [r for r in (self._revoked or {}).values() if r.until > now]

    async def presence_join(self, channel: str, client: str, user: str | None) -> None:
        """A local client joined ``channel``'s presence: make it visible to every node.

        The default does nothing: a single-process broker leaves presence to the node.
        """
        return None

    async def presence_leave(self, channel: str, client: str, user: str | None) -> None:
        """A local client left ``channel``'s presence (see :meth:`presence_join`)."""
        return None

    async def presence(self, channel: str) -> dict[str, str | None] | None:
        """Every node's clients in ``channel``'s presence ({client id: user}), or None
        when the node's own list is the whole truth (a single-process broker)."""
        return None

    @abstractmethod
    async def claim_once(self, key: str, ttl: float) -> bool:
        """True for the first claim of ``key`` within ``ttl`` seconds, False for every
        later one, on every process and node sharing this broker (SIWE nonces are spent
        this way).  Raises :class:`BrokerUnavailable` when the outcome is unknown.
        """

    @abstractmethod
    async def history(self, channel: str, *, limit: int, since_offset: int | None = None,
                      since_epoch: str | None = None) -> HistoryResult:
        """Up to ``limit`` publications with offset > since_offset (all kept if None).

        ``recovered`` is False when the epoch differs or the gap after since_offset is
        no longer fully in history.
        """
