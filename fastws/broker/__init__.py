"""Brokers carry publications between nodes and keep history (see base.Broker)."""

from __future__ import annotations

from fastws.broker.base import (
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    HistoryResult,
    Publication,
    PublishResult,
    StreamAppend,
    publication_for,
    publish_args,
    stream_key,
)

__all__ = ["Broker", "BrokerHandler", "BrokerUnavailable", "HistoryResult", "Publication",
           "PublishResult", "StreamAppend", "create_broker", "publication_for", "publish_args",
           "stream_key"]


def create_broker(url: str) -> Broker:
    """Build the broker for a ``--broker`` URL."""
    if url.startswith("memory://"):
        from fastws.broker.memory import MemoryBroker

        return MemoryBroker()
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "redis+sentinel"):
        from fastws.broker.redis import RedisBroker

        return RedisBroker(url)
    if scheme == "redis+cluster":
        from fastws.broker.cluster import RedisClusterBroker

        return RedisClusterBroker(url)
    raise BrokerUnavailable(f"broker {url.split('://')[0]}:// is not available in this build")
