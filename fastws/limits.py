"""Rate limits and client-IP resolution (SPEC §5), with no I/O.

Every limit is a token bucket: ``capacity`` tokens, refilled continuously at
``capacity / window`` tokens per second, one token per event.  "N per window"
therefore admits a burst of N and then N per window on average, with no cliff at
window edges (a fixed window admits 2N around an edge).

- :class:`Bucket`: one bucket (per connection: messages, subscribes).  Limits are
  passed to :meth:`Bucket.take` on every call, so a SIGHUP reload applies at once.
- :class:`KeyedLimiter`: one bucket per key (client IP) with bounded memory.
- :func:`client_ip`: the peer address, or the last ``X-Forwarded-For`` hop when
  the peer is a trusted proxy; a loopback peer without that header is exempt.
- :func:`json_depth`: nesting depth of decoded JSON, for ``MAX_JSON_DEPTH``.

Typical use::

    ip, exempt = client_ip(peer, headers.get("x-forwarded-for"), trusted)
    if not exempt:
        wait = limiter.take(ip, 50, 10.0, time.monotonic())
        if wait:   # refused: answer 429 with Retry-After: ceil(wait)
            ...
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MAX_JSON_DEPTH",
    "Bucket",
    "KeyedLimiter",
    "Network",
    "client_ip",
    "json_depth",
    "request_id",
    "retry_after",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Published ``data`` may nest at most this deep (objects and arrays).  orjson parses
# up to 1024 levels but serializes at most 254, so without a lower limit a deep
# ``data`` parsed fine and then failed inside the server; real events nest < 10 deep.
MAX_JSON_DEPTH = 64


class Bucket:
    """One token bucket.  Starts full; :meth:`take` spends one token or says how long
    to wait."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens = float(capacity)
        self.stamp = now

    def take(self, capacity: float, window: float, now: float) -> float:
        """Spend one token: 0.0 if allowed, else seconds until a token is available.

        ``capacity`` tokens per ``window`` seconds; both may change between calls.
        """
        elapsed = now - self.stamp
        self.stamp = now
        tokens = self.tokens
        if elapsed > 0:
            tokens = min(float(capacity), tokens + elapsed * capacity / window)
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) * window / capacity

    def full(self, capacity: float, window: float, now: float) -> bool:
        """True once the bucket has refilled to ``capacity`` (it can be forgotten)."""
        return self.tokens + (now - self.stamp) * capacity / window >= capacity


class KeyedLimiter:
    """A token bucket per key (a client IP), memory bounded by ``max_keys``.

    Buckets that refilled completely are forgotten (a full bucket is the same as no
    bucket), swept at most once per ``sweep_every`` seconds; if a flood of distinct
    keys still fills the table, the oldest tenth is evicted (a key evicted early
    gets a fresh, full bucket: under such a flood the limit is approximate).
    """

    def __init__(self, max_keys: int = 100_000, sweep_every: float = 5.0) -> None:
        self.buckets: dict[str, Bucket] = {}
        self.max_keys = max_keys
        self.sweep_every = sweep_every
        self._next_sweep = 0.0

    def take(self, key: str, capacity: int, window: float, now: float) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if allowed, else seconds to wait."""
        if now >= self._next_sweep or len(self.buckets) >= self.max_keys:
            self._sweep(capacity, window, now)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(capacity, now)
        return bucket.take(capacity, window, now)

    def _sweep(self, capacity: int, window: float, now: float) -> None:
        self._next_sweep = now + self.sweep_every
        full = [k for k, b in self.buckets.items() if b.full(capacity, window, now)]
        for k in full:
            del self.buckets[k]
        if len(self.buckets) >= self.max_keys:  # a flood of distinct keys: evict the
            # oldest tenth (dicts iterate oldest first), so sweeps stay amortized O(1)
            for k in list(self.buckets)[:max(1, self.max_keys // 10)]:
                del self.buckets[k]

    def __len__(self) -> int:
        return len(self.buckets)


def retry_after(wait: float) -> str:
    """The ``Retry-After`` header value (whole seconds, at least 1) for a wait."""
    return str(max(1, math.ceil(wait)))


def request_id(payload: bytes) -> int | None:
    """The ``id`` of a refused request, so its error reply can carry it (None if the
    message has no valid id).  Only refused messages pay for this second parse."""
    import orjson

    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    mid = msg.get("id") if isinstance(msg, dict) else None
    if isinstance(mid, int) and not isinstance(mid, bool) and 0 <= mid < 2**63:
        return mid
    return None


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:        # "[::1]:1234"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:                      # "1.2.3.4:1234"
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_ip(peer: str | None, forwarded_for: str | None,
              trusted: Iterable[Network]) -> tuple[str, bool]:
    """Return ``(client IP, exempt)`` for a request (SPEC §5).

    The client IP is the peer address, or the last ``X-Forwarded-For`` hop when the
    peer is in ``trusted``.  ``exempt`` is True only for a loopback peer that sent no
    ``X-Forwarded-For``: local clients (load tests on 127.0.0.x) are not throttled,
    while a connection that came through a proxy counts against its last hop, even a
    loopback one.  An unparsable last hop counts against the proxy itself.
    """
    if forwarded_for is None and peer is not None and (peer.startswith("127.")
                                                       or peer == "::1"):
        return (peer, True)              # the common local case, without parsing
    addr = _parse_ip(peer) if peer else None
    if addr is None:                     # a Unix socket or an unknown peer: local
        return (peer or "local", not forwarded_for)
    if forwarded_for is None:
        return (str(addr), addr.is_loopback)
    if any(addr in net for net in trusted):
        last = forwarded_for.rpartition(",")[2]
        hop = _parse_ip(last)
        if hop is not None:
            return (str(hop), False)
    return (str(addr), False)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of decoded JSON (0 for a scalar), counted up to ``limit + 1``.

    Iterative (no recursion), and it stops as soon as the limit is passed, so a
    hostile value costs at most one walk over its containers.
    """
    if not isinstance(value, dict | list):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest
