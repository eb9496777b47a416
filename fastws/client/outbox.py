"""The offline outbox of the Python client (SPEC §13), in memory.

:meth:`fastws.client.Client.publish` puts every publication here, with an
``idempotency_key`` made at the call.  While connected it is sent at once; while not,
it waits; on every (re)connect everything still unanswered goes out again, in the
order of the calls, with the same keys, so a publication whose reply was lost is
published once.  The request timeout of an entry runs only while it is sent on a
live connection (a lost connection stops it; the next send starts it afresh); a
queued entry waits for as long as the client keeps reconnecting.  At most
``limit`` entries wait; one more is refused with :class:`OutboxFull`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from fastws.client._link import _Conn, _ConnectionLost
from fastws.errors import FastWSError, RequestError, RequestTimeout

__all__ = ["Outbox", "OutboxFull", "OUTBOX_LIMIT", "new_key"]

OUTBOX_LIMIT = 1000


class OutboxFull(FastWSError):
    """``publish()`` found the outbox holding its limit of unsent publications."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the outbox is full: {limit} publications are waiting to be "
                         f"sent (the limit is {limit})")
        self.limit = limit


def new_key() -> str:
    """A fresh idempotency key (unique per publication call)."""
    return uuid.uuid4().hex


class _Entry:
    __slots__ = ("msg", "fut", "timer")

    def __init__(self, msg: dict[str, Any], fut: asyncio.Future[dict[str, Any]]) -> None:
        self.msg = msg
        self.fut = fut
        self.timer: asyncio.TimerHandle | None = None


class Outbox:
    """Publications not yet answered, in call order (see the module docstring)."""

    def __init__(self, new_id: Callable[[], int], timeout: Callable[[], float],
                 limit: int = OUTBOX_LIMIT) -> None:
        self._new_id = new_id
        self._timeout = timeout
        self.limit = limit
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, msg: dict[str, Any], conn: _Conn | None) -> asyncio.Future[dict[str, Any]]:
        """Queue the publish request ``msg`` (sent now on ``conn`` when it is live);
        its future gets the ``published`` reply.  Raises :class:`OutboxFull`."""
        if len(self._entries) >= self.limit:
            raise OutboxFull(self.limit)
        entry = _Entry(msg, asyncio.get_running_loop().create_future())
        self._entries.append(entry)
        if conn is not None and conn.connected:
            self._send(conn, entry)
        return entry.fut

    def flush(self, conn: _Conn) -> None:
        """A new connection: send every unanswered entry again, in order."""
        for entry in list(self._entries):
            self._send(conn, entry)

    def fail(self, exc: BaseException) -> None:
        """The client stopped for good: every entry raises ``exc``."""
        entries, self._entries = self._entries, []
        for entry in entries:
            self._settle(entry, exc)

    def _send(self, conn: _Conn, entry: _Entry) -> None:
        rid = self._new_id()

        def handler(reply: dict[str, Any] | BaseException) -> None:
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
            if isinstance(reply, _ConnectionLost):
                return  # kept: sent again (same key) on the next connection
            if isinstance(reply, dict) and reply.get("type") == "error":
                reply = RequestError(int(reply.get("code", 0)), str(reply.get("message", "")))
            self._remove(entry)
            self._settle(entry, reply)

        def expire() -> None:
            conn.pending.pop(rid, None)
            self._remove(entry)
            self._settle(entry, RequestTimeout(
                f"no reply to 'publish' within {self._timeout()} s"))

        conn.pending[rid] = handler
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer = asyncio.get_running_loop().call_later(self._timeout(), expire)
        try:
            conn.send({**entry.msg, "id": rid})
        except _ConnectionLost:
            conn.pending.pop(rid, None)
            entry.timer.cancel()
            entry.timer = None

    def _remove(self, entry: _Entry) -> None:
        try:
            self._entries.remove(entry)
        except ValueError:
            pass

    @staticmethod
    def _settle(entry: _Entry, result: dict[str, Any] | BaseException) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.fut.done():
            return
        if isinstance(result, BaseException):
            entry.fut.set_exception(result)
        else:
            entry.fut.set_result(result)
