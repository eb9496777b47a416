"""Stream cursors of the fallback transports (SPEC §10), sans I/O.

A cursor names the position of every subscription of one SSE stream or long-poll
request in one URL-safe string: the unpadded base64url of compact JSON mapping each
channel or pattern to its position, ``[offset, epoch]`` for a channel (its last event,
or where its stream was when subscribed), ``[offset, epoch, channel]`` for a pattern's
last event (looked up in the namespace's log, docs/history.md), ``[offset, epoch]``
for a pattern's position in that log, or ``null`` when nothing is known yet::

    {"events:a":[42,"e1"],"events:*":[7,"e1","events:b"],"chat:x":null}

Only ``A–Z a–z 0–9 - _`` appear in it.  Clients treat it as opaque; the browser
client (fastws.js) builds one from its own positions when it changes transports.
:func:`advance` moves positions with each message sent, exactly as the clients move
``since``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from fastws import channels
from fastws._match import glob_match
from fastws.protocol import Since

__all__ = ["MAX_CURSOR", "CursorError", "Positions", "advance", "decode", "encode", "since"]

MAX_CURSOR = 4096               # characters a cursor may have (what the server accepts)

#: name → position (a list, see the module docstring) or None; never changed in place
Positions = dict[str, Any]


class CursorError(ValueError):
    """A cursor that does not parse."""


def encode(positions: Positions) -> bytes:
    """The cursor of ``positions`` (ASCII bytes)."""
    return base64.urlsafe_b64encode(orjson.dumps(positions)).rstrip(b"=")


def decode(text: str) -> Positions:
    """The positions a cursor names; raises :class:`CursorError` when it does not parse."""
    if len(text) > MAX_CURSOR:
        raise CursorError(f"cursor longer than {MAX_CURSOR} characters")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        obj = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise CursorError("cursor does not parse") from None
    if not isinstance(obj, dict):
        raise CursorError("cursor does not parse")
    for name, pos in obj.items():
        if pos is not None and not _valid(pos):
            raise CursorError(f"cursor position of {name[:60]!r} does not parse")
    return obj


def _valid(pos: Any) -> bool:
    if not isinstance(pos, list) or len(pos) not in (2, 3):
        return False
    offset, epoch = pos[0], pos[1]
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        return False
    return isinstance(epoch, str) and (len(pos) == 2 or isinstance(pos[2], str))


def since(pos: Any) -> Since | None:
    """The ``since`` of a subscribe resuming from ``pos`` (None: no position)."""
    if pos is None:
        return None
    return Since(pos[0], pos[1], pos[2] if len(pos) == 3 else "")


def advance(positions: Positions, msg: dict[str, Any]) -> Positions | None:
    """The positions after the client received ``msg`` (a decoded protocol message),
    or None when it moves none: an ``event`` with an offset moves every subscription it
    matches; a ``subscribed`` reply sets where a stream is unless events already said
    more (the same rule as the clients')."""
    typ = msg.get("type")
    if typ == "event":
        offset, epoch, channel = msg.get("offset"), msg.get("epoch"), msg.get("channel")
        if not offset or not isinstance(channel, str):
            return None
        new = None
        for name in positions:
            if name == channel:
                pos = [offset, epoch]
            elif channels.is_pattern(name) and glob_match(name, channel):
                pos = [offset, epoch, channel]
            else:
                continue
            if new is None:
                new = dict(positions)
            new[name] = pos
        return new
    if typ == "subscribed":
        name = msg.get("channel")
        if name not in positions or msg.get("recovered") is True:
            return None
        old = positions[name]
        offset, epoch = msg.get("offset"), msg.get("epoch")
        if not isinstance(offset, int):
            return None
        if old is not None and (len(old) == 3 if channels.is_pattern(name)
                                else old[1] == epoch and old[0] >= offset and
                                msg.get("recovered") is None):
            return None                    # an event after the subscribe said more
        new = dict(positions)
        new[name] = [offset, epoch]
        return new
    return None
