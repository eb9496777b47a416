"""Where indexed events go: a small publisher interface and its implementations.

A :class:`Publisher` takes ``(channel, data, idempotency_key)`` and returns once the
publication is accepted (a :class:`BatchPublisher` also takes a list of them, in
order: the indexer sends a step's events that way); it retries what can succeed later
(the server restarting, HTTP 429/5xx) and raises :class:`PublishRefused` for what
cannot (a wrong API key, a channel the server rejects), which stops the indexer.

- :class:`HttpPublisher`: ``POST /api/publish`` of a fastws server (``--url``,
  ``--api-key``): the way to feed a separate server when it runs ``memory://``.
- :class:`NodePublisher`: straight into a :class:`fastws.node.Node` of this process,
  possibly from another thread (the ``serve --demo`` chain runs in its own thread).
- :class:`BrokerPublisher`: straight into the shared broker (``--broker redis://…``),
  with the namespace rules of the servers' config, so every node sharing that Redis
  delivers the events and keeps them as a node would: in the channel's history, the
  namespace's log (pattern recovery) and, in a ``stream = true`` namespace, its
  stream (SPEC §12).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from fastws.indexer.source import Backoff

if TYPE_CHECKING:
    from fastws.broker import Broker, Publication
    from fastws.config import NamespaceConfig
    from fastws.node import Node

__all__ = ["BatchPublisher", "BrokerPublisher", "HttpPublisher", "Item", "NodePublisher",
           "PublishRefused", "Publisher"]

log = logging.getLogger("fastws.indexer")

#: one publication: (channel, data, idempotency key)
Item = tuple[str, dict[str, Any], str]

BATCH_ITEMS = 500              # publications per POST (the server takes up to 1000)
BATCH_BYTES = 512 * 1024       # encoded bytes per POST (the server takes a 1 MiB body)


class PublishRefused(Exception):
    """The server refused a publication for good (401, 400): retrying cannot help."""


class Publisher(Protocol):
    """Delivers one publication; returns once the server accepted it."""

    async def publish(self, channel: str, data: dict[str, Any], idempotency_key: str) -> None:
        """Publish ``data`` to ``channel`` at most once per ``idempotency_key``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class BatchPublisher(Publisher, Protocol):
    """A publisher that also takes many publications at once."""

    async def publish_many(self, items: list[Item]) -> None:
        """Publish ``items`` in their order (per channel, each after the one before it);
        returns once all are accepted."""
        ...


class HttpPublisher:
    """Publishes through a fastws server's ``POST /api/publish`` (keep-alive session):
    :meth:`publish_many` sends up to ``BATCH_ITEMS`` publications per request (a JSON
    array), falling back to one request per publication on a server that takes no
    arrays."""

    def __init__(self, url: str, api_key: str | None, *, timeout: float = 10.0,
                 backoff: Backoff | None = None) -> None:
        self.endpoint = url.rstrip("/") + "/api/publish"
        self.api_key = api_key
        self.timeout = timeout
        self.backoff = backoff or Backoff(base=0.1, cap=5.0)
        self.retries = 0
        self.requests = 0          # POSTs that were answered 200
        self.batches = True        # False once the server refused an array
        self._session: Any = None

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Content-Type": "application/json",
                         **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        return self._session

    async def publish(self, channel: str, data: dict[str, Any], idempotency_key: str) -> None:
        body = orjson.dumps({"channel": channel, "data": data, "idempotency_key": idempotency_key})

        async def settle(status: int, text: bytes, reason: str) -> str | None:
            if status == 200:
                return None
            raise PublishRefused(f"HTTP {status} for {channel}: {reason}")

        await self._post(lambda: body, settle)

    async def publish_many(self, items: list[Item]) -> None:
        """Publish ``items`` in order, in requests of up to BATCH_ITEMS publications (and
        BATCH_BYTES); a request's items that failed for now (503) are sent again from
        the first of them on, in order (their keys drop what the server already has)."""
        i = 0
        while i < len(items) and self.batches:
            bodies: list[bytes] = []
            size = 0
            for channel, data, key in items[i:i + BATCH_ITEMS]:
                one = orjson.dumps({"channel": channel, "data": data, "idempotency_key": key})
                if bodies and size + len(one) > BATCH_BYTES:
                    break
                bodies.append(one)
                size += len(one) + 1
            await self._post_batch(items[i:i + len(bodies)], bodies)
            i += len(bodies)
        for channel, data, key in items[i:]:   # a server without batches
            await self.publish(channel, data, key)

    async def _post_batch(self, items: list[Item], bodies: list[bytes]) -> None:
        """POST ``bodies`` as one array until every item is accepted (retrying from the
        first that was not); on a server that takes no arrays, publish them one by one."""

        async def settle(status: int, text: bytes, reason: str) -> str | None:
            nonlocal items, bodies
            if status == 400 and "JSON object" in reason:
                log.warning("%s takes no batches (%s): publishing one by one",
                            self.endpoint, reason)
                self.batches = False
                for channel, data, key in items:
                    await self.publish(channel, data, key)
                return None
            if status != 200:
                raise PublishRefused(f"HTTP {status} for a batch: {reason}")
            failed = _first_failed(items, orjson.loads(text))
            if failed is None:
                return None
            at, status, reason = failed
            if status != 429 and status < 500:
                raise PublishRefused(f"HTTP {status} for {items[at][0]}: {reason}")
            items, bodies = items[at:], bodies[at:]
            return f"{status} {reason} (item {at})"

        await self._post(lambda: b"[" + b",".join(bodies) + b"]", settle)

    async def _post(self, body: Callable[[], bytes],
                    settle: Callable[[int, bytes, str], Awaitable[str | None]]) -> None:
        """POST ``body()`` until ``settle`` is done with an answer.  401/403 raise
        :class:`PublishRefused`; 429, 5xx and connection errors are retried with backoff;
        other answers go to ``settle(status, body, reason)``, which returns None when
        done, raises PublishRefused, or returns what went wrong to retry (``body()``
        again: settle may have changed it)."""
        import aiohttp

        session = await self._client()
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with session.post(self.endpoint, data=body()) as resp:
                    text = await resp.read()
                    reason = _reason(text) or resp.reason or ""
                    if resp.status == 200:
                        self.requests += 1
                    if resp.status in (401, 403):
                        raise PublishRefused(f"HTTP {resp.status} from {self.endpoint}: {reason}"
                                             " (check --api-key)")
                    if resp.status == 200 or (resp.status != 429 and resp.status < 500):
                        problem = await settle(resp.status, text, reason)
                        if problem is None:
                            return
                    else:
                        retry_after = _float(resp.headers.get("Retry-After"))
                        problem = f"HTTP {resp.status} {reason}".strip()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self.retries += 1
            delay = self.backoff.delay(attempt, retry_after)
            log.warning("publish to %s: %s; retry in %.2fs", self.endpoint, problem, delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class NodePublisher:
    """Publishes into a node of this process; ``loop`` is the node's loop when the
    indexer runs on another thread's loop."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.node = node
        self.loop = loop

    async def publish(self, channel: str, data: dict[str, Any], idempotency_key: str) -> None:
        coro = self.node.publish(channel, data, idempotency_key)
        if self.loop is None or self.loop is asyncio.get_running_loop():
            await coro
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        return None


class _NoDelivery:
    """The indexer subscribes to nothing: a broker handler that is never called."""

    def handle_publication(self, channel: str, data: bytes, offset: int, epoch: str,
                           accepted: float) -> None:
        return None

    def handle_gap(self) -> None:
        return None


class BrokerPublisher:
    """Publishes into a shared broker (``redis://``) as a node would: history and
    idempotency are the broker's, ``rules(channel)`` gives the namespace's rules, made
    into a publication by :func:`fastws.broker.publication_for` (the node's own): its
    history size and TTL, the namespace log when it has one, and in a ``stream = true``
    namespace the append to ``fastws:stream:<namespace>`` with ``user`` and ``client``
    empty (a publication without a connection, SPEC §12), once per idempotency key."""

    def __init__(self, url: str, rules: Callable[[str], NamespaceConfig], *,
                 backoff: Backoff | None = None) -> None:
        self.url = url
        self.rules = rules
        self.backoff = backoff or Backoff(base=0.1, cap=5.0)
        self.retries = 0
        self.broker: Broker | None = None
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        """Connect (the broker keeps reconnecting by itself afterwards); several chains
        may call it at once: the first one connects."""
        from fastws.broker import create_broker

        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.broker is None:
                broker = create_broker(self.url)
                await broker.start(_NoDelivery())
                self.broker = broker

    def _publication(self, channel: str, data: dict[str, Any], key: str) -> Publication:
        from fastws.broker import publication_for

        return publication_for(self.rules(channel), channel, orjson.dumps(data), key)

    async def publish(self, channel: str, data: dict[str, Any], idempotency_key: str) -> None:
        from fastws.broker import BrokerUnavailable, publish_args

        if self.broker is None:
            await self.start()
        assert self.broker is not None
        pub = self._publication(channel, data, idempotency_key)
        attempt = 0
        while True:
            try:
                await self.broker.publish(channel, pub.data, **publish_args(pub))
                return
            except BrokerUnavailable as exc:   # outcome unknown: the same key makes it safe
                self.retries += 1
                delay = self.backoff.delay(attempt)
                log.warning("publish to %s: %s; retry in %.2fs", self.url, exc, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def publish_many(self, items: list[Item]) -> None:
        """Publish ``items`` in order with the broker's batch (one Redis pipeline per
        BATCH_ITEMS); what was not published (BrokerUnavailable) is sent again from the
        first of them on."""
        from fastws.broker import BrokerUnavailable

        if self.broker is None:
            await self.start()
        assert self.broker is not None
        pubs = [self._publication(channel, data, key) for channel, data, key in items]
        attempt = 0
        while pubs:
            chunk = pubs[:BATCH_ITEMS]
            try:
                results = await self.broker.publish_batch(chunk)
            except BrokerUnavailable as exc:
                results = [exc]
            failed = next((i for i, r in enumerate(results)
                           if isinstance(r, BrokerUnavailable)), None)
            if failed is None:
                pubs = pubs[len(chunk):]
                attempt = 0
                continue
            pubs = pubs[failed:]
            self.retries += 1
            delay = self.backoff.delay(attempt)
            log.warning("publish to %s: %s; retry in %.2fs", self.url, results[failed], delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.close()
            self.broker = None


def _reason(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return " ".join(body.decode("utf-8", "replace").split())[:200]
    if isinstance(doc, dict):
        for key in ("error", "reason", "message"):
            if isinstance(doc.get(key), str):
                return doc[key]
    return ""


def _first_failed(items: list[Item], results: Any) -> tuple[int, int, str] | None:
    """(index, status, reason) of the first item of a batch answer that was not
    published, or None when all were."""
    if not isinstance(results, list) or len(results) != len(items):
        return 0, 502, "the answer does not hold one result per publication"
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "offset" not in r:
            status = r.get("status") if isinstance(r, dict) else None
            reason = r.get("error", "") if isinstance(r, dict) else ""
            return i, status if isinstance(status, int) else 502, str(reason)
    return None


def _float(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
