"""Presence: who is subscribed to a channel, on this node and (shared brokers) all.

A session subscribing to a channel of a namespace with ``presence = true`` joins it:
the others get a ``join`` push, and the broker records the member so that every node
answers ``presence`` the same; unsubscribing or disconnecting leaves it (``leave``).
Members of other nodes reach this one through :meth:`Presence.handle_presence`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson

from fastws._fanout import make_frame

if TYPE_CHECKING:
    from fastws.node import Node
    from fastws.session import Session

__all__ = ["Presence", "member_counts"]


def member_counts(members: dict[str, str | None]) -> tuple[int, int]:
    """(clients, distinct authenticated users) of a channel's presence members."""
    return len(members), len({u for u in members.values() if u is not None})


class Presence:
    """This node's presence members and the join/leave pushes."""

    def __init__(self, node: Node) -> None:
        self.node = node
        #: channel -> {client id: user} of this node's members
        self.members: dict[str, dict[str, str | None]] = {}

    def __contains__(self, channel: str) -> bool:
        return channel in self.members

    def join(self, sess: Session, channel: str) -> None:
        """``sess`` joins ``channel``: pushed to the others, recorded in the broker."""
        self.members.setdefault(channel, {})[sess.client_id] = sess.user
        self._push("join", channel, sess.client_id, sess.user)
        self._spawn(self.node.broker.presence_join(channel, sess.client_id, sess.user))

    def leave(self, sess: Session, channel: str) -> None:
        """``sess`` left ``channel`` (unsubscribed or gone); nothing if it was no member."""
        members = self.members.get(channel)
        if members is None or members.pop(sess.client_id, 0) == 0:
            return
        if not members:
            del self.members[channel]
        self._push("leave", channel, sess.client_id, sess.user)
        self._spawn(self.node.broker.presence_leave(channel, sess.client_id, sess.user))

    async def members_of(self, channel: str) -> dict[str, str | None]:
        """Every member of ``channel``: all nodes' when the broker shares presence,
        else this node's."""
        members = await self.node.broker.presence(channel)
        if members is None:
            members = self.members.get(channel, {})
        return members

    def handle_presence(self, channel: str, typ: str, client: str, user: str | None) -> None:
        """Broker callback: a client of another node joined or left ``channel``."""
        if channel in self.members or self.node.hub.has_subscribers(channel):
            self._push(typ, channel, client, user)

    def _push(self, typ: str, channel: str, client: str, user: str | None) -> None:
        payload = orjson.dumps({"type": typ, "channel": channel, "client": client,
                                "user": user})
        # exact subscribers only, and not a publication (no publication metric)
        self.node.hub.broadcast(channel, make_frame(payload), -1.0, True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        self.node.spawn(coro)

