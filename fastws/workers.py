"""``--workers N``: a supervisor forking N server processes that share one port.

The supervisor (the process ``fastws serve`` started) never runs an event loop: it
forks the workers, each of which listens on the same host:port with ``SO_REUSEPORT``
(the kernel spreads new connections over them) and runs an ordinary node on the
shared broker.  The supervisor

* restarts a worker that dies (after a short pause if workers keep dying at once);
* forwards SIGTERM/SIGINT (every worker drains, section 2 of docs/protocol.md) and
  SIGHUP (every worker reloads its config), and exits once all workers have exited;
* stops everything with the worker's status if a worker of the first generation exits
  with status 1 or 2 at once (port in use, bad broker): the same errors as one process.

**Metrics summed over workers.**  The supervisor creates a private directory; each
worker serves a snapshot of its own registry on a Unix socket there (``w<i>.sock``).
The worker that answers ``GET /metrics`` reads every other worker's snapshot (live,
with a 1 s timeout per worker), adds them to its own and renders the sum: counters,
gauges and histogram buckets are summed; ``fastws_broker_up``, the cluster's
``fastws_broker_shards``/``fastws_broker_shards_up`` (every worker sees the same
shards) and ``process_start_time_seconds`` take the minimum, lags and ``process_max_fds`` the
maximum; ``fastws_channels`` counts the distinct channel and pattern names over the
workers (each snapshot lists its names).  ``fastws_workers`` says how many workers
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

if TYPE_CHECKING:
    from fastws.config import Config

__all__ = ["Worker", "CURRENT", "supervise", "snapshot", "merge"]

log = logging.getLogger("fastws.workers")

PEER_TIMEOUT = 1.0
FAST_EXIT = 1.0          # seconds: a worker dying faster than this is crash-looping
STOP_GRACE = 5.0         # seconds beyond drain_timeout before SIGKILL
_MIN = {"fastws_broker_up", "fastws_broker_shards", "fastws_broker_shards_up",
        "process_start_time_seconds"}
_MAX = {"fastws_event_loop_lag_seconds", "fastws_broker_lag_seconds", "process_max_fds",
        "fastws_draining", "fastws_build_info"}


@dataclass
class Worker:
    """This process's place among the workers (set in the child right after fork)."""

    index: int
    count: int
    directory: str
    _server: asyncio.AbstractServer | None = None
    #: this worker's channel and pattern names (set by the node's metrics collector), so
    #: ``fastws_channels`` counts distinct names over all workers instead of summing
    channel_names: Callable[[], list[str]] | None = None

    def socket_path(self, index: int) -> str:
        return os.path.join(self.directory, f"w{index}.sock")

    async def start(self, registry: CollectorRegistry) -> None:
        """Serve this worker's metrics snapshot to its siblings."""
        path = self.socket_path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                w.write(orjson.dumps(snapshot(registry, self.channel_names)))
                await w.drain()
            finally:
                w.close()

        self._server = await asyncio.start_unix_server(answer, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path(self.index))

    async def metrics(self, registry: CollectorRegistry) -> bytes:
        """The text format of the sum over every worker that answers."""
        peers = [i for i in range(self.count) if i != self.index]
        others = await asyncio.gather(*(self._read(i) for i in peers))
        snaps = [snapshot(registry, self.channel_names)] + [s for s in others if s is not None]
        return merge(snaps)

    async def _read(self, index: int) -> dict | None:
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self.socket_path(index))
                data = await reader.read()
                writer.close()
            return orjson.loads(data)
        except (OSError, TimeoutError, orjson.JSONDecodeError):
            return None


CURRENT: Worker | None = None


def snapshot(registry: CollectorRegistry,
             channel_names: Callable[[], list[str]] | None = None) -> dict[str, Any]:
    """One registry's samples, ``{"families": [[family, type, help, [[sample, labels,
    value], ...]], ...], "channels": [names] or None}``."""
    families = []
    for fam in registry.collect():
        families.append([fam.name, fam.type, fam.documentation,
                         [[s.name, s.labels, s.value] for s in fam.samples]])
    return {"families": families,
            "channels": channel_names() if channel_names is not None else None}


def merge(snaps: list[dict[str, Any]]) -> bytes:
    """Sum snapshots into one text exposition (see the module docstring for the rules).

    ``fastws_channels`` is the number of distinct names over the workers when every
    snapshot lists its names (a channel subscribed in two workers counts once)."""
    families: dict[str, tuple[str, str, dict[tuple, list[Any]]]] = {}
    for snap in snaps:
        for name, typ, doc, samples in snap["families"]:
            fam = families.setdefault(name, (typ, doc, {}))
            acc = fam[2]
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                if key not in acc:
                    acc[key] = [sname, labels, value]
                elif name in _MIN:
                    acc[key][2] = min(acc[key][2], value)
                elif name in _MAX:
                    acc[key][2] = max(acc[key][2], value)
                else:
                    acc[key][2] += value
    lists = [snap.get("channels") for snap in snaps]
    if "fastws_channels" in families and all(names is not None for names in lists):
        distinct = len(set().union(*lists))
        for sample in families["fastws_channels"][2].values():
            sample[2] = float(distinct)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            for name, (typ, doc, acc) in families.items():
                m = Metric(name, doc, typ)
                for sname, labels, value in acc.values():
                    m.add_sample(sname, labels, value)
                yield m
            m = Metric("fastws_workers", "Worker processes summed in this answer.", "gauge")
            m.add_sample("fastws_workers", {}, len(snaps))
            yield m

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


# ---------------------------------------------------------------------- supervisor


def supervise(config: Config, run: Callable[[Config], int]) -> int:
    """Run ``config.server.workers`` workers until SIGTERM/SIGINT; return the exit status.

    Each worker is a forked process: it sets :data:`CURRENT`, then exits with the status
    ``run(config)`` returns (the caller's serving entry point, so that this module
    imports no server)."""
    count = config.server.workers
    directory = tempfile.mkdtemp(prefix="fastws-workers-")
    children: dict[int, tuple[int, float, bool]] = {}   # pid -> (index, started, first)
    state = {"stopping": False, "deadline": 0.0}

    def spawn(index: int, first: bool = False) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                global CURRENT
                CURRENT = Worker(index, count, directory)
                code = run(config)
            except BaseException:  # noqa: BLE001 - a worker never returns into the supervisor
                log.exception("worker %d crashed", index)
            finally:
                os._exit(code if isinstance(code, int) else 1)
        children[pid] = (index, time.monotonic(), first)

    def forward(sig: int) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_stop(signum: int, _frame: Any) -> None:
        if not state["stopping"]:
            state["stopping"] = True
            state["deadline"] = time.monotonic() + config.server.drain_timeout + STOP_GRACE
            log.info("supervisor: %s, stopping %d workers", signal.Signals(signum).name,
                     len(children))
        forward(signal.SIGTERM)

    def on_hup(_signum: int, _frame: Any) -> None:
        log.info("supervisor: SIGHUP, reloading %d workers", len(children))
        forward(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    first_started = time.monotonic()
    exit_code = 0
    log.info("supervisor %d: starting %d workers on %s:%d", os.getpid(), count,
             config.server.host, config.server.port)
    for i in range(count):
        spawn(i, first=True)
    quick_deaths = 0
    try:
        while children:
            if state["stopping"]:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    if time.monotonic() > state["deadline"]:
                        forward(signal.SIGKILL)
                    time.sleep(0.05)
                    continue
            else:
                pid, status = os.waitpid(-1, 0)
            if pid not in children:
                continue
            index, started, first = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if state["stopping"]:
                continue
            now = time.monotonic()
            if code in (1, 2) and first and now - first_started < FAST_EXIT * 3:
                log.error("supervisor: worker %d could not start (status %d); stopping", index,
                          code)
                exit_code = code
                on_stop(signal.SIGTERM, None)
                continue
            quick_deaths = quick_deaths + 1 if now - started < FAST_EXIT else 0
            log.warning("supervisor: worker %d (pid %d) exited with status %s; restarting",
                        index, pid, code)
            if quick_deaths:
                time.sleep(min(5.0, 0.1 * 2 ** quick_deaths))
            spawn(index)
    except ChildProcessError:
        pass
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return exit_code
