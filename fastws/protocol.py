"""Protocol v1, sans I/O: client messages in, validated requests and reply bytes out.

Nothing here touches sockets, picows, asyncio or a broker.  :func:`parse` turns one
text frame into a :class:`Request` or raises :class:`ProtocolError` carrying the
error reply's code; the ``reply_*`` helpers build the exact bytes the server sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fastws import channels
from fastws.codes import Err

__all__ = [
    "TYPES", "Since", "Request", "ProtocolError", "parse", "reply", "error_reply",
    "event_payload", "event_payload_from", "replay_payload", "history_item",
    "disconnect_payload",
]

TYPES = frozenset(
    {"subscribe", "unsubscribe", "publish", "history", "presence", "auth", "ping", "rpc",
     "presence_stats"}
)
MAX_METHOD = 255                # characters of an rpc method name
_MAX_ID = 2**63 - 1
MAX_HISTORY_LIMIT = 1000


@dataclass(slots=True, frozen=True)
class Since:
    """A stream position: the last offset a client has, in a given epoch.

    For a pattern, ``channel`` names the channel of that last event (the position is
    looked up in the namespace's log: docs/history.md)."""

    offset: int
    epoch: str
    channel: str = ""


@dataclass(slots=True)
class Request:
    """One validated client request."""

    type: str
    id: int | None = None
    channel: str = ""
    data: Any = None
    since: Since | None = None
    positioned: bool = False  # subscribe: answer the stream's position (docs/history.md)
    limit: int | None = None
    token: str = ""
    method: str = ""                  # rpc
    last: int = 0                     # subscribe: the newest N publications first (SPEC §13)
    ephemeral: bool = False           # publish: live subscribers only, no history
    echo: bool = True                 # publish: False keeps it from the sender
    idempotency_key: str | None = None  # publish: the same key publishes once


MAX_LAST = 100
MAX_IDEMPOTENCY_KEY = 255


class ProtocolError(Exception):
    """A request that gets an ``error`` reply (the connection stays open)."""

    def __init__(self, code: int, message: str, id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


def _since(value: object, id: int | None) -> Since:
    if not isinstance(value, dict):
        raise ProtocolError(Err.BAD_REQUEST, "since must be an object {offset, epoch}", id)
    offset = value.get("offset")
    epoch = value.get("epoch", "")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError(Err.BAD_REQUEST, "since.offset must be a non-negative integer", id)
    if not isinstance(epoch, str):
        raise ProtocolError(Err.BAD_REQUEST, "since.epoch must be a string", id)
    channel = value.get("channel", "")
    if not isinstance(channel, str) or len(channel) > 1024:
        raise ProtocolError(Err.BAD_REQUEST, "since.channel must be a channel name", id)
    return Since(offset, epoch, channel)


def parse(payload: bytes | str, max_channel_length: int = 255) -> Request:
    """Parse and validate one client message.

    Raises ProtocolError(400) for bad JSON or fields, (404) for an unknown type.
    """
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ProtocolError(Err.BAD_REQUEST, "invalid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError(Err.BAD_REQUEST, "message must be a JSON object")
    id = msg.get("id")
    if id is not None and (not isinstance(id, int) or isinstance(id, bool)
                           or not 0 <= id <= _MAX_ID):
        raise ProtocolError(Err.BAD_REQUEST, "id must be a non-negative integer")
    typ = msg.get("type")
    if not isinstance(typ, str):
        raise ProtocolError(Err.BAD_REQUEST, "type must be a string", id)
    if typ not in TYPES:
        raise ProtocolError(Err.UNKNOWN_TYPE, f"unknown type {typ[:40]!r}", id)
    req = Request(typ, id)
    if typ in ("ping",):
        return req
    if typ == "rpc":
        method = msg.get("method")
        if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD:
            raise ProtocolError(Err.BAD_REQUEST, f"method must be a string of 1-{MAX_METHOD} "
                                "chars", id)
        req.method = method
        req.data = msg.get("data")
        return req
    if typ == "auth":
        token = msg.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(Err.BAD_REQUEST, "token must be a non-empty string", id)
        req.token = token
        return req
    if "channel" not in msg:
        raise ProtocolError(Err.BAD_REQUEST, "channel is required", id)
    try:
        req.channel = channels.validate(
            msg["channel"], max_channel_length, allow_pattern=typ in ("subscribe", "unsubscribe")
        )
    except channels.ChannelError as exc:
        raise ProtocolError(Err.BAD_REQUEST, str(exc), id) from None
    if typ == "publish":
        if "data" not in msg:
            raise ProtocolError(Err.BAD_REQUEST, "data is required", id)
        req.data = msg["data"]
        _publish_options(req, msg, id)
    elif typ in ("subscribe", "history"):
        if msg.get("since") is not None:
            req.since = _since(msg["since"], id)
        req.positioned = msg.get("positioned") is True
        if typ == "history":
            limit = msg.get("limit", 100)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ProtocolError(Err.BAD_REQUEST, "limit must be a non-negative integer", id)
            req.limit = min(limit, MAX_HISTORY_LIMIT)
        elif msg.get("last") is not None:
            last = msg["last"]
            if (not isinstance(last, int) or isinstance(last, bool)
                    or not 1 <= last <= MAX_LAST):
                raise ProtocolError(Err.BAD_REQUEST,
                                    f"last must be an integer from 1 to {MAX_LAST}", id)
            req.last = last
    return req


def _publish_options(req: Request, msg: dict[str, Any], id: int | None) -> None:
    """``ephemeral``, ``echo`` and ``idempotency_key`` of a publish (SPEC §13)."""
    for name in ("ephemeral", "echo"):
        value = msg.get(name)
        if value is not None and not isinstance(value, bool):
            raise ProtocolError(Err.BAD_REQUEST, f"{name} must be a boolean", id)
    req.ephemeral = msg.get("ephemeral") is True
    req.echo = msg.get("echo") is not False
    key = msg.get("idempotency_key")
    if key is not None:
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ProtocolError(Err.BAD_REQUEST, "idempotency_key must be a string of "
                                f"1-{MAX_IDEMPOTENCY_KEY} chars", id)
        req.idempotency_key = key


def reply(id: int | None, typ: str, **fields: Any) -> bytes:
    """Bytes of a reply ``{"id":…,"type":…,…}`` (``id`` left out when None)."""
    msg: dict[str, Any] = {"id": id} if id is not None else {}
    msg["type"] = typ
    msg.update(fields)
    return orjson.dumps(msg)


def error_reply(id: int | None, code: int, message: str) -> bytes:
    """Bytes of an ``error`` reply."""
    return reply(id, "error", code=code, message=message)


def event_payload(channel: str, data_json: bytes, offset: int = 0, epoch: str = "") -> bytes:
    """Bytes of an ``event`` push; ``data_json`` is already-encoded JSON.

    ``offset``/``epoch`` are left out for publications without history (offset 0).
    """
    if offset:
        return orjson.dumps({"type": "event", "channel": channel, "offset": offset,
                             "epoch": epoch, "data": orjson.Fragment(data_json)})
    return orjson.dumps({"type": "event", "channel": channel,
                         "data": orjson.Fragment(data_json)})


def event_payload_from(channel: str, data_json: bytes, offset: int, epoch: str,
                       ephemeral: bool, sender: dict[str, Any] | None) -> bytes:
    """Bytes of an ``event`` push with the SPEC §13 fields: ``"ephemeral":true`` (no
    offset/epoch) and/or ``from`` ({user, client} of the publishing client)."""
    msg: dict[str, Any] = {"type": "event", "channel": channel}
    if offset and not ephemeral:
        msg["offset"] = offset
        msg["epoch"] = epoch
    if ephemeral:
        msg["ephemeral"] = True
    if sender is not None:
        msg["from"] = sender
    msg["data"] = orjson.Fragment(data_json)
    return orjson.dumps(msg)


def replay_payload(channel: str, data_json: bytes, offset: int, epoch: str,
                   sender: bytes | None = None) -> bytes:
    """Bytes of an ``event`` push replayed from history (``since``, ``last``): as the
    live push was, with ``from`` when the publication was kept with its ``sender``
    (the encoded JSON ``{"user", "client"}``, SPEC §13)."""
    if sender is None:
        return event_payload(channel, data_json, offset, epoch)
    return orjson.dumps({"type": "event", "channel": channel, "offset": offset,
                         "epoch": epoch, "from": orjson.Fragment(sender),
                         "data": orjson.Fragment(data_json)})


def history_item(pub: tuple[Any, ...]) -> dict[str, Any]:
    """One publication of a ``history`` reply (or ``POST /api/history``) from a broker's
    ``(offset, data[, sender])``: ``{"offset", "data", "from"?}``."""
    if len(pub) > 2:
        return {"offset": pub[0], "data": orjson.Fragment(pub[1]),
                "from": orjson.Fragment(pub[2])}
    return {"offset": pub[0], "data": orjson.Fragment(pub[1])}


def disconnect_payload(code: int, reason: str, reconnect: bool, after_ms: int) -> bytes:
    """Bytes of a ``disconnect`` push sent before a server-initiated close."""
    return orjson.dumps({"type": "disconnect", "code": code, "reason": reason,
                         "reconnect": reconnect, "after_ms": after_ms})
