"""Several chains in one ``fastws index`` (SPEC §14): the ``[chains.NAME]`` tables of
``--config`` and the process that indexes them all concurrently.

Each chain gets its own RPC connection, source, checkpoint and
:class:`~fastws.indexer.runner.Indexer` task; they share the publisher (``--url`` or
``--broker``), the durable store (``--store``) and the ``/metrics`` port.  A chain
whose node does not answer retries with backoff inside its own task, so the others go
on publishing; only a chain id that is not the configured one stops the process
(exit 2, naming both ids), as does a checkpoint written for other contracts.

The single-chain flags (``--rpc``, ``--contract``, …) make one :class:`ChainSpec` of
network ``--network`` (default ``default``) and run the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastws.channels import is_address
from fastws.indexer import UsageError
from fastws.indexer.templates import DEFAULT_CHANNELS, Channels, TemplateError, parse_all

__all__ = ["ChainSpec", "parse_chains", "parse_store_url", "run_chains"]

log = logging.getLogger("fastws.indexer")

NETWORK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
STOP_GRACE = 5.0     # seconds a chain gets to finish its step after SIGTERM
KEYS = ("rpc", "contracts", "abi", "follow", "child_abi", "from_block", "confirmations",
        "chain_id", "channels", "poll_interval", "max_range", "checkpoint")


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """One chain to index: its ``[chains.NAME]`` table, validated."""

    network: str
    rpc: str
    contracts: tuple[str, ...]
    abi: list[dict[str, Any]]
    from_block: int | None
    confirmations: int
    follow: Any                     # mapping.Follow or None
    chain_id: int | None            # checked against the node when given
    channels: Channels
    poll_interval: float
    max_range: int
    checkpoint: str | None          # None: the default name for the checkpoint store

    @property
    def digest(self) -> str:
        """A short hash of the contracts (and ``follow``): the default checkpoint's."""
        identity = ",".join(sorted(self.contracts)) + (
            f"|follow={self.follow}" if self.follow else "")
        return hashlib.sha256(identity.encode()).hexdigest()[:12]


def check_rpc(label: str, rpc: object) -> str:
    """An RPC URL (http(s):// or ws(s)://, with a host), or UsageError."""
    if not isinstance(rpc, str) or not rpc:
        raise UsageError(f"{label}: required (the node's JSON-RPC URL)")
    if not rpc.startswith(("http://", "https://", "ws://", "wss://")):
        raise UsageError(f"{label}: {rpc!r} is not an http://, https://, ws:// or wss:// URL")
    if not urlsplit(rpc).hostname:
        raise UsageError(f"{label}: {rpc!r} names no host")
    return rpc


def parse_store_url(label: str, url: str | None) -> str | None:
    """``postgresql://…`` (or ``postgres://…``), or UsageError."""
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
        raise UsageError(f"{label}: {url!r} is not a postgresql://user@host:port/db URL")
    if not urlsplit(url).hostname and "host=" not in url:
        raise UsageError(f"{label}: {url!r} names no host")
    return url


def _int(label: str, value: object, default: int | None, minimum: int) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{label}: {value!r} is not an integer")
    if value < minimum:
        raise UsageError(f"{label}: must be at least {minimum}, got {value}")
    return value


def parse_chains(doc: dict[str, Any], base: Path, *, poll_interval: float,
                 max_range: int) -> tuple[ChainSpec, ...]:
    """The ``[chains.NAME]`` tables of a config file (``base``: its folder, which
    relative ``abi`` paths start from); raises UsageError naming
    ``chains.NAME.KEY``."""
    from fastws.indexer import _load_abi
    from fastws.indexer.mapping import Follow

    tables = doc.get("chains")
    if not isinstance(tables, dict) or not tables:
        raise UsageError("chains: expected one or more [chains.NAME] tables")
    specs: list[ChainSpec] = []
    for name, table in tables.items():
        label = f"chains.{name}"
        if not NETWORK.fullmatch(name):
            raise UsageError(f"{label}: the name must be letters, digits, _ . - (it is the "
                             "events' network and may name channels)")
        if not isinstance(table, dict):
            raise UsageError(f"{label}: expected a table")
        for key in table:
            if key not in KEYS:
                raise UsageError(f"{label}.{key}: unknown key (known: {', '.join(KEYS)})")
        rpc = check_rpc(f"{label}.rpc", table.get("rpc"))
        raw = table.get("contracts")
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise UsageError(f"{label}.contracts: required (an array of 0x addresses)")
        contracts: list[str] = []
        for item in raw:
            if not isinstance(item, str) or not is_address(item.strip()):
                raise UsageError(f"{label}.contracts: {item!r} is not a 0x address of 40 "
                                 "hex digits")
            if item.strip().lower() not in contracts:
                contracts.append(item.strip().lower())

        def path_of(key: str, table: dict[str, Any] = table, label: str = label) -> str | None:
            value = table.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                raise UsageError(f"{label}.{key}: {value!r} is not a file name")
            return str(base / value)

        abi = _load_abi(path_of("abi"), f"{label}.abi")
        follow: Any = None
        child = path_of("child_abi")
        if child and table.get("follow") is None:
            raise UsageError(f"{label}.child_abi: only with follow = \"EVENT.ARG\"")
        if table.get("follow") is not None:
            if child:
                abi = abi + _load_abi(child, f"{label}.child_abi")
            try:
                follow = Follow.parse(str(table["follow"]), abi)
            except ValueError as exc:
                raise UsageError(f"{label}.follow: {exc}") from None
        try:
            channels = parse_all(table.get("channels", list(DEFAULT_CHANNELS)))
        except TemplateError as exc:
            raise UsageError(f"{label}.channels: {exc}") from None
        poll = table.get("poll_interval", poll_interval)
        if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0 < poll <= 3600:
            raise UsageError(f"{label}.poll_interval: must be in (0, 3600] seconds, got "
                             f"{poll!r}")
        checkpoint = table.get("checkpoint")
        if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
            raise UsageError(f"{label}.checkpoint: {checkpoint!r} is not a file name or key")
        confirmations = _int(f"{label}.confirmations", table.get("confirmations"), 2, 1)
        chain_max_range = _int(f"{label}.max_range", table.get("max_range"), max_range, 1)
        assert confirmations is not None and chain_max_range is not None
        specs.append(ChainSpec(
            network=name, rpc=rpc, contracts=tuple(contracts), abi=abi,
            from_block=_int(f"{label}.from_block", table.get("from_block"), None, 0),
            confirmations=confirmations, follow=follow,
            chain_id=_int(f"{label}.chain_id", table.get("chain_id"), None, 1),
            channels=channels, poll_interval=float(poll), max_range=chain_max_range,
            checkpoint=checkpoint))
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.checkpoint is not None:
            if spec.checkpoint in seen:
                raise UsageError(f"chains.{spec.network}.checkpoint: {spec.checkpoint!r} is "
                                 f"chains.{seen[spec.checkpoint]}'s too (one per chain)")
            seen[spec.checkpoint] = spec.network
    return tuple(specs)


def parse_store_table(doc: dict[str, Any]) -> str | None:
    """``[store] url``, checked (None when absent)."""
    table = doc.get("store")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError("store: expected a [store] table with url = \"postgresql://…\"")
    for key in table:
        if key != "url":
            raise UsageError(f"store.{key}: unknown key (known: url)")
    return parse_store_url("store.url", table.get("url"))


# --------------------------------------------------------------------------- running


class ChainFatal(Exception):
    """A chain cannot be indexed as configured: the process stops (``status``)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _checkpoint_store(spec: ChainSpec, args: Any, store: Any) -> Any:
    from fastws.indexer.checkpoint import FileCheckpoint, RedisCheckpoint

    if store is not None:
        return store.chain(spec.checkpoint or f"{spec.network}:{spec.digest}", spec.network)
    if args.broker is not None:
        return RedisCheckpoint(args.broker, spec.checkpoint
                               or f"fastws:indexer:{spec.network}:{spec.digest}")
    return FileCheckpoint(spec.checkpoint or f".fastws-index-{spec.network}-{spec.digest}.json")


async def _index_chain(spec: ChainSpec, args: Any, publisher: Any, store: Any, stats: Any,
                       stop: asyncio.Event) -> None:
    """Index one chain until ``stop``; raises ChainFatal for what must stop the process."""
    from fastws.indexer.checkpoint import CheckpointMismatch, RedisCheckpoint
    from fastws.indexer.heads import NewHeads
    from fastws.indexer.mapping import EventCodec
    from fastws.indexer.publish import PublishRefused
    from fastws.indexer.runner import ChainIdMismatch, Indexer
    from fastws.indexer.source import HttpRpc, LogSource, WsRpc

    rpc: Any
    heads: NewHeads | None = None
    if spec.rpc.startswith(("ws://", "wss://")):
        rpc = WsRpc(spec.rpc)
        heads = NewHeads(rpc, poll_interval=spec.poll_interval, stats=stats)
    else:
        rpc = HttpRpc(spec.rpc)
    cp_store = _checkpoint_store(spec, args, store)
    source = LogSource(rpc, spec.contracts, max_range=spec.max_range, on_fault=stats.fault)
    indexer = Indexer(source, EventCodec(spec.abi), publisher, cp_store,
                      confirmations=spec.confirmations, from_block=spec.from_block,
                      poll_interval=spec.poll_interval, stats=stats, follow=spec.follow,
                      heads=heads, network=spec.network, chain_id=spec.chain_id,
                      channels=spec.channels)
    single = not args.chains
    log.info("%s: indexing %s from %s (%d confirmations)%s", spec.network,
             ",".join(spec.contracts), spec.rpc, spec.confirmations,
             f", following {spec.follow}" if spec.follow else "")
    try:
        opened = asyncio.ensure_future(indexer.open())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({opened, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not opened.done():
            opened.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opened
            return
        opened.result()
        if heads is not None:
            heads.start()
        await indexer.run(stop)
    except ChainIdMismatch as exc:
        raise ChainFatal(f"{'--chain-id' if single else f'chains.{spec.network}.chain_id'}: "
                         f"{exc}") from None
    except CheckpointMismatch as exc:
        where = "--checkpoint" if single else f"chains.{spec.network}.checkpoint"
        raise ChainFatal(f"{where}: the checkpoint of {spec.network} {exc}; give another "
                         "checkpoint") from None
    except PublishRefused as exc:
        raise ChainFatal(str(exc), 1) from None
    finally:
        if heads is not None:
            await heads.stop()
        await rpc.close()
        if isinstance(cp_store, RedisCheckpoint):
            await cp_store.close()


async def run_chains(args: Any, say: Any) -> int:
    """Index every chain of ``args`` (an IndexArgs) until SIGTERM/SIGINT; returns the
    exit status.  ``say(line)`` reports a fatal problem."""
    from fastws.indexer.metrics import serve_metrics
    from fastws.indexer.publish import BrokerPublisher, HttpPublisher
    from fastws.indexer.runner import IndexerStats

    specs: tuple[ChainSpec, ...] = args.chains or (single_spec(args),)
    stats = [IndexerStats(network=s.network) for s in specs]
    store: Any = None
    if args.store is not None:
        from fastws.indexer.store import EventStore

        store = EventStore(args.store)

    def ready() -> bool:
        return (store is None or store.ready) and all(s.opened for s in stats)

    if args.metrics_port:
        try:
            serve_metrics(stats, args.metrics_port, ready=ready)
        except OSError as exc:
            say(f"--metrics-port: cannot listen on {args.metrics_port}: {exc.strerror or exc}")
            return 2
    publisher: Any
    if args.broker is not None:
        publisher = BrokerPublisher(args.broker, args.config.for_channel)
        target = args.broker
    else:
        publisher = HttpPublisher(args.url, args.api_key)
        target = args.url
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("indexing %d chain%s (%s) into %s%s", len(specs), "" if len(specs) == 1 else "s",
             ", ".join(s.network for s in specs), target,
             f", storing in {_redacted(args.store)}" if args.store else "")
    status = 0
    tasks: list[asyncio.Task[None]] = []
    try:
        if store is not None:     # retried until the store answers (or SIGTERM)
            connecting = asyncio.ensure_future(store.connect())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
                return 0
            import asyncpg

            try:
                connecting.result()
            except (asyncpg.PostgresError, asyncpg.exceptions.ClientConfigurationError,
                    ValueError) as exc:   # no such database, a refused login, a bad URL
                say(f"--store: {_redacted(args.store)}: {type(exc).__name__}: {exc}")
                return 2
        tasks = [asyncio.ensure_future(_index_chain(s, args, publisher, store, st, stop))
                 for s, st in zip(specs, stats, strict=True)]
        stopping = asyncio.ensure_future(stop.wait())
        pending: set[Any] = {*tasks, stopping}
        while pending and not stop.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is stopping or t.cancelled():
                    continue
                exc = t.exception()
                if isinstance(exc, ChainFatal):
                    say(str(exc))
                    status = exc.status
                    stop.set()
                elif exc is not None:
                    log.error("a chain's indexer stopped", exc_info=exc)
                    status = 1
                    stop.set()
            if stopping in done or not (pending - {stopping}):
                break
        stopping.cancel()
        stop.set()
        live = [t for t in tasks if not t.done()]
        if live:
            _, late = await asyncio.wait(live, timeout=STOP_GRACE)
            for t in late:        # stuck retrying a node that does not answer
                t.cancel()
            if late:
                await asyncio.wait(late)
        for t in tasks:
            if t.done() and not t.cancelled() and isinstance(t.exception(), ChainFatal) \
                    and status == 0:
                exc = t.exception()
                assert isinstance(exc, ChainFatal)
                say(str(exc))
                status = exc.status
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await publisher.close()
        if store is not None:
            await store.close()
    for st in stats:
        log.info("%s: stopped after block %d", st.network, st.last_block)
    return status


def _redacted(url: str) -> str:
    from fastws.indexer.store import redact

    return redact(url)


def single_spec(args: Any) -> ChainSpec:
    """The chain of the single-chain flags."""
    return ChainSpec(network=args.network, rpc=args.rpc, contracts=args.contracts,
                     abi=args.abi, from_block=args.from_block,
                     confirmations=args.confirmations, follow=args.follow,
                     chain_id=args.chain_id, channels=args.channels,
                     poll_interval=args.poll_interval, max_range=args.max_range,
                     checkpoint=args.checkpoint)
