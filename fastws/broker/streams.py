"""The connection lifecycle stream (SPEC §12): ``connect`` and ``disconnect`` records.

:class:`LifecycleLog` writes one ``connect`` record per accepted connection and one
``disconnect`` record when it ends, to the Redis stream ``fastws:lifecycle``, through
the Redis broker's command connection (the scripts and key layout are in
:mod:`fastws.broker.redis_scripts`).  Records are written in the order the node saw
the events, by one writer task: at once (well within the 1 s the contract allows),
and again every :attr:`RETRY` seconds while Redis is away, so none is lost to a short
outage.  Every :attr:`sweep_interval` the writer refreshes this node's liveness and
closes out the connections of nodes whose liveness expired ("node lost", code 1006):
the record and the removal of the connection's entry are one script, so each
connection gets exactly one ``disconnect``, from its node or from one survivor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from fastws.broker.base import BrokerUnavailable
from fastws.broker.redis_scripts import LIFECYCLE_CONNS, LIFECYCLE_NODES, LIFECYCLE_STREAM

if TYPE_CHECKING:
    from fastws.broker.redis import RedisBroker

__all__ = ["LifecycleLog", "LIFECYCLE_MAXLEN"]

log = logging.getLogger("fastws.broker")

LIFECYCLE_MAXLEN = 1_000_000
BATCH = 500                     # records written per pipeline


class LifecycleLog:
    """The lifecycle records of one node (see the module docstring)."""

    RETRY = 0.5                 # seconds between two tries while Redis is away

    def __init__(self, broker: RedisBroker, node: str, *, sweep_interval: float | None = None,
                 expiry: float | None = None) -> None:
        from fastws.broker import redis as timings  # the presence sweep's (tests tune them)

        self.broker = broker
        self.node = node
        self.sweep_interval = (timings.PRESENCE_REFRESH if sweep_interval is None
                               else sweep_interval)
        self.expiry = timings.PRESENCE_EXPIRY if expiry is None else expiry
        self.written = 0
        self.swept = 0
        self._queue: deque[tuple[str, list[str], list[Any]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._hash = LIFECYCLE_CONNS + node

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, flush_within: float = 1.0) -> None:
        """Write what is queued (for up to ``flush_within`` seconds), then stop."""
        if self._task is None:
            return
        deadline = time.monotonic() + flush_within
        while self._queue and time.monotonic() < deadline and self.broker.up:
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def connect(self, client: str, user: str, ip: str, transport: str) -> None:
        """Queue the ``connect`` record of an accepted connection."""
        entry = orjson.dumps([user, ip, transport]).decode()
        self._put("lcconnect", [LIFECYCLE_STREAM, self._hash, LIFECYCLE_NODES],
                  [LIFECYCLE_MAXLEN, client, entry, self.node, int(self.expiry * 1000),
                   int(time.time() * 1000), user, ip, transport])

    def disconnect(self, client: str, code: int, reason: str = "") -> None:
        """Queue the ``disconnect`` record of a connection whose ``connect`` was queued."""
        self._put("lcdisconnect", [LIFECYCLE_STREAM, self._hash],
                  [LIFECYCLE_MAXLEN, client, self.node, int(time.time() * 1000), code,
                   reason])

    def _put(self, script: str, keys: list[str], args: list[Any]) -> None:
        self._queue.append((script, keys, args))
        self._wake.set()

    async def sweep(self) -> int:
        """Refresh this node's liveness and close out dead nodes' connections now;
        returns how many ``node lost`` records were written."""
        n = await self.broker._eval(LIFECYCLE_STREAM, "lcsweep",
                                    [LIFECYCLE_STREAM, LIFECYCLE_NODES],
                                    [LIFECYCLE_MAXLEN, LIFECYCLE_CONNS, self.node,
                                     int(self.expiry * 1000)])
        if n:
            self.swept += n
            log.info("lifecycle: %d connections of lost nodes closed out", n)
        return n

    async def _run(self) -> None:
        next_sweep = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sweep and self.broker.up:
                try:
                    await self.sweep()
                    next_sweep = now + self.sweep_interval
                except (BrokerUnavailable, OSError) as exc:
                    log.debug("lifecycle sweep failed: %s", exc)
                except Exception as exc:  # a Redis error reply: logged, tried again later
                    log.warning("lifecycle sweep failed: %s", exc)
                    next_sweep = now + self.sweep_interval
            if not self._queue:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           max(0.01, next_sweep - time.monotonic()))
                continue
            try:
                ok = self.broker.up and await self._write()
            except Exception:      # never let the writer die: log, keep the records, retry
                log.exception("lifecycle: writing records failed")
                ok = False
            if not ok:
                await asyncio.sleep(self.RETRY)

    async def _write(self) -> bool:
        """Write up to BATCH queued records in one pipeline; False when some failed
        (they stay queued, in order, for the next try)."""
        broker = self.broker
        try:
            link = broker._command_for(LIFECYCLE_STREAM)
        except BrokerUnavailable:
            return False
        batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
        try:
            futs = [broker._issue(link, script, keys, args, False)
                    for script, keys, args in batch]
        except BrokerUnavailable:
            self._queue.extendleft(reversed(batch))
            return False
        replies = await asyncio.gather(
            *(broker._reply(link, fut, script, keys, args, False)
              for fut, (script, keys, args) in zip(futs, batch, strict=True)),
            return_exceptions=True)
        failed = [item for item, r in zip(batch, replies, strict=True)
                  if isinstance(r, BaseException)]
        self.written += len(batch) - len(failed)
        if failed:
            errors = {type(r).__name__ for r in replies if isinstance(r, BaseException)}
            log.debug("lifecycle: %d records not written yet (%s)", len(failed),
                      ", ".join(sorted(errors)))
            self._queue.extendleft(reversed(failed))
            return False
        return True
