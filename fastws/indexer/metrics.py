"""The indexer's Prometheus metrics, read from :class:`IndexerStats` at scrape time.

``fastws_indexer_head_block`` (gauge), ``fastws_indexer_lag_blocks`` (gauge: head
minus the last processed block), ``fastws_indexer_events_total`` (events published),
plus ``fastws_indexer_checkpoint_block``, ``fastws_indexer_followed_contracts``,
``fastws_indexer_retractions_total``, ``fastws_indexer_reorgs_total``,
``fastws_indexer_skipped_logs_total``, ``fastws_indexer_rpc_faults_total{kind}`` and,
with a ws:// RPC, ``fastws_indexer_head_subscription`` (gauge),
``fastws_indexer_head_subscription_failures_total`` and ``fastws_indexer_new_heads_total``.
``fastws index --metrics-port`` serves them with the ``process_*`` metrics;
``serve --demo`` adds them to the server's ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from fastws.indexer.runner import IndexerStats

__all__ = ["IndexerCollector", "serve_metrics"]


class IndexerCollector:
    """Yields the ``fastws_indexer_*`` families of one indexer."""

    def __init__(self, stats: IndexerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily("fastws_indexer_head_block", "Newest block number seen.",
                                value=s.head_block)
        yield GaugeMetricFamily("fastws_indexer_lag_blocks",
                                "Blocks between the head and the last processed block.",
                                value=s.lag_blocks)
        yield GaugeMetricFamily("fastws_indexer_checkpoint_block",
                                "Last fully processed block.", value=s.last_block)
        yield GaugeMetricFamily("fastws_indexer_followed_contracts",
                                "Contracts followed because a --follow event created them.",
                                value=s.followed)
        yield CounterMetricFamily("fastws_indexer_events", "Contract events published.",
                                  value=s.events)
        yield CounterMetricFamily("fastws_indexer_retractions",
                                  "Retractions (removed: true) published after reorgs.",
                                  value=s.retractions)
        yield CounterMetricFamily("fastws_indexer_reorgs", "Reorgs that reached published blocks.",
                                  value=s.reorgs)
        yield CounterMetricFamily("fastws_indexer_skipped_logs",
                                  "Logs not in the ABI or not decodable.", value=s.skipped_logs)
        yield GaugeMetricFamily("fastws_indexer_head_subscription",
                                "1 while new heads come by eth_subscribe, 0 while polling.",
                                value=int(s.subscribed))
        yield CounterMetricFamily("fastws_indexer_head_subscription_failures",
                                  "newHeads subscriptions refused or lost (then: polling).",
                                  value=s.subscription_failures)
        yield CounterMetricFamily("fastws_indexer_new_heads",
                                  "newHeads notifications received.", value=s.new_heads)
        faults = CounterMetricFamily("fastws_indexer_rpc_faults",
                                     "RPC faults: transient (timeout, 429, 5xx), error, range.",
                                     labels=["kind"])
        for kind in ("transient", "error", "range"):
            faults.add_metric([kind], s.rpc_faults.get(kind, 0))
        yield faults


def serve_metrics(stats: IndexerStats, port: int, host: str = "127.0.0.1") -> CollectorRegistry:
    """Serve ``/metrics`` for the indexer on ``host:port`` in a daemon thread."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(IndexerCollector(stats))
    registry.register(ProcessCollector(registry=None))
    start_http_server(port, addr=host, registry=registry)
    return registry
