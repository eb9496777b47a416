"""The server API (SPEC §9, §11): JSON over HTTP POST, for a backend holding an API key.

* ``POST /api/publish``: one publication object, or an array of them (a batch);
* ``POST /api/disconnect``: close every connection of a user, on every node;
* ``POST /api/revoke``: revoke a user's tokens and/or one token id, on every node;
* ``POST /api/presence``, ``/api/presence_stats``, ``/api/history``: a channel's
  presence (every node's, through the broker) and history;
* ``POST /api/channels``, ``/api/info``: the channels with subscribers and the nodes,
  gathered from every node sharing the broker (:meth:`fastws.node.Node.gather`).

Each handler takes the node, the request's headers and body and returns the whole
answer (:func:`fastws.http.json_response`); :data:`ROUTES` maps a path to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from fastws import channels, protocol
from fastws.broker import BrokerUnavailable
from fastws.broker.base import Revocation
from fastws.channels import owner_key
from fastws.codes import DISCONNECT_BY_API, MAX_CLOSE_REASON, Close, Disconnect
from fastws.http import bearer_token, json_response
from fastws.presence import member_counts

if TYPE_CHECKING:
    from fastws.node import Node

__all__ = ["MAX_BATCH", "MAX_REVOCATION_TTL", "ROUTES", "channels_", "disconnect", "history",
           "info", "key_ok", "presence", "presence_stats", "publish", "revoke"]

log = logging.getLogger("fastws")

MAX_BATCH = 1000                # publications in one POST /api/publish array
MAX_REVOCATION_TTL = 366 * 86400  # seconds a POST /api/revoke record may be kept


def key_ok(node: Node, headers: dict[str, str]) -> bool:
    """True when the request carries one of the configured API keys."""
    keys = node.config.server.api_keys
    return bool(keys) and bearer_token(headers.get("authorization", "")) in keys


def _publication(node: Node, msg: Any) -> tuple[Any, ...] | str:
    """``(channel, data, idempotency_key)`` of one publication object of the API,
    or the reason it is refused."""
    if not isinstance(msg, dict):
        return "a publication must be a JSON object"
    unknown = set(msg) - {"channel", "data", "idempotency_key", "ephemeral"}
    if unknown:
        return f"unknown field {sorted(unknown)[0]!r}"
    if "data" not in msg:
        return "data is required"
    try:
        channel = channels.validate(msg.get("channel"), node.config.limits.max_channel_length,
                                    allow_pattern=False)
    except channels.ChannelError as exc:
        return str(exc)
    key = msg.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > 255):
        return "idempotency_key must be a string of 1-255 chars"
    ephemeral = msg.get("ephemeral")
    if ephemeral is not None and not isinstance(ephemeral, bool):
        return "ephemeral must be a boolean"
    if ephemeral:  # SPEC §13: live subscribers only, offset 0
        return channel, msg["data"], key, True
    return channel, msg["data"], key


def _request(node: Node, headers: dict[str, str], body: bytes) -> Any:
    """The parsed JSON body of an API request, or the 401/400 answer (bytes)."""
    if not key_ok(node, headers):
        return json_response(401, {"error": "a valid API key is required (Authorization: "
                                            "Bearer)"}, {"WWW-Authenticate": "Bearer"})
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json_response(400, {"error": "body must be JSON"})


def _object(node: Node, headers: dict[str, str], body: bytes, fields: set[str]) -> Any:
    """The JSON object of an API request holding only ``fields``, or the 401/400
    answer (bytes)."""
    msg = _request(node, headers, body)
    if isinstance(msg, bytes):
        return msg
    if not isinstance(msg, dict):
        return json_response(400, {"error": "body must be a JSON object"})
    unknown = set(msg) - fields
    if unknown:
        return json_response(400, {"error": f"unknown field {sorted(unknown)[0]!r}"})
    return msg


async def publish(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{"channel": C, "data": D[, "idempotency_key": K]}``, or an array of them:
    publish, answer the offset and epoch (an array of results for an array)."""
    msg = _request(node, headers, body)
    if isinstance(msg, bytes):
        return msg
    if isinstance(msg, list):
        return await _publish_batch(node, msg)
    if not isinstance(msg, dict):
        return json_response(400, {"error": "body must be a JSON object (or an array of them)"})
    item = _publication(node, msg)
    if isinstance(item, str):
        return json_response(400, {"error": item})
    try:
        res = await node.publish(*item[:3], ephemeral=len(item) > 3)
    except BrokerUnavailable as exc:
        return json_response(503, {"error": f"broker unavailable: {exc}"}, {"Retry-After": "1"})
    except protocol.ProtocolError as exc:
        return json_response(400, {"error": exc.message})
    return json_response(200, {"offset": res.offset, "epoch": res.epoch})


async def _publish_batch(node: Node, msgs: list[Any]) -> bytes:
    """A JSON array of publications: each is checked and published on its own (one
    bad item does not stop the others), in the array's order, in one broker batch;
    the answer is an array of one result per item, in order."""
    if not msgs:
        return json_response(400, {"error": "the array of publications is empty"})
    if len(msgs) > MAX_BATCH:
        return json_response(400, {"error": f"more than {MAX_BATCH} publications in one "
                                            "request"})
    for i, msg in enumerate(msgs):  # the request's shape is wrong: nothing is published
        if not isinstance(msg, dict):
            return json_response(400, {"error": f"item {i} of the array is not a JSON object"})
    results: list[Any] = []
    items: list[tuple[Any, ...]] = []
    for msg in msgs:
        item = _publication(node, msg)
        if isinstance(item, str):
            results.append({"error": item, "status": 400})
        else:
            results.append(None)
            items.append(item)
    if items:
        try:
            done = iter(await node.publish_batch(items))
        except BrokerUnavailable as exc:
            return json_response(503, {"error": f"broker unavailable: {exc}"},
                                 {"Retry-After": "1"})
        for i, r in enumerate(results):
            if r is not None:
                continue
            res = next(done)
            if isinstance(res, BrokerUnavailable):
                results[i] = {"error": f"broker unavailable: {res}", "status": 503}
            elif isinstance(res, protocol.ProtocolError):
                results[i] = {"error": res.message, "status": 400}
            else:
                results[i] = {"offset": res.offset, "epoch": res.epoch}
    return json_response(200, results)


async def disconnect(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{"user": U[, "code": 4000-4999][, "reason": R]}``: disconnect every connection
    of U on every node; answers how many this node closed."""
    msg = _object(node, headers, body, {"user", "code", "reason"})
    if isinstance(msg, bytes):
        return msg
    user = msg.get("user")
    if not isinstance(user, str) or not user or len(user) > 255:
        return json_response(400, {"error": "user must be a string of 1-255 chars"})
    code = msg.get("code", DISCONNECT_BY_API.code)
    if not isinstance(code, int) or isinstance(code, bool) or not Close.is_application(code):
        return json_response(400, {"error": "code must be an integer in 4000-4999 (4000-4499: "
                                            "the client reconnects, 4500-4999: it does not)"})
    reason = msg.get("reason", DISCONNECT_BY_API.reason)
    if not isinstance(reason, str) or len(reason.encode()) > MAX_CLOSE_REASON:
        return json_response(400, {"error": f"reason must be a string of at most "
                                            f"{MAX_CLOSE_REASON} bytes (UTF-8)"})
    d = Disconnect(code, reason)
    n = node.disconnect_user(user, d)
    try:
        await node.broker.send_control(orjson.dumps(
            {"op": "disconnect", "user": user, "code": code, "reason": reason}))
    except BrokerUnavailable as exc:
        return json_response(503, {"error": f"broker unavailable: {exc}; this node closed its "
                                            "connections of the user, other nodes were not "
                                            "told", "disconnected": n}, {"Retry-After": "1"})
    log.info("disconnected %d connections of a user (server API)", n,
             extra={"user": user, "code": code})
    return json_response(200, {"disconnected": n})


async def revoke(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{"user": U}`` and/or ``{"jti": J}``, optional ``"ttl"``: revoke every token
    of U issued up to now (``iat`` at most now, or none) and/or the token whose id
    is J, on every node, for ``ttl`` seconds (default ``revocation_ttl``); the live
    connections using them are closed with 4501 "token revoked"."""
    msg = _object(node, headers, body, {"user", "jti", "ttl"})
    if isinstance(msg, bytes):
        return msg
    if "user" not in msg and "jti" not in msg:
        return json_response(400, {"error": "give user, jti or both"})
    targets: list[tuple[str, str]] = []
    for kind in ("user", "jti"):
        if kind in msg:
            value = msg[kind]
            if not isinstance(value, str) or not value or len(value) > 255:
                return json_response(400, {"error": f"{kind} must be a string of 1-255 chars"})
            targets.append((kind, value))
    ttl = msg.get("ttl", node.config.server.revocation_ttl)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or \
            not 1 <= ttl <= MAX_REVOCATION_TTL:
        return json_response(400, {"error": f"ttl must be a number of seconds in 1-"
                                            f"{MAX_REVOCATION_TTL}"})
    now = time.time()
    revs = [Revocation(kind, owner_key(value) if kind == "user" else value, now,
                       now + ttl) for kind, value in targets]
    n = 0
    try:
        stored = [await node.broker.revoke(r) for r in revs]
    except BrokerUnavailable as exc:
        for r in revs:  # this node refuses them anyway, until it restarts
            n += node.apply_revocation(r)
        return json_response(503, {"error": f"broker unavailable: {exc}; the revocation was "
                                            "not stored: only this node refuses the token(s), "
                                            "until it restarts; retry", "disconnected": n},
                             {"Retry-After": "1"})
    for r in stored:
        n += node.apply_revocation(r)
    try:
        for r in stored:
            await node.broker.send_control(orjson.dumps(
                {"op": "revoke", "kind": r.kind, "key": r.key, "at": r.at,
                 "until": r.until}))
    except BrokerUnavailable as exc:
        return json_response(503, {"error": f"broker unavailable: {exc}; the revocation is "
                                            "stored, but other nodes were not told: they "
                                            "refuse the token(s) after their next broker "
                                            "reconnect or restart; retry", "disconnected": n},
                             {"Retry-After": "1"})
    log.info("revoked tokens (%s); %d connections closed here",
             ", ".join(kind for kind, _ in targets), n,
             extra={"user": msg.get("user")})
    return json_response(200, {"disconnected": n, "at": now,
                               "until": max(r.until for r in stored)})


def _channel(node: Node, msg: dict[str, Any]) -> str | bytes:
    """The ``channel`` of a query (a channel, not a pattern), or the 400 answer."""
    try:
        return channels.validate(msg.get("channel"), node.config.limits.max_channel_length,
                                 allow_pattern=False)
    except channels.ChannelError as exc:
        return json_response(400, {"error": str(exc)})


def _unavailable(exc: BrokerUnavailable) -> bytes:
    return json_response(503, {"error": f"broker unavailable: {exc}"}, {"Retry-After": "1"})


async def _presence_members(node: Node, headers: dict[str, str], body: bytes
                            ) -> dict[str, str | None] | bytes:
    msg = _object(node, headers, body, {"channel"})
    if isinstance(msg, bytes):
        return msg
    channel = _channel(node, msg)
    if isinstance(channel, bytes):
        return channel
    if not node.config.for_channel(channel).presence:
        return json_response(400, {"error": "presence is not enabled for this namespace"})
    try:
        return await node.presence.members_of(channel)
    except BrokerUnavailable as exc:
        return _unavailable(exc)


def _stats(members: dict[str, str | None]) -> dict[str, int]:
    clients, users = member_counts(members)
    return {"num_clients": clients, "num_users": users}


async def presence(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{"channel": C}``: every node's presence members of C, and their counts."""
    members = await _presence_members(node, headers, body)
    if isinstance(members, bytes):
        return members
    clients = [{"client": cid, "user": user} for cid, user in members.items()]
    return json_response(200, {"clients": clients, **_stats(members)})


async def presence_stats(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{"channel": C}``: how many clients and distinct users are in C's presence."""
    members = await _presence_members(node, headers, body)
    if isinstance(members, bytes):
        return members
    return json_response(200, _stats(members))


async def history(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{"channel": C, "limit": N[, "since": {"offset", "epoch"}]}``: the protocol's
    history reply (publications oldest first, the stream's offset and epoch)."""
    msg = _object(node, headers, body, {"channel", "limit", "since"})
    if isinstance(msg, bytes):
        return msg
    channel = _channel(node, msg)
    if isinstance(channel, bytes):
        return channel
    limit = msg.get("limit", 100)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return json_response(400, {"error": "limit must be a non-negative integer"})
    since = msg.get("since")
    try:
        pos = protocol._since(since, None) if since is not None else None
        hist = await node.broker.history(
            channel, limit=min(limit, protocol.MAX_HISTORY_LIMIT),
            since_offset=pos.offset if pos else None, since_epoch=pos.epoch if pos else None)
    except protocol.ProtocolError as exc:
        return json_response(400, {"error": exc.message})
    except BrokerUnavailable as exc:
        return _unavailable(exc)
    pubs = [protocol.history_item(p) for p in hist.publications]
    return json_response(200, {"type": "history", "publications": pubs, "offset": hist.offset,
                               "epoch": hist.epoch})


async def channels_(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{}`` or ``{"pattern": P}``: the channels with at least one subscriber on any
    node (matching P), with how many connections each reaches."""
    msg = _object(node, headers, body or b"{}", {"pattern"})
    if isinstance(msg, bytes):
        return msg
    pattern = msg.get("pattern")
    if pattern is not None and (not isinstance(pattern, str) or not pattern):
        return json_response(400, {"error": "pattern must be a non-empty string"})
    try:
        parts = await node.gather("channels", {"pattern": pattern} if pattern else {})
    except BrokerUnavailable as exc:
        return _unavailable(exc)
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, n in (part or {}).items():
            out.setdefault(name, {"num_clients": 0})["num_clients"] += int(n)
    return json_response(200, {"channels": out})


async def info(node: Node, headers: dict[str, str], body: bytes) -> bytes:
    """``{}``: every node sharing the broker: name, version, connections,
    subscriptions, uptime (seconds)."""
    msg = _object(node, headers, body or b"{}", set())
    if isinstance(msg, bytes):
        return msg
    try:
        parts = await node.gather("info", {})
    except BrokerUnavailable as exc:
        return _unavailable(exc)
    return json_response(200, {"nodes": [p for p in parts if isinstance(p, dict)]})


# path -> handler; every route answers only POST
ROUTES: dict[str, Callable[[Node, dict[str, str], bytes], Awaitable[bytes]]] = {
    "/api/publish": publish,
    "/api/disconnect": disconnect,
    "/api/revoke": revoke,
    "/api/presence": presence,
    "/api/presence_stats": presence_stats,
    "/api/history": history,
    "/api/channels": channels_,
    "/api/info": info,
}
