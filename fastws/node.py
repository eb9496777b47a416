"""The node: configuration, the hub, the broker, counters, and the protocol's requests.

``Node`` is what one server process is.  The picows adapter (:mod:`fastws.server`)
hands it each complete text message of a connection (:meth:`Node.on_message`) and
each connection's end (:meth:`Node.drop`); the broker hands it every publication
(:meth:`Node.handle_publication`), which is framed once and fanned out by the hub.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from fastws import auth, channels, protocol
from fastws._fanout import Hub, make_frame
from fastws._match import Trie, glob_match
from fastws.auth import Auth
from fastws.broker import (
    Broker,
    BrokerUnavailable,
    Publication,
    PublishResult,
    create_broker,
)
from fastws.broker.base import Revocation
from fastws.broker.memory import MemoryBroker
from fastws.codes import DISCONNECT_TOKEN_REVOKED, Disconnect, Err
from fastws.limits import MAX_JSON_DEPTH, Bucket, json_depth
from fastws.protocol import ProtocolError, Request

if TYPE_CHECKING:
    from fastws.config import Config, NamespaceConfig
    from fastws.server import Connection

__all__ = ["Node", "Auth"]

log = logging.getLogger("fastws")

NS_LOG_SIZE = 10_000            # publications a namespace's log keeps (pattern recovery)
POSITION_CHECK_INTERVAL = 10.0  # seconds between checks of channel positions (gaps)
MAX_POSITIONS = 100_000         # channels whose last offset is remembered (gap detection)
CHECK_BATCH = 1000              # channels checked per round
LOAD_TIMEOUT = 10.0             # seconds start waits for the token revocations to load


class Node:
    """One fastws process: hub + broker + config + counters."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker if broker is not None else create_broker(config.server.broker)
        self.trie = Trie()
        self.hub: Hub | None = None
        self.auth = Auth(config.server.jwt_secret, config.server.jwt_public_key)
        self.siwe = auth.Siwe(self.auth, config.server.siwe_domains,
                              config.server.siwe_chain_ids)
        self.draining = False
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex() + "-"
        # counters read at scrape time (not on the per-delivery path)
        self.accepted = 0
        self.messages_received = 0
        self.subscriptions = 0
        self.closed: Counter[int] = Counter()
        self.errors: Counter[int] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.broker_reconnects = 0
        self.loop_lag = 0.0
        #: more Prometheus collectors of this process (e.g. the demo's indexer)
        self.extra_collectors: list[Any] = []
        self.presence: dict[str, dict[str, str | None]] = {}
        self._handlers: dict[str, Callable[[Connection, Request], Awaitable[bytes]]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish_req,
            "history": self._history,
            "presence": self._presence,
            "auth": self._auth,
        }
        self._tasks: set[asyncio.Task] = set()
        # subscribes awaiting the broker, per name (no broker unsubscribe meanwhile)
        self._pending: Counter[str] = Counter()
        # per channel, buffers of connections recovering with `since` (see _recover);
        # under "": (pattern, buffer) of pattern subscriptions recovering
        self._recovering: dict[str, list[Any]] = {}
        # per channel: (epoch, offset) of the last publication delivered (gap detection)
        self._positions: dict[str, tuple[str, int]] = {}
        self.gaps = 0
        self._check_from = 0
        self._positioner: asyncio.Task | None = None
        # the memory broker cannot lose a publication: no gap detection, no check
        self._track = not isinstance(self.broker, MemoryBroker)
        # token revocations (POST /api/revoke), this node's copy of the broker's:
        # user key (see revocation_key) -> (revoked at, until); jti -> until
        self.revoked_users: dict[str, tuple[float, float]] = {}
        self.revoked_jtis: dict[str, float] = {}
        self._loading: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the hub on the running loop and connect the broker."""
        self.hub = Hub(self.trie, self.config.limits.send_buffer, asyncio.get_running_loop())
        await self.broker.start(self)
        # the revocations stored before this node started: refused from the first
        # connection on (a broker that calls handle_connected started loading them)
        if self._loading is None and self.broker.up:
            self.handle_connected()
        if self._loading is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loading), LOAD_TIMEOUT)
            except TimeoutError:
                log.warning("the token revocations are still loading after %.0f s; "
                            "serving meanwhile", LOAD_TIMEOUT)
        if self._track:
            self._positioner = asyncio.get_running_loop().create_task(self._position_loop())

    async def close(self) -> None:
        for task in (self._positioner, self._loading):
            if task is not None:
                task.cancel()
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self.broker.up and not self.draining

    def next_client_id(self) -> str:
        """A client id unique across the nodes sharing a broker (presence lists them)."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def reload(self, config: Config) -> None:
        """Apply a re-read config (keys, limits, namespace rules) to everything live."""
        self.config = config
        self.auth = Auth(config.server.jwt_secret, config.server.jwt_public_key)
        used = self.siwe.used
        self.siwe = auth.Siwe(self.auth, config.server.siwe_domains,
                              config.server.siwe_chain_ids)
        self.siwe.used = used
        if self.hub is not None:
            self.hub.send_buffer = config.limits.send_buffer

    # ------------------------------------------------------------------ publishing

    async def publish(self, channel: str, data: Any, idempotency_key: str | None = None,
                      *, data_json: bytes | None = None) -> PublishResult:
        """Publish to a (validated) channel through the broker; returns offset/epoch."""
        ns = self.config.for_channel(channel)
        if data_json is None:
            if json_depth(data) > MAX_JSON_DEPTH:
                raise ProtocolError(Err.BAD_REQUEST,
                                    f"data nests deeper than {MAX_JSON_DEPTH} levels")
            data_json = orjson.dumps(data)
        log = None
        if ns.history_size > 0 and ns.subscribe not in ("owner", "api"):
            # the namespace's log, for pattern subscriptions (docs/history.md)
            space = channels.namespace_of(channel)
            if space:
                log = (space, NS_LOG_SIZE)
        return await self.broker.publish(
            channel, data_json, history_size=ns.history_size, history_ttl=ns.history_ttl,
            idempotency_key=idempotency_key, log=log,
        )

    def _publication(self, channel: str, data: Any,
                     idempotency_key: str | None = None) -> Publication:
        """A broker :class:`Publication` of ``data`` on ``channel`` with its namespace's
        history rules (ProtocolError if ``data`` nests too deep)."""
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ProtocolError(Err.BAD_REQUEST,
                                f"data nests deeper than {MAX_JSON_DEPTH} levels")
        ns = self.config.for_channel(channel)
        log = None
        if ns.history_size > 0 and ns.subscribe not in ("owner", "api"):
            space = channels.namespace_of(channel)
            if space:
                log = (space, NS_LOG_SIZE)
        return Publication(channel, orjson.dumps(data), ns.history_size, ns.history_ttl,
                           idempotency_key, log)

    async def publish_batch(self, items: list[tuple[str, Any, str | None]]
                            ) -> list[PublishResult | ProtocolError | BrokerUnavailable]:
        """Publish ``(channel, data, idempotency_key)`` items (validated channels) in
        order, in one broker batch; one result per item: its offset/epoch, or the
        ProtocolError (bad data) or BrokerUnavailable that kept it from being published.
        Raises BrokerUnavailable when the broker took none of them."""
        out: list[Any] = []
        pubs: list[Publication] = []
        for channel, data, key in items:
            try:
                pub = self._publication(channel, data, key)
            except ProtocolError as exc:
                out.append(exc)
                continue
            out.append(None)
            pubs.append(pub)
        done = iter(await self.broker.publish_batch(pubs) if pubs else ())
        return [next(done) if r is None else r for r in out]

    def handle_publication(self, channel: str, data: bytes, offset: int, epoch: str,
                           accepted: float, log_offset: int = 0, log_epoch: str = "") -> None:
        """Broker callback: frame the publication once and fan it out."""
        if offset and self._track:
            last = self._positions.get(channel)
            self._positions[channel] = (epoch, offset)
            if last is not None and (offset > last[1] + 1 if last[0] == epoch
                                     else offset != 1):
                self._gap(channel, last, epoch, offset)
            elif last is None and len(self._positions) > MAX_POSITIONS:
                self._positions.clear()
        if self._recovering:
            waiting = self._recovering.get(channel)
            if waiting:
                for buf in waiting:
                    buf.append((offset, epoch, data, log_offset, log_epoch))
            for pattern, buf in self._recovering.get("", ()):
                if glob_match(pattern, channel):
                    buf.append((channel, offset, epoch, data, log_offset, log_epoch))
        frame = make_frame(protocol.event_payload(channel, data, offset, epoch))
        # owner and api namespaces reach exact subscribers only (each passed check())
        private = self.config.for_channel(channel).subscribe in ("owner", "api")
        self.hub.broadcast(channel, frame, accepted, private)

    def _gap(self, channel: str, last: tuple[str, int], epoch: str, offset: int) -> None:
        """``channel``'s offsets jumped (a publication never reached this node, e.g. Redis
        pub/sub dropped it): close its local subscribers with 4010 so that their clients
        recover with ``since``."""
        from fastws.codes import DISCONNECT_INSUFFICIENT_STATE

        self.gaps += 1
        log.warning("publications lost on %s (%s:%d, then %s:%d): closing its subscribers "
                    "with 4010", channel, last[0], last[1], epoch, offset)
        for conn in self.trie.match(channel):
            if not conn.closing:
                conn.disconnect(DISCONNECT_INSUFFICIENT_STATE)

    async def check_positions(self) -> int:
        """Compare the last offset this node delivered on each channel with the broker's
        top (like Centrifugo's positioning): a channel that went on without us lost
        publications here, so its subscribers are closed with 4010.  Returns how many
        channels were found behind."""
        names = list(self._positions)
        if not names or not self.broker.up:
            return 0
        if len(names) > CHECK_BATCH:  # a slice per round, in turn
            start = self._check_from % len(names)
            names = (names[start:] + names[:start])[:CHECK_BATCH]
            self._check_from = start + CHECK_BATCH
        tops = await asyncio.gather(*(self.broker.history(n, limit=0) for n in names),
                                    return_exceptions=True)
        await self.broker.sync()  # whatever was published before the reads is delivered
        behind = 0
        for name, top in zip(names, tops, strict=True):
            seen = self._positions.get(name)
            if isinstance(top, BaseException) or seen is None or not top.offset:
                continue
            if (top.epoch, top.offset) != seen and (top.epoch != seen[0]
                                                    or top.offset > seen[1]):
                behind += 1
                self._positions[name] = (top.epoch, top.offset)
                self._gap(name, seen, top.epoch, top.offset)
        return behind

    async def _position_loop(self) -> None:
        while True:
            await asyncio.sleep(POSITION_CHECK_INTERVAL)
            try:
                await self.check_positions()
            except BrokerUnavailable:
                pass
            except Exception:
                log.exception("position check failed")

    def handle_gap(self) -> None:
        """Broker callback after it reconnected and resubscribed: publications may have
        been lost meanwhile, so every subscribed connection is closed with 4010 and its
        client recovers with ``since``."""
        from fastws.codes import DISCONNECT_INSUFFICIENT_STATE

        self.broker_reconnects += 1
        self._positions.clear()
        for conn in list(self.hub.conns):
            if conn.subs and not conn.closing:
                conn.disconnect(DISCONNECT_INSUFFICIENT_STATE)

    def handle_shard_gap(self, lost: Callable[[str], bool]) -> None:
        """Broker callback after one Redis Cluster shard was lost and is back: only the
        connections holding a channel ``lost`` names, or any pattern (its feeds span
        every shard), are closed with 4010; the others keep their streams."""
        from fastws.codes import DISCONNECT_INSUFFICIENT_STATE

        self.broker_reconnects += 1
        for name in [n for n in self._positions if lost(n)]:
            del self._positions[name]
        for conn in list(self.hub.conns):
            if conn.subs and not conn.closing and any(
                    channels.is_pattern(n) or lost(n) for n in conn.subs):
                conn.disconnect(DISCONNECT_INSUFFICIENT_STATE)

    # ------------------------------------------------------------------ permissions

    @staticmethod
    def _allowed(rule: str, user: str | None, channel: str) -> int:
        """0 if allowed, else the error code (401 not authenticated / 403 denied)."""
        if rule == "anyone":
            return 0
        if rule == "api":
            return Err.FORBIDDEN
        if user is None:
            return Err.UNAUTHORIZED
        if rule == "authenticated":
            return 0
        # owner: the rest of the name is the user's id (addresses compare case-insensitively)
        if channels.is_pattern(channel):
            return Err.FORBIDDEN
        return 0 if auth.same_owner(channels.owner_of(channel), user) else Err.FORBIDDEN

    def _pattern_reach(self, pattern: str) -> str | None:
        """For a pattern spanning namespaces (``*``, ``*:x``, ``vip*``): the first
        ``authenticated`` namespace it may reach, else None.  (Owner and api
        namespaces never deliver to patterns: see :meth:`handle_publication`.)"""
        for name, ns in self.config.namespaces.items():
            if (ns.subscribe == "authenticated" and name != "*"
                    and auth.may_match_prefix(pattern, name + ":")):
                return name
        return None

    def check(self, what: str, user: str | None, channel: str,
              grants: tuple[str, ...] | None = None) -> None:
        """Raise ProtocolError unless ``user`` may ``what`` (subscribe/publish/history/presence).

        ``grants`` is the ``channels`` claim of the connection's token, if it had one:
        the channel (or every channel a pattern can match) must be one it allows.
        """
        ns: NamespaceConfig = self.config.for_channel(channel)
        cross = channels.is_pattern(channel) and not channels.namespace_of(channel)
        if cross:
            ns = self.config.namespace("")
        rule = getattr(ns, {"subscribe": "subscribe", "publish": "publish",
                            "history": "history_access", "presence": "presence_access"}[what])
        if rule == "subscriber":
            rule = ns.subscribe
        code = self._allowed(rule, user, channel)
        if not code and cross and user is None and (reach := self._pattern_reach(channel)):
            raise ProtocolError(Err.UNAUTHORIZED, f"not authenticated: {channel} may match "
                                f"channels of namespace {reach}, which needs a token")
        if code:
            msg = ("not authenticated" if code == Err.UNAUTHORIZED
                   else f"permission denied: {what} {channel}")
            raise ProtocolError(code, msg)
        if grants is not None and not auth.granted(grants, channel):
            raise ProtocolError(Err.FORBIDDEN, f"permission denied: {what} {channel} "
                                "(not in the token's channels)")

    # ------------------------------------------------------------------ requests

    def on_message(self, conn: Connection, payload: bytes) -> None:
        """Handle one complete text message of ``conn`` (counted by the caller)."""
        try:
            req = protocol.parse(payload, self.config.limits.max_channel_length)
        except ProtocolError as exc:
            self.send_error(conn, exc)
            return
        if req.type == "ping":
            conn.send_text(protocol.reply(req.id, "pong"))
            return
        task = asyncio.get_running_loop().create_task(self._run(conn, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send_error(self, conn: Connection, exc: ProtocolError) -> None:
        self.errors[exc.code] += 1
        conn.send_text(protocol.error_reply(exc.id, exc.code, exc.message))

    async def _run(self, conn: Connection, req: Request) -> None:
        try:
            answer = await self._handlers[req.type](conn, req)
        except ProtocolError as exc:
            exc.id = req.id
            self.send_error(conn, exc)
            return
        except BrokerUnavailable as exc:
            self.send_error(conn, ProtocolError(Err.UNAVAILABLE, str(exc), req.id))
            return
        except Exception:
            log.exception("internal error handling %s", req.type)
            self.send_error(conn, ProtocolError(Err.INTERNAL, "internal error", req.id))
            return
        if answer and not conn.closing:
            conn.send_text(answer)

    async def _subscribe(self, conn: Connection, req: Request) -> bytes:
        # one str per name for all its subscribers (trie and subs lists), not one each;
        # subs is a list: ~90 B for the usual one name where a set takes 216 B per
        # connection, and at most max_subscriptions long
        name = sys.intern(req.channel)
        subs = conn.subs
        if subs is None:
            subs = conn.subs = []
        if name in subs:
            raise ProtocolError(Err.ALREADY_SUBSCRIBED, f"already subscribed to {name}")
        if len(subs) >= self.config.limits.max_subscriptions:
            self.rate_limited["subscriptions"] += 1
            raise ProtocolError(Err.RATE_LIMITED, "subscription limit of "
                                f"{self.config.limits.max_subscriptions} reached")
        self.check("subscribe", conn.user, name, conn.grants)
        self._take_subscribe(conn)
        subs.append(name)  # reserve the name while we await the broker
        self._pending[name] += 1
        try:
            if not self.trie.keys(name):
                await self.broker.subscribe(name)
            extra: dict[str, Any] = {}
            if req.since is not None or req.positioned:
                extra = await self._recover(conn, name, req.since)
            if conn.closing:
                _discard(subs, name)
                return b""
            if self.config.for_channel(name).presence and not channels.is_pattern(name):
                self._join(conn, name)  # pushed to the others, before we are one of them
            # no await between the history read above and this line (memory broker)
            self.trie.add(name, conn)
        except BaseException:
            _discard(subs, name)
            raise
        finally:
            self._pending[name] -= 1
            if not self._pending[name]:
                del self._pending[name]
                if not self.trie.keys(name):
                    self._broker_unsubscribe(name)
        self.subscriptions += 1
        return protocol.reply(req.id, "subscribed", channel=name, **extra)

    def _take_subscribe(self, conn: Connection) -> None:
        """Spend one of the connection's subscribe tokens (subscribes_per_connection)."""
        limits = self.config.limits
        if not limits.subscribes_per_connection:
            return
        now = time.monotonic()
        if conn.sub_bucket is None:
            conn.sub_bucket = Bucket(limits.subscribes_per_connection, now)
        if conn.sub_bucket.take(limits.subscribes_per_connection, limits.subscribes_window,
                                now):
            self.rate_limited["subscribes"] += 1
            conn.refused()
            raise ProtocolError(Err.RATE_LIMITED, "rate limited: more than "
                                f"{limits.subscribes_per_connection} subscribes per "
                                f"{limits.subscribes_window:g} s")

    async def _recover(self, conn: Connection, name: str,
                       since: protocol.Since | None) -> dict[str, Any]:
        """Send the publications missed after ``since`` as event pushes; returns what
        goes into ``subscribed``: ``recovered`` (were they all still there) and, for a
        channel with history, its stream's ``offset``/``epoch`` after the replay (the
        clients keep it when ``recovered`` is false).  Without ``since`` (a
        ``positioned`` subscribe) only the position: everything after it is delivered."""
        if channels.is_pattern(name):
            return await self._recover_pattern(conn, name, since)
        ns = self.config.for_channel(name)
        if ns.history_size <= 0:
            return {} if since is None else {"recovered": False}
        # The broker delivers this channel already: publications that arrive while
        # history is read are kept and sent after it (without repeating what it held).
        # broker.sync() waits until everything published before the read has reached
        # us (a Redis pub/sub connection may lag behind the command connection), so
        # none of those can come live after the merge, duplicating history.
        buf: list[tuple[int, str, bytes, int, str]] = []
        waiting = self._recovering.setdefault(name, [])
        waiting.append(buf)
        try:
            hist = await self.broker.history(
                name, limit=ns.history_size if since is not None else 0,
                since_offset=since.offset if since is not None else None,
                since_epoch=since.epoch if since is not None else None)
            await self.broker.sync()
        finally:
            waiting.remove(buf)
            if not waiting:
                self._recovering.pop(name, None)
        if hist.recovered and since is not None:
            for offset, data in hist.publications:
                conn.send_text(protocol.event_payload(name, data, offset, hist.epoch))
        for offset, epoch, data, _log_offset, _log_epoch in buf:
            if offset == 0 or epoch != hist.epoch or offset > hist.offset:
                conn.send_text(protocol.event_payload(name, data, offset, epoch))
        if self._track and hist.offset and name not in self._positions:
            # everything up to the top has reached us (sync): checks start from there
            self._positions[name] = (hist.epoch, hist.offset)
        if since is None:
            return {"offset": hist.offset, "epoch": hist.epoch}
        return {"recovered": hist.recovered, "offset": hist.offset, "epoch": hist.epoch}

    async def _recover_pattern(self, conn: Connection, name: str,
                               since: protocol.Since | None) -> dict[str, Any]:
        """Recover a pattern from its namespace's log: ``since`` is the last event the
        subscription delivered (its ``channel``, ``offset``, ``epoch``), or without
        ``channel`` a position in the log itself (what a ``positioned`` subscribe
        answered); the log's entries after it that the pattern matches are replayed,
        then what came meanwhile (merged by log offset, which the broker hands the node
        internally).  Without ``since``, only the log's position is answered."""
        nothing: dict[str, Any] = {} if since is None else {"recovered": False}
        space = channels.namespace_of(name)
        if not space or not self.broker.keeps_logs or (
                since is not None and since.channel and not glob_match(name, since.channel)):
            return nothing  # spans namespaces, a broker without logs (cluster), no position
        ns = self.config.namespace(space)
        if ns.history_size <= 0 or ns.subscribe in ("owner", "api"):
            return nothing
        entry: tuple[str, list[tuple[str, int, str, bytes, int, str]]] = (name, [])
        waiting = self._recovering.setdefault("", [])
        waiting.append(entry)
        try:
            hist = await self.broker.log_history(
                space, limit=NS_LOG_SIZE if since is not None else 0,
                since_channel=since.channel if since is not None else "",
                since_offset=since.offset if since is not None else 0,
                since_epoch=since.epoch if since is not None else "")
            await self.broker.sync()
        finally:
            waiting.remove(entry)
            if not waiting:
                self._recovering.pop("", None)
        if hist.recovered and since is not None:
            for _log_offset, channel, offset, epoch, data in hist.publications:
                if glob_match(name, channel):
                    conn.send_text(protocol.event_payload(channel, data, offset, epoch))
        for channel, offset, epoch, data, log_offset, log_epoch in entry[1]:
            if log_offset == 0 or log_epoch != hist.epoch or log_offset > hist.offset:
                conn.send_text(protocol.event_payload(channel, data, offset, epoch))
        if since is None:
            return {"offset": hist.offset, "epoch": hist.epoch}
        return {"recovered": hist.recovered}

    async def _unsubscribe(self, conn: Connection, req: Request) -> bytes:
        if conn.subs and req.channel in conn.subs:
            self._drop_sub(conn, req.channel)
        return protocol.reply(req.id, "unsubscribed", channel=req.channel)

    def _drop_sub(self, conn: Connection, name: str) -> None:
        _discard(conn.subs, name)
        if self.trie.remove(name, conn):
            self.subscriptions -= 1
            if not self.trie.keys(name) and not self._pending.get(name):
                self._broker_unsubscribe(name)
            if name in self.presence:
                self._leave(conn, name)

    def _broker_unsubscribe(self, name: str) -> None:
        """The node no longer needs ``name``: unsubscribe it on the broker and forget the
        positions it may have delivered (a later subscribe starts them afresh)."""
        if channels.is_pattern(name):
            self._positions.clear()
        else:
            self._positions.pop(name, None)
        self._spawn(self.broker.unsubscribe(name))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_req(self, conn: Connection, req: Request) -> bytes:
        self.check("publish", conn.user, req.channel, conn.grants)
        res = await self.publish(req.channel, req.data)
        return protocol.reply(req.id, "published", offset=res.offset, epoch=res.epoch)

    async def _history(self, conn: Connection, req: Request) -> bytes:
        if channels.is_pattern(req.channel):
            raise ProtocolError(Err.BAD_REQUEST, "history needs a channel, not a pattern")
        self.check("history", conn.user, req.channel, conn.grants)
        since = req.since
        hist = await self.broker.history(
            req.channel, limit=req.limit if req.limit is not None else 100,
            since_offset=since.offset if since else None,
            since_epoch=since.epoch if since else None)
        pubs = [{"offset": o, "data": orjson.Fragment(d)} for o, d in hist.publications]
        return protocol.reply(req.id, "history", publications=pubs, offset=hist.offset,
                              epoch=hist.epoch)

    async def _presence(self, conn: Connection, req: Request) -> bytes:
        if channels.is_pattern(req.channel):
            raise ProtocolError(Err.BAD_REQUEST, "presence needs a channel, not a pattern")
        if not self.config.for_channel(req.channel).presence:
            raise ProtocolError(Err.FORBIDDEN, "presence is not enabled for this namespace")
        self.check("presence", conn.user, req.channel, conn.grants)
        members = await self.broker.presence(req.channel)  # every node's, if shared
        if members is None:
            members = self.presence.get(req.channel, {})
        clients = [{"client": cid, "user": user} for cid, user in members.items()]
        return protocol.reply(req.id, "presence", clients=clients)

    async def _auth(self, conn: Connection, req: Request) -> bytes:
        """``auth``: authenticate, or refresh the token (and its expiry) of the same user."""
        try:
            ident = self.auth.verify(req.token)
        except auth.AuthError as exc:
            raise ProtocolError(Err.UNAUTHORIZED, str(exc)) from None
        if self.revoked(ident.user, ident.issued, ident.jti):
            raise ProtocolError(Err.UNAUTHORIZED, DISCONNECT_TOKEN_REVOKED.reason)
        if conn.user is not None and not auth.same_owner(conn.user, ident.user):
            raise ProtocolError(Err.FORBIDDEN, "this connection is authenticated as another "
                                "user; open a new connection to switch users")
        for name in list(conn.subs or ()):  # a narrower channels claim may not drop one
            try:
                self.check("subscribe", ident.user, name, ident.channels)
            except ProtocolError as exc:
                raise ProtocolError(Err.FORBIDDEN, f"the token does not allow the "
                                    f"subscription {name}; unsubscribe first") from exc
        auth.attach(conn, ident, asyncio.get_running_loop())
        return protocol.reply(req.id, "authed", user=ident.user)

    # ------------------------------------------------------------------ presence

    def _join(self, conn: Connection, channel: str) -> None:
        self.presence.setdefault(channel, {})[conn.client_id] = conn.user
        self._presence_push("join", conn, channel)
        self._spawn(self.broker.presence_join(channel, conn.client_id, conn.user))

    def _leave(self, conn: Connection, channel: str) -> None:
        members = self.presence.get(channel)
        if members is None or members.pop(conn.client_id, 0) == 0:
            return
        if not members:
            del self.presence[channel]
        self._presence_push("leave", conn, channel)
        self._spawn(self.broker.presence_leave(channel, conn.client_id, conn.user))

    def handle_presence(self, channel: str, typ: str, client: str, user: str | None) -> None:
        """Broker callback: a client of another node joined or left ``channel``."""
        if channel in self.presence or self.trie.keys(channel):
            payload = orjson.dumps({"type": typ, "channel": channel, "client": client,
                                    "user": user})
            self.hub.broadcast(channel, make_frame(payload), -1.0, True)  # not a publication

    def _presence_push(self, typ: str, conn: Connection, channel: str) -> None:
        payload = orjson.dumps({"type": typ, "channel": channel, "client": conn.client_id,
                                "user": conn.user})
        self.hub.broadcast(channel, make_frame(payload), -1.0, True)  # not a publication

    # ------------------------------------------------------------------ connections

    def disconnect_user(self, user: str, d: Disconnect) -> int:
        """Disconnect every connection of ``user`` on this node (the ``disconnect`` push,
        then close with ``d.code``); returns how many were closed."""
        n = 0
        for conn in list(self.hub.conns):
            if conn.user is not None and not conn.closing and auth.same_owner(conn.user, user):
                conn.disconnect(d)
                n += 1
        return n

    def handle_control(self, payload: bytes) -> None:
        """Broker callback: another node's control message (``POST /api/disconnect``
        sends ``{"op":"disconnect","user","code","reason"}``, ``POST /api/revoke``
        ``{"op":"revoke","kind","key","at","until"}``)."""
        msg = orjson.loads(payload)
        if isinstance(msg, dict) and msg.get("op") == "disconnect":
            n = self.disconnect_user(str(msg["user"]),
                                     Disconnect(int(msg["code"]), str(msg["reason"])))
            log.info("disconnected %d connections of a user (server API, another node)", n)
        elif isinstance(msg, dict) and msg.get("op") == "revoke":
            n = self.apply_revocation(Revocation(str(msg["kind"]), str(msg["key"]),
                                                 float(msg["at"]), float(msg["until"])))
            log.info("token revocation from another node: %d connections closed", n)
        else:
            log.warning("unknown control message %r", payload[:200])

    # ------------------------------------------------------------------ revocations

    def revoked(self, user: str, issued: float | None, jti: str | None,
                now: float | None = None) -> bool:
        """True if a revocation this node knows of refuses the token of ``user`` with
        ``iat`` ``issued`` and id ``jti``: its jti is revoked, or its user is and its
        ``iat`` is at most the revocation's time (or it has none).  Two dict lookups:
        no broker round trip."""
        if not self.revoked_users and not self.revoked_jtis:
            return False
        now = time.time() if now is None else now
        if jti is not None:
            until = self.revoked_jtis.get(jti)
            if until is not None and until > now:
                return True
        rec = self.revoked_users.get(revocation_key(user))
        if rec is None or rec[1] <= now:
            return False
        return issued is None or issued <= rec[0]

    def apply_revocation(self, rev: Revocation) -> int:
        """Record ``rev`` in this node's copy and disconnect (4501 "token revoked") every
        live connection whose token it refuses; returns how many were closed."""
        now = time.time()
        if rev.until <= now:
            return 0
        if rev.kind == "user":
            key = revocation_key(rev.key)
            old = self.revoked_users.get(key)
            self.revoked_users[key] = ((rev.at, rev.until) if old is None else
                                       (max(rev.at, old[0]), max(rev.until, old[1])))
        elif rev.kind == "jti":
            self.revoked_jtis[rev.key] = max(rev.until, self.revoked_jtis.get(rev.key, 0.0))
        else:
            return 0
        self._forget_revocations(now)
        n = 0
        for conn in list(self.hub.conns) if self.hub is not None else ():
            if conn.user is not None and not conn.closing and self.revoked(
                    conn.user, conn.iat, conn.jti, now):
                conn.disconnect(DISCONNECT_TOKEN_REVOKED)
                n += 1
        return n

    def _forget_revocations(self, now: float) -> None:
        """Drop expired revocations (whenever one is added: they are few)."""
        for user in [u for u, r in self.revoked_users.items() if r[1] <= now]:
            del self.revoked_users[user]
        for jti in [j for j, until in self.revoked_jtis.items() if until <= now]:
            del self.revoked_jtis[jti]

    def handle_connected(self) -> None:
        """Broker callback on every (re)connect: load the stored revocations (a control
        message sent while this node was away from the broker was missed)."""
        if self._loading is not None and not self._loading.done():
            return
        self._loading = asyncio.get_running_loop().create_task(self.load_revocations())

    async def load_revocations(self) -> int:
        """Merge every revocation the broker stores into this node's copy, closing the
        live connections they refuse; returns how many records were read (0 when the
        broker could not answer: the next reconnect tries again)."""
        try:
            revs = await self.broker.revocations()
        except (BrokerUnavailable, OSError, TimeoutError) as exc:
            log.warning("could not load the token revocations from the broker: %s", exc)
            return 0
        except Exception:
            log.exception("could not load the token revocations from the broker")
            return 0
        closed = sum(self.apply_revocation(r) for r in revs)
        if revs:
            log.info("loaded %d token revocations from the broker (%d connections closed)",
                     len(revs), closed)
        return len(revs)

    def drop(self, conn: Connection, close_code: int) -> None:
        """A connection ended: remove its subscriptions and count its close code."""
        self.closed[close_code] += 1
        self.hub.conns.discard(conn)
        conn.closing = True
        if conn.subs:
            for name in list(conn.subs):
                self._drop_sub(conn, name)


def revocation_key(user: str) -> str:
    """The key of a user's revocations: 0x addresses in lower case (they compare
    case-insensitively, as :func:`fastws.auth.same_owner` does), other ids as they are."""
    return user.lower() if auth.is_address(user) else user


def _discard(subs: list[str] | None, name: str) -> None:
    """Remove ``name`` from a connection's subscription list if it is there."""
    if subs and name in subs:
        subs.remove(name)
