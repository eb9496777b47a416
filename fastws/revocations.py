"""Token revocations (``POST /api/revoke``): this node's copy of the broker's records.

A revocation refuses every token of a user issued up to a time, or one token by its
``jti``, until it expires.  The broker stores the records (so a node that starts or
reconnects loads them) and a control message tells the live nodes at once; each node
keeps them in two dicts so that checking a token costs no broker round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from fastws.broker import BrokerUnavailable
from fastws.broker.base import Revocation
from fastws.channels import owner_key
from fastws.codes import DISCONNECT_TOKEN_REVOKED

if TYPE_CHECKING:
    from fastws.node import Node

__all__ = ["Revocations"]

log = logging.getLogger("fastws")


class Revocations:
    """The revocations one node knows of, and closing the sessions they refuse."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # owner key of the user (channels.owner_key) -> (revoked at, until); jti -> until
        self.users: dict[str, tuple[float, float]] = {}
        self.jtis: dict[str, float] = {}
        self.loading: asyncio.Task | None = None

    def revoked(self, user: str, issued: float | None, jti: str | None,
                now: float | None = None) -> bool:
        """True if a revocation this node knows of refuses the token of ``user`` with
        ``iat`` ``issued`` and id ``jti``: its jti is revoked, or its user is and its
        ``iat`` is at most the revocation's time (or it has none).  Two dict lookups:
        no broker round trip."""
        if not self.users and not self.jtis:
            return False
        now = time.time() if now is None else now
        if jti is not None:
            until = self.jtis.get(jti)
            if until is not None and until > now:
                return True
        rec = self.users.get(owner_key(user))
        if rec is None or rec[1] <= now:
            return False
        return issued is None or issued <= rec[0]

    def apply(self, rev: Revocation) -> int:
        """Record ``rev`` and disconnect (4501 "token revoked") every live session
        whose token it refuses; returns how many were closed."""
        now = time.time()
        if rev.until <= now:
            return 0
        if rev.kind == "user":
            key = owner_key(rev.key)
            old = self.users.get(key)
            self.users[key] = ((rev.at, rev.until) if old is None else
                               (max(rev.at, old[0]), max(rev.until, old[1])))
        elif rev.kind == "jti":
            self.jtis[rev.key] = max(rev.until, self.jtis.get(rev.key, 0.0))
        else:
            return 0
        self._forget_expired(now)
        n = 0
        hub = self.node.hub
        for sess in hub.connections() if hub is not None else ():
            if sess.user is not None and not sess.closing and self.revoked(
                    sess.user, sess.iat, sess.jti, now):
                sess.disconnect(DISCONNECT_TOKEN_REVOKED)
                n += 1
        return n

    def _forget_expired(self, now: float) -> None:
        """Drop expired revocations (whenever one is added: they are few)."""
        for user in [u for u, r in self.users.items() if r[1] <= now]:
            del self.users[user]
        for jti in [j for j, until in self.jtis.items() if until <= now]:
            del self.jtis[jti]

    def reload(self) -> None:
        """Load the stored revocations in the background (on every broker (re)connect:
        a control message sent while this node was away was missed)."""
        if self.loading is not None and not self.loading.done():
            return
        self.loading = asyncio.get_running_loop().create_task(self.load())

    async def load(self) -> int:
        """Merge every revocation the broker stores into this node's copy, closing the
        live sessions they refuse; returns how many records were read (0 when the
        broker could not answer: the next reconnect tries again)."""
        try:
            revs = await self.node.broker.revocations()
        except (BrokerUnavailable, OSError, TimeoutError) as exc:
            log.warning("could not load the token revocations from the broker: %s", exc)
            return 0
        except Exception:
            log.exception("could not load the token revocations from the broker")
            return 0
        closed = sum(self.apply(r) for r in revs)
        if revs:
            log.info("loaded %d token revocations from the broker (%d connections closed)",
                     len(revs), closed)
        return len(revs)
