"""Prometheus metrics: C counters of the hub and node counters, rendered at scrape time.

Nothing here runs on the delivery path: :class:`NodeCollector` reads the counters
when ``/metrics`` is scraped and yields metric families; ``prometheus_client`` writes
the text format 0.0.4.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from fastws import workers
from fastws._version import __version__
from fastws.codes import CLOSE_CODES, Err

if TYPE_CHECKING:
    from fastws.node import Node

__all__ = ["NodeCollector", "Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label values exported from the start (at 0), so that rate() sees their first increment:
# every close code of fastws.codes (1006 included: a connection dropped without a close
# frame, which no one sends) and every error code.
KNOWN_CLOSE_CODES = CLOSE_CODES
KNOWN_ERROR_CODES = tuple(sorted(v for k, v in vars(Err).items()
                                 if k.isupper() and isinstance(v, int)))
KNOWN_LIMITS = ("connections", "messages", "requests", "subscribes", "subscriptions")


def _labelled(counts: Mapping[Any, int], known: Iterable[Any]) -> list[tuple[str, int]]:
    """Every known label value (0 if never counted) plus any other that was counted."""
    merged = {str(k): 0 for k in known}
    for key, n in counts.items():
        merged[str(key)] = n
    return sorted(merged.items())


class NodeCollector:
    """Yields every ``fastws_*`` metric family from one node's counters."""

    def __init__(self, node: Node) -> None:
        self.node = node
        if workers.CURRENT is not None:    # /metrics of --workers N: distinct channels
            workers.CURRENT.channel_names = node.hub.names

    def collect(self) -> Iterator[Metric]:
        node, hub = self.node, self.node.hub
        others = node.transports
        yield GaugeMetricFamily("fastws_connections", "Open WebSocket connections.",
                                value=hub.connection_count - sum(others.values()))
        by_transport = GaugeMetricFamily(
            "fastws_transport_connections", "Open sessions, by transport (websocket, "
            "sse, poll: long-polls waiting).", labels=["transport"])
        by_transport.add_metric(["websocket"], hub.connection_count - sum(others.values()))
        for name in ("sse", "poll"):
            by_transport.add_metric([name], others[name])
        yield by_transport
        yield GaugeMetricFamily("fastws_connections_compressed",
                                "Open WebSocket connections that negotiated permessage-deflate.",
                                value=hub.compressed_connections)
        yield CounterMetricFamily("fastws_connections_accepted", "WebSocket connections accepted.",
                                  value=node.accepted)
        closed = CounterMetricFamily("fastws_connections_closed",
                                     "WebSocket connections closed, by close code.",
                                     labels=["code"])
        for code, n in _labelled(node.closed, KNOWN_CLOSE_CODES):
            closed.add_metric([code], n)
        yield closed
        yield GaugeMetricFamily("fastws_subscriptions",
                                "(connection, channel or pattern) subscription pairs.",
                                value=node.subscriptions)
        yield GaugeMetricFamily("fastws_channels",
                                "Distinct channels and patterns with a local subscriber.",
                                value=hub.name_count)
        yield CounterMetricFamily("fastws_messages_received", "Client messages received.",
                                  value=node.messages_received)
        yield CounterMetricFamily("fastws_publications", "Publications fanned out by this node.",
                                  value=hub.publications)
        yield CounterMetricFamily("fastws_deliveries",
                                  "Publication frames queued to connections.",
                                  value=hub.deliveries)
        yield CounterMetricFamily("fastws_bytes_sent",
                                  "Bytes of WebSocket frames written by the application "
                                  "(after compression).",
                                  value=hub.bytes_sent)
        yield CounterMetricFamily("fastws_writes", "Socket writes of queued frames.",
                                  value=hub.writes)
        yield CounterMetricFamily("fastws_slow_consumer_disconnects",
                                  "Connections closed with 4008 (send_buffer exceeded).",
                                  value=hub.slow_consumers)
        limited = CounterMetricFamily("fastws_rate_limited", "Requests refused by a limit.",
                                      labels=["limit"])
        for name, n in _labelled(node.rate_limited, KNOWN_LIMITS):
            limited.add_metric([name], n)
        yield limited
        errors = CounterMetricFamily("fastws_errors", "Error replies sent, by code.",
                                     labels=["code"])
        for code, n in _labelled(node.errors, KNOWN_ERROR_CODES):
            errors.add_metric([code], n)
        yield errors
        yield GaugeMetricFamily("fastws_broker_up", "1 when the broker is connected.",
                                value=1 if node.broker.up else 0)
        broker = node.broker
        yield GaugeMetricFamily("fastws_broker_shards",
                                "Independent parts of the broker (Redis Cluster masters; 1 "
                                "otherwise).", value=getattr(broker, "shards", 1))
        yield GaugeMetricFamily("fastws_broker_shards_up",
                                "Broker shards connected now: publications to a channel "
                                "whose shard is down answer 503.",
                                value=getattr(broker, "shards_up", 1 if broker.up else 0))
        yield CounterMetricFamily("fastws_broker_reconnects", "Broker reconnections.",
                                  value=node.broker_reconnects)
        yield CounterMetricFamily("fastws_gaps", "Channels found to have lost publications "
                                  "on their way to this node (subscribers closed with 4010).",
                                  value=getattr(node, "gaps", 0))
        yield GaugeMetricFamily("fastws_broker_lag_seconds",
                                "How far the broker's pub/sub reader is behind (Redis PING).",
                                value=getattr(node.broker, "lag", 0.0))
        bounds, cumulative, total, count = hub.latency_snapshot()
        buckets = [(repr(b), c) for b, c in zip(bounds, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(
            "fastws_delivery_latency_seconds",
            "Publication accepted to written to the socket, one observation per publication.",
            buckets=buckets, sum_value=total)
        yield GaugeMetricFamily("fastws_event_loop_lag_seconds",
                                "Largest event loop lag seen by the 1 s heartbeat timer over "
                                "the last 15 s.", value=node.loop_lag)
        yield GaugeMetricFamily("fastws_draining", "1 while the node drains (after SIGTERM).",
                                value=1 if node.draining else 0)
        info = GaugeMetricFamily("fastws_build_info", "fastws version of this process.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for collector in node.extra_collectors:
            yield from collector.collect()


class Metrics:
    """The registry of one process: node metrics plus the standard ``process_*`` ones."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self.registry.register(ProcessCollector(registry=None))

    def render(self) -> bytes:
        """The text exposition format 0.0.4."""
        return generate_latest(self.registry)
