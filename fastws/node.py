"""The node: one fastws process's orchestration.

``Node`` ties the parts together and owns none of their rules: the config, the
:class:`~fastws._fanout.Hub` (registrations and fan-out), the broker, and the
modules that each keep one concern — :class:`~fastws.permissions.Permissions`,
:class:`~fastws.recovery.Recovery`, :class:`~fastws.presence.Presence`,
:class:`~fastws.revocations.Revocations`.  A transport hands it each session's
requests (:meth:`Node.run`, after :meth:`fastws.session.Session.receive`) and each
session's end (:meth:`Node.drop`); the broker hands it every publication
(:meth:`Node.handle_publication`), framed once and fanned out by the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from fastws import auth, channels, protocol
from fastws._fanout import Hub, make_frame
from fastws._match import glob_match
from fastws._version import __version__
from fastws.auth import Auth
from fastws.broker import (
    Broker,
    BrokerUnavailable,
    Publication,
    PublishResult,
    create_broker,
    publication_for,
    publish_args,
)
from fastws.broker.base import Revocation
from fastws.codes import DISCONNECT_TOKEN_EXPIRED, Disconnect, Err, close_reason
from fastws.limits import MAX_JSON_DEPTH, json_depth
from fastws.permissions import Permissions
from fastws.presence import Presence, member_counts
from fastws.protocol import ProtocolError, Request
from fastws.proxy import (
    BackendDisconnect,
    BackendFailed,
    BackendRefused,
    Proxy,
    ProxyCollector,
    forward_headers,
)
from fastws.recovery import Recovery
from fastws.revocations import Revocations

if TYPE_CHECKING:
    from fastws.config import Config
    from fastws.session import Session

__all__ = ["Node", "Auth", "Admission"]

log = logging.getLogger("fastws")

LOAD_TIMEOUT = 10.0             # seconds start waits for the token revocations to load
GATHER_TIMEOUT = 1.0            # seconds a server API query waits for the other nodes


@dataclass(frozen=True, slots=True)
class Admission:
    """What the connect proxy decided for a new connection (:meth:`Node.connect_proxy`):
    its client id, the backend's identity and meta, or the ``disconnect`` to close it
    with once accepted; ``ip`` is the client IP the backend was told."""

    client: str
    ident: auth.Identity | None
    meta: Any
    disconnect: Disconnect | None
    ip: str = ""


def expiry_timer(old: asyncio.TimerHandle | None, at: float | None,
                 sess: Session) -> asyncio.TimerHandle | None:
    """What :meth:`Session.arm_expiry` means on a live transport: cancel ``old`` and,
    for a wall-clock ``at``, a timer that disconnects ``sess`` with 4501 "token
    expired" then; returns the new timer (None when ``at`` is None)."""
    if old is not None:
        old.cancel()
    if at is None:
        return None
    return asyncio.get_running_loop().call_later(max(0.0, at - time.time()),
                                                 sess.disconnect, DISCONNECT_TOKEN_EXPIRED)


class Node:
    """One fastws process: hub + broker + config + counters (see the module docstring)."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker if broker is not None else create_broker(config.server.broker)
        self.hub: Hub | None = None
        self.auth = Auth(config.server.jwt_secret, config.server.jwt_public_key)
        self.siwe = auth.Siwe(self.auth, config.server.siwe_domains,
                              config.server.siwe_chain_ids)
        self.permissions = Permissions(config)
        self.recovery = Recovery(self)
        self.presence = Presence(self)
        self.revocations = Revocations(self)
        self.draining = False
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex() + "-"
        #: this node's name (lifecycle records, /api/info): host, process, id prefix
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self._id_prefix[:-1]}"
        self.started = time.monotonic()
        self.proxy = Proxy(config.proxy)    # the backend proxies (SPEC §11)
        self.lifecycle: Any = None          # broker.streams.LifecycleLog (SPEC §12)
        # counters read at scrape time (not on the per-delivery path)
        self.accepted = 0
        self.messages_received = 0
        self.subscriptions = 0
        self.closed: Counter[int] = Counter()
        self.errors: Counter[int] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.transports: Counter[str] = Counter()   # open SSE / long-poll sessions (fallback)
        self.broker_reconnects = 0
        self.loop_lag = 0.0
        #: more Prometheus collectors of this process (e.g. the demo's indexer)
        self.extra_collectors: list[Any] = [ProxyCollector(self.proxy)]
        self._handlers: dict[str, Callable[[Session, Request], Awaitable[bytes]]] = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish_req,
            "history": self._history,
            "presence": self._presence,
            "auth": self._auth,
            "rpc": self._rpc,
            "presence_stats": self._presence_stats,
        }
        self._tasks: set[asyncio.Task] = set()
        # server API queries awaiting the other nodes' answers: id -> (answers, done)
        self._queries: dict[str, tuple[list[Any], asyncio.Event]] = {}
        # subscribes awaiting the broker, per name (no broker unsubscribe meanwhile)
        self._pending: Counter[str] = Counter()
        # sessions that published with "echo": false, by client id (until they end)
        self._echoless: dict[str, Session] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the hub on the running loop and connect the broker."""
        self.hub = Hub(self.config.limits.send_buffer, asyncio.get_running_loop())
        self.hub.compression_min_size = self.config.server.compression_min_size
        await self.broker.start(self)
        # the revocations stored before this node started: refused from the first
        # connection on (a broker that calls handle_connected started loading them)
        revs = self.revocations
        if revs.loading is None and self.broker.up:
            self.handle_connected()
        if revs.loading is not None:
            try:
                await asyncio.wait_for(asyncio.shield(revs.loading), LOAD_TIMEOUT)
            except TimeoutError:
                log.warning("the token revocations are still loading after %.0f s; "
                            "serving meanwhile", LOAD_TIMEOUT)
        self.recovery.start()
        if self.config.server.lifecycle_stream:
            from fastws.broker.streams import LifecycleLog

            self.lifecycle = LifecycleLog(self.broker, self.name)  # type: ignore[arg-type]
            self.lifecycle.start()

    async def close(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.close()
        await self.proxy.close()
        self.recovery.stop()
        if self.revocations.loading is not None:
            self.revocations.loading.cancel()
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self.broker.up and not self.draining

    @property
    def gaps(self) -> int:
        """Channels found to have lost publications on their way to this node."""
        return self.recovery.gaps

    def next_client_id(self) -> str:
        """A client id unique across the nodes sharing a broker (presence lists them)."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def reload(self, config: Config) -> None:
        """Apply a re-read config (keys, limits, namespace rules) to everything live."""
        self.config = config
        self.permissions.config = config
        self.proxy.config = config.proxy
        self.auth = Auth(config.server.jwt_secret, config.server.jwt_public_key)
        used = self.siwe.used
        self.siwe = auth.Siwe(self.auth, config.server.siwe_domains,
                              config.server.siwe_chain_ids)
        self.siwe.used = used
        if self.hub is not None:
            self.hub.send_buffer = config.limits.send_buffer
            self.hub.compression_min_size = config.server.compression_min_size

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # what a session asks of its host (fastws.session.SessionHost)

    def verify_token(self, token: str) -> auth.Identity:
        """The identity of a token (raises auth.AuthError)."""
        return self.auth.verify(token)

    def revoked(self, user: str, issued: float | None, jti: str | None,
                now: float | None = None) -> bool:
        """True if a revocation this node knows of refuses this token."""
        return self.revocations.revoked(user, issued, jti, now)

    # ------------------------------------------------------------------ publishing

    def _publication(self, channel: str, data: Any, idempotency_key: str | None = None,
                     data_json: bytes | None = None, user: str = "",
                     client: str = "", ephemeral: bool = False,
                     meta: bytes = b"", sender: bytes = b"") -> Publication:
        """A broker :class:`Publication` of ``data`` on ``channel`` with its namespace's
        history, log and stream rules (:func:`fastws.broker.publication_for`;
        ProtocolError if ``data`` nests too deep); ``user`` and ``client`` name the
        publisher in a stream entry, ``sender`` (its ``from``) is kept with it in history."""
        if data_json is None:
            if json_depth(data) > MAX_JSON_DEPTH:
                raise ProtocolError(Err.BAD_REQUEST,
                                    f"data nests deeper than {MAX_JSON_DEPTH} levels")
            data_json = orjson.dumps(data)
        return publication_for(self.config.for_channel(channel), channel, data_json,
                               idempotency_key, user=user, client=client,
                               ephemeral=ephemeral, meta=meta, sender=sender)

    async def publish(self, channel: str, data: Any, idempotency_key: str | None = None,
                      *, data_json: bytes | None = None, user: str = "",
                      client: str = "", ephemeral: bool = False,
                      meta: bytes = b"", sender: bytes = b"") -> PublishResult:
        """Publish to a (validated) channel through the broker; returns offset/epoch.

        In a ``stream`` namespace it is appended to the stream first, with ``user`` and
        ``client`` (BrokerUnavailable, and nothing published, when that fails).
        ``ephemeral``: to live subscribers only (SPEC §13); ``meta``: the sender of a
        client's publication (see :meth:`_publish_req`); ``sender``: its ``from`` as
        JSON, kept with it in history (replays and ``history`` carry it)."""
        pub = self._publication(channel, data, idempotency_key, data_json, user=user,
                                client=client, ephemeral=ephemeral, meta=meta,
                                sender=sender)
        return await self.broker.publish(channel, pub.data, **publish_args(pub))

    async def publish_batch(self, items: list[tuple[Any, ...]]
                            ) -> list[PublishResult | ProtocolError | BrokerUnavailable]:
        """Publish ``(channel, data, idempotency_key)`` items (validated channels) in
        order, in one broker batch; one result per item: its offset/epoch, or the
        ProtocolError (bad data) or BrokerUnavailable that kept it from being published.
        Raises BrokerUnavailable when the broker took none of them."""
        out: list[Any] = []
        pubs: list[Publication] = []
        for channel, data, key, *ephemeral in items:  # (an optional 4th: ephemeral)
            try:
                pub = self._publication(channel, data, key,
                                        ephemeral=bool(ephemeral and ephemeral[0]))
            except ProtocolError as exc:
                out.append(exc)
                continue
            out.append(None)
            pubs.append(pub)
        done = iter(await self.broker.publish_batch(pubs) if pubs else ())
        return [next(done) if r is None else r for r in out]

    # ------------------------------------------------------------------ broker callbacks

    def handle_publication(self, channel: str, data: bytes, offset: int, epoch: str,
                           accepted: float, log_offset: int = 0, log_epoch: str = "",
                           meta: bytes = b"") -> None:
        """Broker callback: frame the publication once and fan it out."""
        if meta:
            self._handle_meta(channel, data, offset, epoch, accepted, log_offset,
                              log_epoch, meta)
            return
        payload = protocol.event_payload(channel, data, offset, epoch)
        self.recovery.on_publication(channel, payload, offset, epoch, log_offset, log_epoch)
        frame = make_frame(payload)
        # owner and api namespaces reach exact subscribers only (each passed check())
        self.hub.broadcast(channel, frame, accepted, self.permissions.private(channel))

    def _handle_meta(self, channel: str, data: bytes, offset: int, epoch: str,
                     accepted: float, log_offset: int, log_epoch: str, meta: bytes) -> None:
        """A publication with meta (SPEC §13): ``{"e":1}`` ephemeral, ``"f"`` the
        sender ({user, client}) for ``from``, ``"x"`` the client id it must not reach
        (``echo: false``).  Still framed once; the hub skips the sender (one pointer
        test in the loop, no object per delivery)."""
        m = orjson.loads(meta)
        ephemeral = bool(m.get("e"))
        payload = protocol.event_payload_from(channel, data, offset, epoch, ephemeral,
                                              m.get("f"))
        self.recovery.on_publication(channel, payload, offset, epoch, log_offset, log_epoch)
        frame = make_frame(payload)
        private = self.permissions.private(channel)
        skip = self._echoless.get(m["x"]) if "x" in m else None
        self.hub.broadcast(channel, frame, accepted, private, skip)

    def handle_gap(self) -> None:
        """Broker callback after it reconnected and resubscribed: publications may have
        been lost meanwhile, so every subscribed session is closed with 4010 and its
        client recovers with ``since``."""
        self.broker_reconnects += 1
        self.recovery.reset()

    def handle_shard_gap(self, lost: Callable[[str], bool]) -> None:
        """Broker callback after one Redis Cluster shard was lost and is back: only the
        sessions holding a channel ``lost`` names, or any pattern, are closed with 4010."""
        self.broker_reconnects += 1
        self.recovery.reset(lost)

    def handle_presence(self, channel: str, typ: str, client: str, user: str | None) -> None:
        """Broker callback: a client of another node joined or left ``channel``."""
        self.presence.handle_presence(channel, typ, client, user)

    def handle_connected(self) -> None:
        """Broker callback on every (re)connect: load the stored revocations (a control
        message sent while this node was away from the broker was missed)."""
        self.revocations.reload()

    def handle_control(self, payload: bytes) -> None:
        """Broker callback: another node's control message (``POST /api/disconnect``
        sends ``{"op":"disconnect","user","code","reason"}``, ``POST /api/revoke``
        ``{"op":"revoke","kind","key","at","until"}``)."""
        msg = orjson.loads(payload)
        if isinstance(msg, dict) and msg.get("op") == "disconnect":
            n = self.disconnect_user(str(msg["user"]),
                                     Disconnect(int(msg["code"]), str(msg["reason"])))
            log.info("disconnected %d connections of a user (server API, another node)", n)
        elif isinstance(msg, dict) and msg.get("op") == "query":
            answer = {"op": "answer", "id": str(msg.get("id")),
                      "data": self.local_answer(str(msg.get("kind")), msg.get("args") or {})}
            self.spawn(self.broker.send_control(orjson.dumps(answer)))
        elif isinstance(msg, dict) and msg.get("op") == "answer":
            waiting = self._queries.get(str(msg.get("id")))
            if waiting is not None:
                waiting[0].append(msg.get("data"))
                waiting[1].set()
        elif isinstance(msg, dict) and msg.get("op") == "revoke":
            n = self.apply_revocation(Revocation(str(msg["kind"]), str(msg["key"]),
                                                 float(msg["at"]), float(msg["until"])))
            log.info("token revocation from another node: %d connections closed", n)
        else:
            log.warning("unknown control message %r", payload[:200])

    async def check_positions(self) -> int:
        """Compare this node's channel positions with the broker's (see Recovery)."""
        return await self.recovery.check_positions()

    def apply_revocation(self, rev: Revocation) -> int:
        """Record ``rev`` and close the live sessions it refuses; returns how many."""
        return self.revocations.apply(rev)

    async def load_revocations(self) -> int:
        """Merge the broker's stored revocations into this node's copy."""
        return await self.revocations.load()

    # ------------------------------------------------------------------ requests

    def run(self, sess: Session, req: Request) -> None:
        """Carry out a request :meth:`Session.receive` returned (in the background;
        the reply or error goes to the session when it is done)."""
        task = asyncio.get_running_loop().create_task(self._run(sess, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sess: Session, req: Request) -> None:
        try:
            answer = await self._handlers[req.type](sess, req)
        except ProtocolError as exc:
            exc.id = req.id
            sess.error(exc)
            return
        except BrokerUnavailable as exc:
            sess.error(ProtocolError(Err.UNAVAILABLE, str(exc), req.id))
            return
        except BackendDisconnect as exc:
            sess.disconnect(Disconnect(exc.code, exc.reason))
            return
        except Exception:
            log.exception("internal error handling %s", req.type)
            sess.error(ProtocolError(Err.INTERNAL, "internal error", req.id))
            return
        if answer and not sess.closing:
            sess.send_text(answer)

    async def _subscribe(self, sess: Session, req: Request) -> bytes:
        name = sess.begin_subscribe(req.channel)  # checks; reserves the name meanwhile
        extra: dict[str, Any] = {}
        if self.permissions.proxied("subscribe", name):
            try:
                allowed = await self._ask(sess, "subscribe", {"client": sess.client_id,
                                                              "user": sess.user,
                                                              "channel": name,
                                                              "meta": self._meta(sess)})
                if "data" in allowed:   # e.g. the current price, with the confirmation
                    extra["data"] = allowed["data"]
            except BaseException:
                sess.forget(name)
                raise
            if sess.closing:
                sess.forget(name)
                return b""
        hub = self.hub
        self._pending[name] += 1
        try:
            if not hub.has_subscribers(name):
                await self.broker.subscribe(name)
            if req.since is not None or req.positioned or req.last:
                extra.update(await self.recovery.recover(sess, name, req.since, req.last))
            if sess.closing:
                sess.forget(name)
                return b""
            if self.config.for_channel(name).presence and not channels.is_pattern(name):
                self.presence.join(sess, name)  # pushed to the others, before we are one
            # no await between the history read above and this line (memory broker)
            hub.subscribe(name, sess)
        except BaseException:
            sess.forget(name)
            raise
        finally:
            self._pending[name] -= 1
            if not self._pending[name]:
                del self._pending[name]
                if not hub.has_subscribers(name):
                    self._broker_unsubscribe(name)
        self.subscriptions += 1
        return protocol.reply(req.id, "subscribed", channel=name, **extra)

    async def _unsubscribe(self, sess: Session, req: Request) -> bytes:
        if sess.subs and req.channel in sess.subs:
            self._drop_sub(sess, req.channel)
        return protocol.reply(req.id, "unsubscribed", channel=req.channel)

    def _drop_sub(self, sess: Session, name: str) -> None:
        sess.forget(name)
        if self.hub.unsubscribe(name, sess):
            self.subscriptions -= 1
            if not self.hub.has_subscribers(name) and not self._pending.get(name):
                self._broker_unsubscribe(name)
            if name in self.presence:
                self.presence.leave(sess, name)

    def _broker_unsubscribe(self, name: str) -> None:
        """The node no longer needs ``name``: unsubscribe it on the broker and forget the
        positions it may have delivered (a later subscribe starts them afresh)."""
        self.recovery.forget(name)
        self.spawn(self.broker.unsubscribe(name))

    async def _publish_req(self, sess: Session, req: Request) -> bytes:
        sess.check("publish", req.channel)
        data = req.data
        if self.permissions.proxied("publish", req.channel):
            result = await self._ask(sess, "publish", {"client": sess.client_id,
                                                       "user": sess.user,
                                                       "channel": req.channel, "data": data,
                                                       "meta": self._meta(sess)})
            if "data" in result:   # the backend rewrote it
                data = result["data"]
        sender = {"user": sess.user, "client": sess.client_id}
        meta: dict[str, Any] = {"f": sender}
        if req.ephemeral:
            meta["e"] = 1
        if not req.echo and sess.subs:  # (a session without subscriptions gets nothing)
            meta["x"] = sess.client_id
            self._echoless[sess.client_id] = sess
        res = await self.publish(req.channel, data, req.idempotency_key,
                                 user=sess.user or "", client=sess.client_id,
                                 ephemeral=req.ephemeral, meta=orjson.dumps(meta),
                                 sender=b"" if req.ephemeral else orjson.dumps(sender))
        return protocol.reply(req.id, "published", offset=res.offset, epoch=res.epoch)

    # ------------------------------------------------------------------ backend (SPEC §11)

    @staticmethod
    def _meta(sess: Session) -> Any:
        """The ``meta`` of the session's connect-proxy result (None for JWT sessions)."""
        return sess.backend.meta if sess.backend is not None else None

    async def _ask(self, sess: Session, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """One backend call for ``sess``: its ``result``, or a ProtocolError (429 past
        max_in_flight, the backend's error, 503 down or garbage, 504 slow);
        BackendDisconnect closes the session (:meth:`_run`)."""
        state = sess.backend_state()
        limit = self.config.proxy.max_in_flight
        if state.in_flight >= limit:
            self.rate_limited["proxy"] += 1
            raise ProtocolError(Err.RATE_LIMITED, f"more than {limit} backend calls in flight "
                                "on this connection")
        state.in_flight += 1
        try:
            return await self.proxy.call(kind, body)
        except BackendRefused as exc:
            raise ProtocolError(exc.code, exc.message) from None
        except BackendFailed as exc:
            raise ProtocolError(exc.status, exc.message) from None
        finally:
            state.in_flight -= 1

    async def _rpc(self, sess: Session, req: Request) -> bytes:
        """``rpc``: the backend's ``result.data`` (no ``[proxy] rpc``: 404)."""
        if not self.proxy.enabled("rpc"):
            raise ProtocolError(Err.UNKNOWN_TYPE, "unknown method")
        result = await self._ask(sess, "rpc", {"client": sess.client_id, "user": sess.user,
                                               "method": req.method, "data": req.data,
                                               "meta": self._meta(sess)})
        return protocol.reply(req.id, "rpc", data=result.get("data"))

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """(clients, distinct authenticated users) in ``channel``'s presence, every
        node's when the broker shares presence."""
        return member_counts(await self.presence.members_of(channel))

    async def _presence_stats(self, sess: Session, req: Request) -> bytes:
        self._presence_allowed(sess, req.channel)
        clients, users = await self.presence_stats(req.channel)
        return protocol.reply(req.id, "presence_stats", num_clients=clients, num_users=users)

    def _presence_allowed(self, sess: Session, channel: str) -> None:
        if channels.is_pattern(channel):
            raise ProtocolError(Err.BAD_REQUEST, "presence needs a channel, not a pattern")
        if not self.config.for_channel(channel).presence:
            raise ProtocolError(Err.FORBIDDEN, "presence is not enabled for this namespace")
        sess.check("presence", channel)

    async def connect_proxy(self, transport: str, ip: str, headers: dict[str, str],
                            token: str | None) -> Admission:
        """Put a connection without a valid JWT to the ``[proxy] connect`` backend before
        it is accepted.  Returns the :class:`Admission` (the backend's user, channels,
        expiry and meta, or its ``disconnect``); raises BackendRefused (its 401/403)
        or BackendFailed (down, slow, garbage: refuse with HTTP 503)."""
        client = self.next_client_id()
        body = {"client": client, "transport": transport, "ip": ip,
                "headers": forward_headers(self.config.proxy.headers, headers),
                "token": token}
        try:
            result = await self.proxy.call("connect", body)
        except BackendDisconnect as exc:
            return Admission(client, None, None, Disconnect(exc.code, exc.reason), ip)
        chans = result.get("channels")
        exp = result.get("expire_at")
        ident = auth.Identity(result["user"], float(exp) if exp is not None else None,
                              tuple(chans) if chans is not None else None)
        return Admission(client, ident, result.get("meta"), None, ip)

    def proxied(self, token: str | None) -> bool:
        """Whether the ``[proxy] connect`` backend decides who a new connection is: it
        is set and ``token`` (None: none given) does not verify as a JWT (an expired
        or foreign one goes to the backend like any opaque token)."""
        if self.config.proxy.connect is None:
            return False
        if token:
            try:
                self.auth.verify(token)
                return False
            except auth.AuthError:
                pass
        return True

    async def admission(self, transport: str, ip: str, headers: dict[str, str],
                        token: str | None) -> Admission | tuple[int, str, dict[str, str] | None]:
        """:meth:`connect_proxy` for a transport: the :class:`Admission`, or the HTTP
        refusal ``(status, message, headers)``: the backend's 401/403, or 503 with
        ``Retry-After`` when it is down, slow or answers garbage (fail closed)."""
        try:
            return await self.connect_proxy(transport, ip, headers, token)
        except BackendRefused as exc:
            return exc.code, exc.message or "refused", None
        except BackendFailed:
            return 503, "the authentication backend is unavailable", {"Retry-After": "1"}

    def admit(self, sess: Session, admission: Admission) -> None:
        """Give a new session what its connect-proxy admission says (before it is
        accepted: its client id, identity and meta)."""
        sess.client_id = admission.client
        state = sess.backend_state()
        state.meta = admission.meta
        state.ip = admission.ip
        if admission.ident is not None:
            sess.set_identity(admission.ident)

    # ------------------------------------------------------------------ server API queries

    def local_answer(self, kind: str, args: dict[str, Any]) -> Any:
        """This node's part of a server API query: ``channels`` ({channel: clients} of
        the channels with a subscriber here, matching ``args["pattern"]`` if given) or
        ``info`` (name, version, connections, subscriptions, uptime)."""
        hub = self.hub
        if kind == "channels":
            pattern = args.get("pattern")
            out = {}
            for name in hub.names():
                if channels.is_pattern(name):
                    continue
                if isinstance(pattern, str) and not glob_match(pattern, name):
                    continue
                out[name] = len(hub.subscribers(name))
            return out
        if kind == "info":
            return {"name": self.name, "version": __version__,
                    "connections": hub.connection_count, "subscriptions": self.subscriptions,
                    "uptime": int(time.monotonic() - self.started)}
        return None

    async def gather(self, kind: str, args: dict[str, Any]) -> list[Any]:
        """Every node's :meth:`local_answer` (this node's first): the query goes to the
        others over the broker's control channel; their answers are awaited until as
        many came as the broker counted receivers, or GATHER_TIMEOUT.  Raises
        BrokerUnavailable when the query could not be sent."""
        qid = os.urandom(8).hex()
        answers: list[Any] = []
        done = asyncio.Event()
        self._queries[qid] = (answers, done)
        try:
            sent = await self.broker.send_control(orjson.dumps(
                {"op": "query", "id": qid, "kind": kind, "args": args}))
            others = max(0, int(sent) - 1) if isinstance(sent, int) else 0
            deadline = time.monotonic() + GATHER_TIMEOUT
            while len(answers) < others:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("server API %s: %d of %d other nodes answered within %g s",
                                kind, len(answers), others, GATHER_TIMEOUT)
                    break
                done.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), left)
        finally:
            del self._queries[qid]
        return [self.local_answer(kind, args), *answers]

    # ------------------------------------------------------------------ lifecycle (SPEC §12)

    def connected(self, sess: Session, transport: str, ip: str) -> None:
        """A transport accepted ``sess``: its ``connect`` record (lifecycle_stream)."""
        if self.lifecycle is None:
            return
        state = sess.backend_state()
        state.transport = transport
        state.ip = state.ip or ip
        if not state.logged:
            state.logged = True
            self.lifecycle.connect(sess.client_id, sess.user or "", state.ip, transport)

    async def _history(self, sess: Session, req: Request) -> bytes:
        if channels.is_pattern(req.channel):
            raise ProtocolError(Err.BAD_REQUEST, "history needs a channel, not a pattern")
        sess.check("history", req.channel)
        since = req.since
        hist = await self.broker.history(
            req.channel, limit=req.limit if req.limit is not None else 100,
            since_offset=since.offset if since else None,
            since_epoch=since.epoch if since else None)
        pubs = [protocol.history_item(p) for p in hist.publications]
        return protocol.reply(req.id, "history", publications=pubs, offset=hist.offset,
                              epoch=hist.epoch)

    async def _presence(self, sess: Session, req: Request) -> bytes:
        self._presence_allowed(sess, req.channel)
        members = await self.presence.members_of(req.channel)  # every node's, if shared
        clients = [{"client": cid, "user": user} for cid, user in members.items()]
        return protocol.reply(req.id, "presence", clients=clients)

    async def _auth(self, sess: Session, req: Request) -> bytes:
        """``auth``: authenticate, or refresh the token (and its expiry) of the same user."""
        ident = sess.authenticate(req.token)
        sess.set_identity(ident)
        return protocol.reply(req.id, "authed", user=ident.user)

    # ------------------------------------------------------------------ sessions

    def disconnect_user(self, user: str, d: Disconnect) -> int:
        """Disconnect every session of ``user`` on this node (the ``disconnect`` push,
        then close with ``d.code``); returns how many were closed."""
        n = 0
        for sess in self.hub.connections():
            if sess.user is not None and not sess.closing and channels.same_owner(sess.user, user):
                sess.disconnect(d)
                n += 1
        return n

    def drop(self, sess: Session, close_code: int, reason: str = "") -> None:
        """A session ended with ``close_code`` (and ``reason``, its close frame's text or
        the server's: the lifecycle record's, SPEC §12): remove its subscriptions and
        count the code."""
        self.closed[close_code] += 1
        if sess.backend is not None and sess.backend.logged and self.lifecycle is not None:
            sess.backend.logged = False
            self.lifecycle.disconnect(sess.client_id, close_code,
                                      close_reason(close_code, reason))
        if self._echoless:
            self._echoless.pop(sess.client_id, None)
        self.hub.remove_connection(sess)
        sess.closing = True
        if sess.subs:
            for name in list(sess.subs):
                self._drop_sub(sess, name)
