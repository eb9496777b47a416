"""The proxies to the application's backend (SPEC §11): connect, subscribe, publish, rpc.

Each call is an HTTP POST of a JSON body to the ``[proxy]`` URL of its kind, over one
pool of keep-alive connections (aiohttp).  The backend answers HTTP 200 with exactly
one of ``{"result": …}``, ``{"error": {"code", "message"}}`` or
``{"disconnect": {"code", "reason"}}``; :meth:`Proxy.call` returns the ``result``
object or raises:

* :class:`BackendRefused` — the backend's ``error`` (its code and message);
* :class:`BackendDisconnect` — the backend's ``disconnect`` (close with that code);
* :class:`BackendFailed` — the backend is down (503), slow past ``timeout`` (504 for
  subscribe/publish/rpc; a connection gets HTTP 503 either way) or answered anything
  else (503).  Fastws fails closed: nothing is accepted on a failed call.

A failed call is logged once per :data:`LOG_INTERVAL` per URL, with the URL and what
went wrong, never a traceback.  Counters and latency histograms are plain ints and
lists, read by :class:`ProxyCollector` at scrape time only.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from fastws.codes import Close

if TYPE_CHECKING:
    from fastws.config import ProxyConfig

__all__ = ["KINDS", "RESULTS", "BUCKETS", "LOG_INTERVAL", "BackendDisconnect", "BackendFailed",
           "BackendRefused", "Proxy", "ProxyCollector", "forward_headers"]

log = logging.getLogger("fastws.proxy")

KINDS = ("connect", "subscribe", "publish", "rpc")
RESULTS = ("ok", "error", "timeout", "unavailable")
#: upper bounds (seconds) of the fastws_proxy_duration_seconds buckets
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOG_INTERVAL = 10.0             # seconds between two log lines about one failing URL
POOL_SIZE = 256                 # keep-alive connections to the backends, in all
MAX_ANSWER = 1024 * 1024        # bytes of a backend answer read at most


class BackendRefused(Exception):
    """The backend answered ``{"error": {"code": N, "message": M}}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BackendDisconnect(Exception):
    """The backend answered ``{"disconnect": {"code": 4500..4999, "reason": R}}``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class BackendFailed(Exception):
    """The backend is down (503), slow (504) or answered something else (503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def forward_headers(names: tuple[str, ...], headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers listed in ``names`` (matched case-insensitively; ``headers``
    has lower-case names, as :func:`fastws.http.parse_head` gives them), as
    ``{name as configured: value}``."""
    out = {}
    for name in names:
        value = headers.get(name.lower())
        if value is not None:
            out[name] = value
    return out


def _shape(kind: str, answer: Any) -> tuple[str, Any]:
    """``("result", obj)`` / ``("error", (code, msg))`` / ``("disconnect", (code,
    reason))`` of a decoded answer; ValueError naming what is wrong otherwise."""
    if not isinstance(answer, dict) or len(answer) != 1:
        raise ValueError("not an object with exactly one of result, error, disconnect")
    (key, value), = answer.items()
    if key == "result":
        if not isinstance(value, dict):
            raise ValueError("result is not an object")
        if kind == "connect":
            user = value.get("user")
            if not isinstance(user, str) or not user or len(user) > 255:
                raise ValueError("result.user is not a string of 1-255 chars")
            chans = value.get("channels")
            if chans is not None and (not isinstance(chans, list) or
                                      not all(isinstance(c, str) for c in chans)):
                raise ValueError("result.channels is not a list of strings")
            exp = value.get("expire_at")
            if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
                raise ValueError("result.expire_at is not a unix time")
        return key, value
    if key == "error":
        if not isinstance(value, dict):
            raise ValueError("error is not an object")
        code, msg = value.get("code"), value.get("message", "")
        if isinstance(code, bool) or not isinstance(code, int) or not isinstance(msg, str):
            raise ValueError("error is not {code: integer, message: string}")
        if kind == "connect" and code not in (401, 403):
            raise ValueError("a connect error's code must be 401 or 403")
        if not 400 <= code <= 599:
            raise ValueError("error.code is not 400-599")
        return key, (code, msg[:1024])
    if key == "disconnect":
        if not isinstance(value, dict):
            raise ValueError("disconnect is not an object")
        code, reason = value.get("code"), value.get("reason", "")
        if (isinstance(code, bool) or not isinstance(code, int) or not isinstance(reason, str)
                or not 4500 <= code <= 4999 or not Close.is_application(code)):
            raise ValueError("disconnect is not {code: 4500-4999, reason: string}")
        return key, (code, reason[:120])
    raise ValueError(f"unknown key {key[:40]!r}")


class Proxy:
    """The calls of one process to the backends of the live ``[proxy]`` config."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        #: (kind, result) -> calls
        self.counts: Counter[tuple[str, str]] = Counter()
        #: kind -> [bucket counts (len(BUCKETS) + 1), sum of seconds]
        self.durations: dict[str, list[Any]] = {k: [[0] * (len(BUCKETS) + 1), 0.0]
                                                for k in KINDS}
        self._logged: dict[str, float] = {}

    def enabled(self, kind: str) -> bool:
        """True when ``[proxy] kind`` has a URL."""
        return self.config.url(kind) is not None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=POOL_SIZE, keepalive_timeout=60.0,
                                               ttl_dns_cache=60),
                json_serialize=lambda o: orjson.dumps(o).decode(),
                skip_auto_headers=("User-Agent",), raise_for_status=False)
        return self._session

    async def close(self) -> None:
        """Close the keep-alive pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the ``kind`` backend; its ``result`` (see the module
        docstring for what is raised)."""
        url = self.config.url(kind)
        if url is None:
            raise BackendFailed(503, f"no [proxy] {kind} URL")
        timeout = self.config.timeout
        start = time.monotonic()
        result = "unavailable"
        try:
            try:
                async with asyncio.timeout(timeout):
                    async with self._client().post(
                            url, data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as resp:
                        raw = await resp.content.read(MAX_ANSWER + 1)
                        status = resp.status
            except TimeoutError:
                result = "timeout"
                self._warn(url, f"no answer within {timeout:g} s")
                raise BackendFailed(504 if kind != "connect" else 503,
                                    "backend timeout") from None
            except (aiohttp.ClientError, OSError) as exc:
                self._warn(url, f"unreachable: {type(exc).__name__}: {exc}")
                raise BackendFailed(503, "backend unavailable") from None
            try:
                if status != 200:
                    raise ValueError(f"HTTP status {status}")
                if len(raw) > MAX_ANSWER:
                    raise ValueError("answer over 1 MiB")
                what, value = _shape(kind, orjson.loads(raw))
            except (ValueError, orjson.JSONDecodeError) as exc:
                self._warn(url, f"answer not understood: {exc}")
                raise BackendFailed(503, "backend answered an unknown shape") from None
            if what == "result":
                result = "ok"
                return value
            result = "error"
            if what == "error":
                raise BackendRefused(*value)
            raise BackendDisconnect(*value)
        finally:
            self._observe(kind, result, time.monotonic() - start)

    def _observe(self, kind: str, result: str, seconds: float) -> None:
        self.counts[(kind, result)] += 1
        hist = self.durations[kind]
        hist[0][bisect.bisect_left(BUCKETS, seconds)] += 1
        hist[1] += seconds

    def _warn(self, url: str, what: str) -> None:
        """Log a failing backend once per LOG_INTERVAL per URL (no traceback)."""
        now = time.monotonic()
        if now - self._logged.get(url, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged[url] = now
            log.warning("proxy backend %s failed: %s (refusing meanwhile; logged once per "
                        "%g s)", url, what, LOG_INTERVAL)


class ProxyCollector:
    """``fastws_proxy_requests_total{kind,result}`` and
    ``fastws_proxy_duration_seconds{kind}``, read from a :class:`Proxy` at scrape time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        calls = CounterMetricFamily("fastws_proxy_requests", "Backend (proxy) calls, by "
                                    "kind and result.", labels=["kind", "result"])
        for kind in KINDS:
            for result in RESULTS:
                calls.add_metric([kind, result], proxy.counts.get((kind, result), 0))
        yield calls
        hist = HistogramMetricFamily("fastws_proxy_duration_seconds",
                                     "Backend (proxy) call duration, by kind.",
                                     labels=["kind"])
        for kind in KINDS:
            counts, total = proxy.durations[kind]
            cumulative, buckets = 0, []
            for bound, n in zip((*map(repr, BUCKETS), "+Inf"), counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric([kind], buckets, total)
        yield hist
