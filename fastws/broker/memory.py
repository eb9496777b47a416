"""The in-memory broker: one process, history in bounded deques, no network.

Token revocations are kept in a dict with their expiry (:meth:`Broker.revoke`).
Every call completes without suspending, so a subscribe that reads history and then
registers the subscription cannot miss or duplicate a publication in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import deque
from typing import Any

from fastws.broker.base import Broker, BrokerHandler, HistoryResult, PublishResult, StreamAppend

__all__ = ["MemoryBroker"]

IDEMPOTENCY_TTL = 300.0
SWEEP_INTERVAL = 5.0


class _Stream:
    """One channel's history: offsets increase by one; the epoch names this stream."""

    __slots__ = ("epoch", "top", "items", "expires")

    def __init__(self) -> None:
        self.epoch = os.urandom(4).hex()
        self.top = 0
        self.items: deque[tuple[Any, ...]] = deque()  # (offset, *what was kept)
        self.expires = 0.0


class MemoryBroker(Broker):
    """Single-process broker: publications go straight to the handler."""

    def __init__(self) -> None:
        self._handler: BrokerHandler | None = None
        self._streams: dict[str, _Stream] = {}
        self._logs: dict[str, _Stream] = {}  # namespace logs (pattern recovery)
        self._idem: dict[tuple[str, str], tuple[PublishResult, float]] = {}
        self._once: dict[str, float] = {}       # claim_once keys -> expiry
        self._sweeper: asyncio.Task | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self.up = True
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def close(self) -> None:
        self.up = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    keeps_logs = True

    async def publish(self, channel: str, data: bytes, *, history_size: int,
                      history_ttl: float, idempotency_key: str | None = None,
                      log: tuple[str, int] | None = None,
                      stream: StreamAppend | None = None, meta: bytes = b"",
                      sender: bytes = b"") -> PublishResult:
        accepted = time.monotonic()
        if idempotency_key is not None:
            seen = self._idem.get((channel, idempotency_key))
            if seen is not None and seen[1] > accepted:
                return seen[0]
        offset, epoch = 0, ""
        stream: _Stream | None = None
        if history_size > 0:
            stream = self._next(self._streams, channel, history_ttl, accepted)
            offset, epoch = stream.top, stream.epoch
            items = stream.items  # (offset, data), with the sender third when there is one
            items.append((offset, data, sender) if sender else (offset, data))
            while len(items) > history_size:
                items.popleft()
        result = PublishResult(offset, epoch)
        if idempotency_key is not None:
            self._idem[(channel, idempotency_key)] = (result, accepted + IDEMPOTENCY_TTL)
        extra = {"meta": meta} if meta else {}
        if stream is not None and log is not None and log[1] > 0:
            nslog = self._next(self._logs, log[0], history_ttl, accepted)
            items = nslog.items
            items.append((nslog.top, channel, offset, epoch, data, sender) if sender
                         else (nslog.top, channel, offset, epoch, data))
            while len(items) > log[1]:
                items.popleft()
            if self._handler is not None:
                self._handler.handle_publication(channel, data, offset, epoch, accepted,
                                                 nslog.top, nslog.epoch, **extra)
            return result
        if self._handler is not None and meta:
            self._handler.handle_publication(channel, data, offset, epoch, accepted, meta=meta)
        elif self._handler is not None:
            self._handler.handle_publication(channel, data, offset, epoch, accepted)
        return result

    @staticmethod
    def _next(streams: dict[str, _Stream], name: str, ttl: float, now: float) -> _Stream:
        """The stream ``name`` (a new epoch if it had expired), its top moved on by one
        for the entry about to be kept."""
        stream = streams.get(name)
        if stream is None or (stream.expires and stream.expires <= now):
            stream = streams[name] = _Stream()
        stream.top += 1
        stream.expires = now + ttl
        return stream

    async def claim_once(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        expiry = self._once.get(key)
        if expiry is not None and expiry > now:
            return False
        self._once[key] = now + ttl
        return True

    async def subscribe(self, name: str) -> None:
        return None

    async def unsubscribe(self, name: str) -> None:
        return None

    async def history(self, channel: str, *, limit: int, since_offset: int | None = None,
                      since_epoch: str | None = None) -> HistoryResult:
        return self._read(self._streams.get(channel), limit, since_offset, since_epoch)

    async def log_history(self, namespace: str, *, limit: int, since_channel: str,
                          since_offset: int, since_epoch: str) -> HistoryResult:
        nslog = self._logs.get(namespace)
        if not since_channel:  # a position in the log itself
            return self._read(nslog, limit, since_offset, since_epoch)
        if nslog is None or nslog.expires <= time.monotonic():
            return HistoryResult([], 0, "", False)
        want = (since_channel, since_offset, since_epoch)
        items = nslog.items
        found = None
        for i in range(len(items) - 1, -1, -1):  # recent positions sit near the end
            if items[i][1:4] == want:
                found = i
                break
        if found is None:
            return HistoryResult([], nslog.top, nslog.epoch, False)
        pubs = list(itertools.islice(items, found + 1, found + 1 + limit))
        return HistoryResult(pubs, nslog.top, nslog.epoch, True)

    @staticmethod
    def _read(stream: _Stream | None, limit: int, since_offset: int | None,
              since_epoch: str | None) -> HistoryResult:
        now = time.monotonic()
        if stream is None or (stream.expires and stream.expires <= now):
            # Nothing kept: a position in some earlier stream cannot be recovered.
            recovered = since_offset is None or (since_offset == 0)
            return HistoryResult([], 0, "", recovered)
        if since_offset is None:
            items = list(stream.items)
            pubs = items[-limit:] if limit else []
            return HistoryResult(pubs, stream.top, stream.epoch, True)
        if since_epoch not in (None, "", stream.epoch):
            return HistoryResult([], stream.top, stream.epoch, False)
        first_kept = stream.items[0][0] if stream.items else stream.top + 1
        recovered = since_offset + 1 >= first_kept and since_offset <= stream.top
        pubs = [item for item in stream.items if item[0] > since_offset][:limit]
        return HistoryResult(pubs, stream.top, stream.epoch, recovered)

    def channel_count(self) -> int:
        """Channels holding history now (for tests and metrics)."""
        return len(self._streams)

    def sweep(self, now: float | None = None) -> None:
        """Free expired history, idempotency, claim_once keys and token revocations without
        waiting for a read."""
        now = time.monotonic() if now is None else now
        for streams in (self._streams, self._logs):
            for name in [n for n, s in streams.items() if s.expires <= now]:
                del streams[name]
        for key in [k for k, v in self._idem.items() if v[1] <= now]:
            del self._idem[key]
        for once in [k for k, exp in self._once.items() if exp <= now]:
            del self._once[once]
        if self._revoked:  # (token revocations: unix times, see Broker.revoke)
            wall = time.time()
            for key in [k for k, r in self._revoked.items() if r.until <= wall]:
                del self._revoked[key]

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()
