"""New heads by subscription: wake the indexer at each block instead of polling.

With a WebSocket RPC endpoint (``--rpc ws://…``, ``wss://…``), :class:`NewHeads` keeps
an ``eth_subscribe("newHeads")`` open on the node and sets :attr:`NewHeads.woken` at
each notification; the indexer's loop waits on it instead of sleeping
``--poll-interval`` (it still reads the head with ``eth_blockNumber`` and the logs
with ``eth_getLogs`` in bounded ranges: the notification is only a wake-up).

When the subscription is refused or the connection drops, the loop polls every
``--poll-interval`` again (a warning in the log, ``live`` false, a failure counted),
and :class:`NewHeads` subscribes again with backoff (1 s doubling up to 30 s); once it
is back, it logs so and wakes the loop.  While subscribed, the loop still reads the
head every :data:`SUBSCRIBED_POLL` seconds, in case a node keeps the connection
open but stops notifying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastws.indexer.source import Backoff, RpcError, RpcTransient, WsRpc

__all__ = ["SUBSCRIBED_POLL", "ChainHeads", "HeadSignal", "NewHeads"]

log = logging.getLogger("fastws.indexer")

SUBSCRIBED_POLL = 30.0     # seconds between head reads while notifications come


class HeadSignal(Protocol):
    """What the indexer's loop waits on between polls: ``woken`` is set at a new head;
    while ``live`` is false it polls every ``poll_interval`` instead."""

    woken: asyncio.Event
    live: bool


class ChainHeads:
    """New heads of an in-process chain (``serve --demo``): :meth:`notify` is its
    mining hook, called from any thread."""

    def __init__(self) -> None:
        self.woken = asyncio.Event()
        self.live = True
        self._loop = asyncio.get_running_loop()

    def notify(self, *_: Any) -> None:
        """A block was mined: wake the loop."""
        with contextlib.suppress(RuntimeError):      # the loop may be closed
            self._loop.call_soon_threadsafe(self.woken.set)


class NewHeads:
    """An ``eth_subscribe("newHeads")`` on ``rpc`` that wakes the indexer.

    ``woken`` is set at each new head and when the subscription comes or goes;
    ``live`` says whether it is up now.  ``stats`` (an
    :class:`~fastws.indexer.runner.IndexerStats`, optional) gets ``subscribed``,
    ``subscription_failures`` and ``new_heads``.
    """

    def __init__(self, rpc: WsRpc, *, poll_interval: float = 1.0, stats: Any = None,
                 backoff: Backoff | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rpc = rpc
        self.poll_interval = poll_interval
        self.stats = stats
        self.backoff = backoff or Backoff(base=1.0, cap=30.0)
        self.woken = asyncio.Event()
        self.live = False
        self.heads = 0
        self.failures = 0
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe in a background task (and again whenever it is lost)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop resubscribing (before closing the RPC connection)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_live(False)

    def _on_head(self, header: Any) -> None:
        self.heads += 1
        if self.stats is not None:
            self.stats.new_heads += 1
        self.woken.set()

    def _set_live(self, live: bool) -> None:
        self.live = live
        if self.stats is not None:
            self.stats.subscribed = live

    def _failed(self) -> None:
        self.failures += 1
        if self.stats is not None:
            self.stats.subscription_failures += 1

    async def _run(self) -> None:
        attempt = 0
        while True:
            lost = asyncio.Event()
            try:
                await self.rpc.subscribe("newHeads", self._on_head, lost.set)
            except (RpcError, RpcTransient) as exc:
                self._failed()
                delay = self.backoff.delay(attempt, floor=min(1.0, self.backoff.cap))
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(level, "eth_subscribe newHeads failed (%s); polling every %gs, "
                        "subscribing again in %.1fs", exc, self.poll_interval, delay)
                attempt += 1
                await self._sleep(delay)
                continue
            attempt = 0
            self._set_live(True)
            log.info("new heads by subscription (eth_subscribe newHeads on %s)", self.rpc.url)
            self.woken.set()            # a block may have come while it was down
            await lost.wait()
            self._set_live(False)
            self._failed()
            log.warning("newHeads subscription lost (connection closed); polling every %gs "
                        "until it is back", self.poll_interval)
            self.woken.set()            # back to polling now
