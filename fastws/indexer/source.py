"""Reading the chain: JSON-RPC transports, retries with backoff, adaptive getLogs ranges.

Three transports share one small interface, :class:`Rpc` (``request(method, params)``
→ the raw JSON-RPC result):

- :class:`HttpRpc`: a node's HTTP endpoint through web3.py's ``AsyncHTTPProvider``
  (its own retries switched off: this module decides what to retry);
- :class:`WsRpc`: a node's WebSocket endpoint (``ws://``, ``wss://``), one connection
  opened again on demand, which also carries ``eth_subscribe`` notifications (see
  :mod:`fastws.indexer.heads`);
- :class:`TesterRpc`: an in-process eth-tester chain (the demo and the tests).

Faults are sorted in two kinds.  :class:`RpcTransient` (timeouts, refused connections,
HTTP 429 and 5xx) is retried with full-jitter exponential backoff, honouring
``Retry-After``.  :class:`RpcError` is an answer with a JSON-RPC ``error`` object: for
``eth_getLogs`` over more than one block it means the node refused the range (too
many blocks or results; every provider words it differently), so :class:`LogSource`
halves the range and asks again, and widens it again (by half) after a run of successes;
a getLogs call that times out is taken the same way (the node had too much to do).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastws.indexer.mapping import RawLog, normalize_log, quantity, to_hex

__all__ = [
    "Backoff",
    "BlockHeader",
    "HttpRpc",
    "LogSource",
    "Rpc",
    "RpcError",
    "RpcTransient",
    "TesterRpc",
    "WsRpc",
]

log = logging.getLogger("fastws.indexer")
T = TypeVar("T")

# Provider hints such as Alchemy's "... this block range should work: [0x1, 0x2f]".
_RANGE_HINT = re.compile(r"\[\s*(0x[0-9a-fA-F]+)\s*,\s*(0x[0-9a-fA-F]+)\s*\]")


class RpcError(Exception):
    """The node answered with a JSON-RPC error object."""

    def __init__(self, method: str, code: int | None, message: str) -> None:
        super().__init__(f"{method}: error {code}: {message}")
        self.method, self.code, self.message = method, code, message


class RpcTransient(Exception):
    """The call did not get an answer: timeout, connection refused, HTTP 429 or 5xx."""

    def __init__(self, method: str, reason: str, retry_after: float | None = None,
                 timeout: bool = False) -> None:
        super().__init__(f"{method}: {reason}")
        self.method, self.reason, self.retry_after = method, reason, retry_after
        self.timeout = timeout


class Rpc(Protocol):
    """A JSON-RPC transport: returns the ``result`` or raises RpcError / RpcTransient."""

    async def request(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class HttpRpc:
    """A node's HTTP JSON-RPC endpoint through web3.py's async provider."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        import aiohttp
        from web3 import AsyncHTTPProvider

        self.url = url
        self.timeout = timeout
        self._provider = AsyncHTTPProvider(
            url, request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
            exception_retry_configuration=None)

    async def request(self, method: str, params: list[Any]) -> Any:
        import aiohttp

        try:
            response = await self._provider.make_request(method, params)  # type: ignore[arg-type]
        except aiohttp.ClientResponseError as exc:
            retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            if exc.status == 429 or exc.status >= 500:
                raise RpcTransient(method, f"HTTP {exc.status}", retry_after) from None
            raise RpcError(method, exc.status, f"HTTP {exc.status} {exc.message}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RpcTransient(method, f"{type(exc).__name__}: {exc}".rstrip(": "),
                               timeout=isinstance(exc, TimeoutError)) from None
        except ValueError as exc:   # a body that is not JSON (a proxy's error page)
            raise RpcTransient(method, f"bad response: {exc}") from None
        return _result(method, response)

    async def close(self) -> None:
        await self._provider.disconnect()


class WsRpc:
    """A node's WebSocket JSON-RPC endpoint (``ws://``, ``wss://``) on ``websockets``.

    Calls share one connection, opened on the first call and again after it drops;
    answers are matched to calls by id.  :meth:`subscribe` registers an
    ``eth_subscribe`` on that connection: its notifications go to ``on_message``, and
    ``on_lost`` is called once when the connection (so the subscription) is gone.  A
    call whose connection fails or drops raises :class:`RpcTransient` (retried by
    :class:`LogSource`); one with no answer within ``timeout`` too (``timeout=True``).
    """

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._subs: dict[str, Callable[[Any], None]] = {}
        self._on_lost: list[Callable[[], None]] = []
        self.connects = 0

    async def _connection(self, method: str) -> Any:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidURI

        async with self._lock:
            if self._conn is None:
                try:
                    conn = await connect(self.url, open_timeout=self.timeout, max_size=None,
                                         proxy=None)
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    raise RpcTransient(method, f"cannot connect to {self.url}: "
                                       f"{type(exc).__name__}: {exc}".rstrip(": "),
                                       timeout=isinstance(exc, TimeoutError)) from None
                except InvalidURI as exc:
                    raise RpcError(method, None, str(exc)) from None
                self._conn = conn
                self.connects += 1
                self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            return self._conn

    async def _read(self, conn: Any) -> None:
        try:
            async for raw in conn:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    log.warning("rpc %s: a message that is not JSON; ignored", self.url)
                    continue
                if not isinstance(msg, dict):
                    continue
                if msg.get("method") == "eth_subscription":
                    params = msg.get("params") or {}
                    handler = self._subs.get(params.get("subscription"))
                    if handler is not None:
                        handler(params.get("result"))
                    continue
                fut = self._pending.pop(msg.get("id"), None)   # type: ignore[arg-type]
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except Exception as exc:  # noqa: BLE001 - any way the connection ends
            log.debug("rpc %s: connection ended: %s", self.url, exc)
        finally:
            self._lost(conn)

    def _lost(self, conn: Any) -> None:
        """The connection is gone: fail the calls in flight, end the subscriptions."""
        if self._conn is not conn:
            return
        self._conn = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RpcTransient("rpc", "connection closed"))
        self._subs.clear()
        lost, self._on_lost = self._on_lost, []
        for fn in lost:
            fn()

    async def request(self, method: str, params: list[Any]) -> Any:
        from websockets.exceptions import ConnectionClosed

        conn = await self._connection(method)
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await conn.send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                        "params": params}))
            response = await asyncio.wait_for(fut, self.timeout)
        except ConnectionClosed as exc:
            raise RpcTransient(method, f"connection closed ({exc})") from None
        except TimeoutError:
            raise RpcTransient(method, f"no answer in {self.timeout:g}s", timeout=True) from None
        except RpcTransient as exc:
            raise RpcTransient(method, exc.reason) from None
        finally:
            self._pending.pop(rid, None)
        return _result(method, response)

    async def subscribe(self, kind: str, on_message: Callable[[Any], None],
                        on_lost: Callable[[], None]) -> str:
        """``eth_subscribe(kind)``; returns the subscription id.  Raises RpcError when
        the node refuses it, RpcTransient when the call fails."""
        sub = await self.request("eth_subscribe", [kind])
        if not isinstance(sub, str) or self._conn is None:
            raise RpcTransient("eth_subscribe", f"unexpected answer {sub!r}")
        self._subs[sub] = on_message
        self._on_lost.append(on_lost)
        return sub

    async def close(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, self.timeout)


class TesterRpc:
    """An in-process chain behind the same interface: ``request(method, params)``
    returns the node's response object (``DemoChain.request``; synchronous inside)."""

    def __init__(self, request: Callable[[str, list[Any]], dict[str, Any]]) -> None:
        self._call = request

    async def request(self, method: str, params: list[Any]) -> Any:
        try:
            response = self._call(method, params)
        except Exception as exc:  # eth-tester raises for what a node answers with an error
            raise RpcError(method, -32000, f"{type(exc).__name__}: {exc}") from None
        return _result(method, response)

    async def close(self) -> None:
        return None


def _result(method: str, response: Any) -> Any:
    if not isinstance(response, dict):
        raise RpcTransient(method, f"bad response {type(response).__name__}")
    err = response.get("error")
    if err is not None:
        if isinstance(err, dict):
            raise RpcError(method, err.get("code"), str(err.get("message", err)))
        raise RpcError(method, None, str(err))
    if "result" not in response:
        raise RpcTransient(method, "response without result")
    return response["result"]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


@dataclass(slots=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n waits U(0, min(cap, base·2ⁿ))."""

    base: float = 0.25
    cap: float = 10.0
    rng: random.Random | None = None

    def delay(self, attempt: int, floor: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        r = self.rng or random
        d = r.uniform(0, min(self.cap, self.base * 2**min(attempt, 30)))
        return max(d, floor or 0.0)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What the indexer keeps of a block."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int


class LogSource:
    """Chain reads for the indexer: retried calls and adaptive ``eth_getLogs`` ranges.

    ``max_range`` bounds every getLogs call; the range in use (``span``) halves each
    time the node refuses one and grows by half after ``grow_after`` successes in a row.
    ``on_fault(kind)`` is called for every fault (``"transient"``, ``"error"``,
    ``"range"``) so the owner can count them.
    """

    def __init__(self, rpc: Rpc, addresses: Sequence[str], *, max_range: int = 2000,
                 grow_after: int = 4, backoff: Backoff | None = None,
                 on_fault: Callable[[str], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rpc = rpc
        self.addresses = [a.lower() for a in addresses]
        self.max_range = max(1, max_range)
        self.span = self.max_range
        self.grow_after = grow_after
        self.backoff = backoff or Backoff()
        self.on_fault = on_fault or (lambda kind: None)
        self._sleep = sleep
        self._ok_in_a_row = 0

    async def call(self, method: str, params: list[Any]) -> Any:
        """``rpc.request`` retried until it answers (RpcError is retried too: a node
        that errors on a plain read is in trouble, and the indexer must not skip)."""
        attempt = 0
        while True:
            try:
                return await self.rpc.request(method, params)
            except RpcTransient as exc:
                self.on_fault("transient")
                delay = self.backoff.delay(attempt, exc.retry_after)
                log.warning("rpc %s; retry in %.2fs", exc, delay)
            except RpcError as exc:
                self.on_fault("error")
                delay = self.backoff.delay(attempt)
                log.warning("rpc %s; retry in %.2fs", exc, delay)
            attempt += 1
            await self._sleep(delay)

    async def chain_id(self) -> int:
        """``eth_chainId``."""
        return quantity(await self.call("eth_chainId", []))

    async def head(self) -> int:
        """``eth_blockNumber``: the newest block."""
        return quantity(await self.call("eth_blockNumber", []))

    async def header(self, number: int) -> BlockHeader | None:
        """The canonical block at ``number`` now, or None past the head."""
        raw = await self.call("eth_getBlockByNumber", [hex(number), False])
        if raw is None:
            return None
        return BlockHeader(quantity(raw["number"]), to_hex(raw["hash"]),
                           to_hex(raw["parentHash"]), quantity(raw["timestamp"]))

    async def logs(self, start: int, end: int,
                   addresses: Sequence[str] | None = None) -> tuple[list[RawLog], int]:
        """Logs of the watched contracts (or of ``addresses``) from ``start`` to at most
        ``end``.

        Returns ``(logs, last)``: the logs of blocks ``start..last`` sorted by
        (block, logIndex), where ``last`` ≤ ``end`` is as far as the node's range
        limit let this call go.
        """
        wanted = list(self.addresses if addresses is None else addresses)
        attempt = 0
        while True:
            last = min(end, start + self.span - 1)
            params = [{"fromBlock": hex(start), "toBlock": hex(last), "address": wanted}]
            try:
                raw = await self.rpc.request("eth_getLogs", params)
            except RpcTransient as exc:
                self.on_fault("transient")
                if exc.timeout and last > start:   # too much work for the node in one call
                    self._ok_in_a_row = 0
                    self.span = max(1, (last - start + 1) // 2)
                    log.info("eth_getLogs %d..%d timed out; range now %d blocks",
                             start, last, self.span)
                    continue
                delay = self.backoff.delay(attempt, exc.retry_after)
                log.warning("rpc %s; retry in %.2fs", exc, delay)
            except RpcError as exc:
                if last > start:
                    self.on_fault("range")
                    self._ok_in_a_row = 0
                    self.span = self._narrower(start, last, exc.message)
                    log.info("eth_getLogs %d..%d refused (%s); range now %d blocks",
                             start, last, exc.message, self.span)
                    continue
                self.on_fault("error")
                delay = self.backoff.delay(attempt)
                log.warning("rpc %s; retry in %.2fs", exc, delay)
            else:
                self._ok_in_a_row += 1
                if self._ok_in_a_row >= self.grow_after and self.span < self.max_range:
                    self.span = min(self.max_range, max(self.span + 1, self.span * 3 // 2))
                    self._ok_in_a_row = 0
                logs = [normalize_log(item) for item in raw or ()]
                logs.sort(key=lambda lg: (lg.block_number, lg.log_index))
                return logs, last
            attempt += 1
            await self._sleep(delay)

    async def logs_through(self, start: int, end: int,
                           addresses: Sequence[str]) -> list[RawLog]:
        """Every log of ``addresses`` from ``start`` to ``end`` (as many calls as the
        node's range limit takes), sorted by (block, logIndex)."""
        out: list[RawLog] = []
        while start <= end:
            got, last = await self.logs(start, end, addresses)
            out.extend(got)
            start = last + 1
        return out

    def _narrower(self, start: int, last: int, message: str) -> int:
        """Half the refused range, or the provider's suggestion if it made one."""
        half = max(1, (last - start + 1) // 2)
        m = _RANGE_HINT.search(message or "")
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            if lo == start and start <= hi < last:
                return hi - start + 1
        return half


async def retry_forever(fn: Callable[[], Awaitable[T]], what: str, backoff: Backoff,
                        retry_on: tuple[type[BaseException], ...],
                        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """Await ``fn()`` until it does not raise one of ``retry_on``, with backoff."""
    attempt = 0
    while True:
        try:
            return await fn()
        except retry_on as exc:
            delay = backoff.delay(attempt)
            log.warning("%s failed (%s); retry in %.2fs", what, exc, delay)
            attempt += 1
            await sleep(delay)
