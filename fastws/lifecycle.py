"""The process lifecycle: startup → serve → drain → shutdown (uvicorn-style).

:class:`Server` runs one node and its app on one port: it listens (every socket
starts as an :class:`~fastws.http.HttpFront`), installs the signal handlers
(SIGTERM/SIGINT drain, SIGHUP reloads the config), runs the heartbeat sweep and
measures the event loop's lag.  The app is made by the caller (``make_app(node)``,
:class:`fastws.server.App`), which is also what closes its connections' sockets.

``run(config, make_app)`` sets up logging, then serves with uvloop (or supervises
``--workers N`` processes, each of which runs the same).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import uvloop

from fastws import workers
from fastws._version import __version__
from fastws.broker import BrokerUnavailable
from fastws.codes import DISCONNECT_DRAINING
from fastws.http import HttpApp, HttpFront
from fastws.logs import setup_logging
from fastws.node import Node

if TYPE_CHECKING:
    from fastws.config import Config
    from fastws.metrics import Metrics

__all__ = ["ServedApp", "Server", "run", "serve"]

log = logging.getLogger("fastws")

HEARTBEAT_TICK = 1.0
LAG_WINDOW = 15                 # ticks: fastws_event_loop_lag_seconds is their maximum
DRAIN_GRACE = 0.25              # seconds between SIGTERM and the first drain batch


class ServedApp(HttpApp, Protocol):
    """What :class:`Server` needs from the app: the HTTP side, its metrics, and the
    transport-specific handling of its connections."""

    metrics: Metrics

    def on_slow(self, conn: object) -> None:
        """The hub found ``conn`` over its send buffer: close it (4008)."""

    def on_heartbeat_timeout(self, conn: object) -> None:
        """``conn`` did not answer the heartbeat in time: close it."""

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: apply the reloaded limits to the open connections."""

    def close_all(self) -> None:
        """Shutdown: drop every connection's socket at once."""


class Server:
    """One serving process: startup → serve → drain → shutdown (uvicorn-style)."""

    def __init__(self, config: Config, make_app: Callable[[Node], ServedApp]) -> None:
        self.config = config
        self.node = Node(config)
        self.make_app = make_app
        self.app: ServedApp | None = None
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self._listener: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        await self.node.start()
        app = self.app = self.make_app(self.node)
        hub = self.node.hub
        hub.on_slow = app.on_slow
        hub.on_heartbeat_timeout = app.on_heartbeat_timeout
        cfg = self.config.server
        self._listener = await loop.create_server(
            lambda: HttpFront(app), cfg.host, cfg.port, backlog=4096, reuse_address=True,
            reuse_port=workers.CURRENT is not None)
        if workers.CURRENT is not None:
            await workers.CURRENT.start(app.metrics.registry)
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGINT, self.drain),
                             (signal.SIGHUP, self.reload)):
            loop.add_signal_handler(sig, handler)
        self._tasks.append(loop.create_task(self._heartbeat()))
        if cfg.demo:
            from fastws.demo import run_demo

            self._tasks.append(loop.create_task(run_demo(self.node)))
        log.info("fastws %s serving on http://%s:%d (broker %s)", __version__, cfg.host,
                 cfg.port, cfg.broker)

    async def _heartbeat(self) -> None:
        """Once a second: heartbeat sweep, and the loop lag (largest of the last 15 ticks)."""
        loop = asyncio.get_running_loop()
        lags: collections.deque[float] = collections.deque(maxlen=LAG_WINDOW)
        due = loop.time() + HEARTBEAT_TICK
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            lags.append(max(0.0, now - due))  # wake-up to wake-up: the sweep's time counts
            self.node.loop_lag = max(lags)
            due = now + HEARTBEAT_TICK
            cfg = self.node.config.server
            self.node.hub.sweep(cfg.ping_interval, cfg.pong_timeout)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply keys, limits and namespace rules."""
        from fastws.config import ConfigError, reload

        try:
            new = reload(self.node.config)
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        self.node.reload(new)
        if self.app is not None:
            self.app.reconfigure(new)
        logging.getLogger().setLevel(new.server.log_level.upper())
        log.info("SIGHUP: configuration reloaded")

    def drain(self) -> None:
        """SIGTERM: refuse new connections, disconnect the rest over the drain window."""
        if self.node.draining:
            return
        self.node.draining = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._drain()))

    async def _drain(self) -> None:
        timeout = self.node.config.server.drain_timeout
        log.info("draining: %d connections over %.1f s", self.node.hub.connection_count, timeout)
        # The listener stays open until exit: /readyz answers 503, upgrades get 503 with
        # Retry-After (a proxy retries them on another node), /metrics stays scrapeable.
        deadline = time.monotonic() + timeout
        conns = self.node.hub.connections()
        random.shuffle(conns)
        window = timeout * 0.5
        batches = max(1, min(10, len(conns)))
        per = -(-len(conns) // batches) if conns else 0
        # publications a shared broker accepted just before SIGTERM may still be on
        # their way to this node: let them arrive before the first disconnect
        await asyncio.sleep(min(DRAIN_GRACE, timeout / 10))
        for i in range(batches):
            for conn in conns[i * per:(i + 1) * per]:
                conn.disconnect(DISCONNECT_DRAINING,
                                random.randint(0, int(timeout * 1000)))
            if i + 1 < batches:
                await asyncio.sleep(window / batches)
        while self.node.hub.connection_count and time.monotonic() < deadline - 0.2:
            await asyncio.sleep(0.05)
        log.info("drained: %d connections left, exiting", self.node.hub.connection_count)
        self.stopped.set()

    async def shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.app is not None:
            self.app.close_all()
            await asyncio.sleep(0)  # their connection_lost (node.drop: lifecycle records) first
        await self.node.close()


async def serve(config: Config, make_app: Callable[[Node], ServedApp]) -> int:
    """Serve until SIGTERM/SIGINT has drained; return the exit status."""
    server = Server(config, make_app)
    try:
        await server.startup()
    except OSError as exc:
        print(f"fastws: cannot listen on {config.server.host}:{config.server.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except BrokerUnavailable as exc:
        print(f"fastws: --broker: {exc}", file=sys.stderr)
        return 2
    await server.stopped.wait()
    await server.shutdown()
    return server.exit_code


def run(config: Config, make_app: Callable[[Node], ServedApp]) -> int:
    """Run one server process with uvloop, or the ``--workers`` supervisor (each of
    its workers runs this again)."""
    setup_logging(config.server.log_level, config.server.log_format)
    if config.server.workers > 1 and workers.CURRENT is None:
        return workers.supervise(config, lambda cfg: run(cfg, make_app))
    try:
        return uvloop.run(serve(config, make_app))
    except KeyboardInterrupt:
        return 0
