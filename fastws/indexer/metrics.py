"""The indexer's Prometheus metrics, read from :class:`IndexerStats` at scrape time.

Every family has a ``network`` label (the chain's name; ``default`` for the
single-chain flags), one series per chain: ``fastws_indexer_head_block`` (gauge),
``fastws_indexer_checkpoint_block`` (gauge: the last processed, i.e. indexed, block),
``fastws_indexer_lag_blocks`` (gauge: head minus the last processed block),
``fastws_indexer_lag_seconds`` (gauge: now minus the last processed block's
timestamp), ``fastws_indexer_rpc_faults_total{kind}`` (RPC errors: transient,
error, range), ``fastws_indexer_events_total`` (events published), plus
``fastws_indexer_followed_contracts``, ``fastws_indexer_retractions_total``,
``fastws_indexer_reorgs_total``, ``fastws_indexer_skipped_logs_total`` and, with a
ws:// RPC, ``fastws_indexer_head_subscription`` (gauge),
``fastws_indexer_head_subscription_failures_total`` and ``fastws_indexer_new_heads_total``.
``fastws index --metrics-port`` serves them with the ``process_*`` metrics, and
``/healthz`` and ``/readyz`` (200 once the store, if any, answers and every chain has
started; 503 before and while the store is unreachable); ``serve --demo`` adds them
to the server's ``/metrics``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from fastws.indexer.runner import IndexerStats

__all__ = ["IndexerCollector", "serve_metrics"]

_FAMILIES: tuple[tuple[str, str, str, Callable[[Any], float]], ...] = (
    ("gauge", "fastws_indexer_head_block", "Newest block number seen.",
     lambda s: s.head_block),
    ("gauge", "fastws_indexer_lag_blocks",
     "Blocks between the head and the last processed block.", lambda s: s.lag_blocks),
    ("gauge", "fastws_indexer_lag_seconds",
     "Seconds between now and the last processed block's timestamp.",
     lambda s: round(s.lag_seconds, 3)),
    ("gauge", "fastws_indexer_checkpoint_block", "Last fully processed (indexed) block.",
     lambda s: s.last_block),
    ("gauge", "fastws_indexer_followed_contracts",
     "Contracts followed because a --follow event created them.", lambda s: s.followed),
    ("counter", "fastws_indexer_events", "Contract events published.", lambda s: s.events),
    ("counter", "fastws_indexer_retractions",
     "Retractions (removed: true) published after reorgs.", lambda s: s.retractions),
    ("counter", "fastws_indexer_reorgs", "Reorgs that reached published blocks.",
     lambda s: s.reorgs),
    ("counter", "fastws_indexer_skipped_logs", "Logs not in the ABI or not decodable.",
     lambda s: s.skipped_logs),
    ("gauge", "fastws_indexer_head_subscription",
     "1 while new heads come by eth_subscribe, 0 while polling.", lambda s: int(s.subscribed)),
    ("counter", "fastws_indexer_head_subscription_failures",
     "newHeads subscriptions refused or lost (then: polling).",
     lambda s: s.subscription_failures),
    ("counter", "fastws_indexer_new_heads", "newHeads notifications received.",
     lambda s: s.new_heads),
)


class IndexerCollector:
    """Yields the ``fastws_indexer_*`` families of one or several chains' indexers
    (``stats``: an :class:`IndexerStats`, or a list of them), labelled by network."""

    def __init__(self, stats: IndexerStats | Iterable[IndexerStats]) -> None:
        self.stats: list[IndexerStats] = (list(stats) if isinstance(stats, Iterable)
                                          else [stats])

    def collect(self) -> Iterator[Metric]:
        for kind, name, text, value in _FAMILIES:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, text, labels=["network"])
            for s in self.stats:
                family.add_metric([s.network], value(s))
            yield family
        faults = CounterMetricFamily("fastws_indexer_rpc_faults",
                                     "RPC faults: transient (timeout, 429, 5xx), error, range.",
                                     labels=["network", "kind"])
        for s in self.stats:
            for kind in ("transient", "error", "range"):
                faults.add_metric([s.network, kind], s.rpc_faults.get(kind, 0))
        yield faults


def serve_metrics(stats: IndexerStats | Iterable[IndexerStats], port: int,
                  host: str = "127.0.0.1",
                  ready: Callable[[], bool] | None = None) -> CollectorRegistry:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for the indexer on
    ``host:port`` in a daemon thread; ``ready()`` decides ``/readyz``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IndexerCollector(stats))
    registry.register(ProcessCollector(registry=None))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                self._send(200, "application/json", b'{"status":"ok"}')
            elif path == "/readyz":
                ok = ready() if ready is not None else True
                self._send(200 if ok else 503, "application/json",
                           b'{"status":"ready"}' if ok else b'{"status":"not ready"}')
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fastws-indexer-metrics",
                     daemon=True).start()
    return registry
