"""The indexer's loop: confirmations, reorg tracking, publication, checkpoints.

Each poll (:meth:`Indexer.step`):

1. reads the head; a block is *safe* once it has ``confirmations`` blocks counting
   itself (``number <= head - confirmations + 1``);
2. checks that the last processed block is still canonical (its hash, or the parent
   hash of the next block); if not, a reorg happened: it walks back through the
   stored hashes of the reorg window to the common ancestor, publishes a retraction
   (the event's data plus ``"removed": true``) for every event published from the
   abandoned blocks, newest first, and rewinds the checkpoint to the ancestor;
3. fetches the logs of the next safe range (bounded, adaptive: see
   :class:`~fastws.indexer.source.LogSource`), the headers of the blocks it needs
   (every block inside the reorg window, plus the blocks holding logs), checks that
   logs and headers agree and link up, publishes each event to
   ``events:<snake_case name>`` and ``market:<contract address>`` in (block, logIndex)
   order, and saves the checkpoint.

Contracts created at run time (``follow``, ``--follow EVENT.ARG``): when a log of a
watched contract is that event, the contract its argument names is watched too, from
the event's block on: in the same step its logs from that block are read and published
in order with the others, and it is recorded in the checkpoint (so a restart keeps
following it).  A reorg that abandons the creating block drops the contract again
(its events are retracted like any other).

Several chains (SPEC §14): one :class:`Indexer` per chain, each with its own source,
checkpoint and ``network`` name; every event's data carries ``network`` and
``chainId``, and goes to the channels its chain's templates
(:class:`~fastws.indexer.templates.Channels`) render for it.  A ``chain_id`` given
to the indexer must be the node's (:class:`ChainIdMismatch` otherwise).

Exactly once: an event is published with the idempotency key
``chainId:txHash:logIndex``; the checkpoint is saved after the range's publications
were accepted, so a crash re-publishes at most that range and the server drops the
repeats (it remembers keys for 5 minutes).  A retraction's key is the event's key plus
``:removed``; an event that comes back in another block after a retraction gets
``chainId:txHash:logIndex:<blockHash>``, so that the server does not take it for a
repeat of the retracted one.

With a durable store (a checkpoint store that has ``commit``, e.g.
:class:`~fastws.indexer.store.ChainStore`), the order is the other way round: the
range's events (or a reorg's retracted rows) and the checkpoint are written in one
transaction, the checkpoint holding the publications still to make (``pending``);
then they are published, then ``pending`` is cleared.  A crash between the two
leaves ``pending`` in the store, which the next start publishes first, with the same
keys: nothing is lost, nothing doubles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastws.indexer.checkpoint import Checkpoint, CheckpointStore, Followed, PublishedEvent
from fastws.indexer.heads import SUBSCRIBED_POLL, HeadSignal
from fastws.indexer.mapping import EventCodec, Follow, RawLog, event_data, snake_case
from fastws.indexer.publish import Publisher
from fastws.indexer.source import BlockHeader, LogSource
from fastws.indexer.templates import Channels

__all__ = ["ChainIdMismatch", "Indexer", "IndexerStats"]

log = logging.getLogger("fastws.indexer")

RETRACTED_KEPT = 4096        # txHash:logIndex of recent retractions remembered
MAX_HEADERS_PER_STEP = 200   # inside the reorg window: one header per block
HEADER_CONCURRENCY = 8       # header reads in flight at once


@dataclass(slots=True)
class IndexerStats:
    """Counters and gauges of one indexer, read by its metrics collector."""

    network: str = "default"
    head_block: int = 0
    last_timestamp: int = 0           # the last processed block's timestamp (seconds)
    opened: bool = False              # the checkpoint is loaded, the chain id checked
    last_block: int = -1
    events: int = 0
    retractions: int = 0
    reorgs: int = 0
    skipped_logs: int = 0
    followed: int = 0        # contracts followed through --follow
    subscribed: bool = False          # newHeads subscription up (ws:// RPC)
    subscription_failures: int = 0    # newHeads subscriptions refused or lost
    new_heads: int = 0                # newHeads notifications received
    rpc_faults: dict[str, int] = field(default_factory=dict)

    @property
    def lag_blocks(self) -> int:
        """Blocks between the chain head and the last processed block."""
        return max(0, self.head_block - self.last_block) if self.last_block >= 0 else 0

    @property
    def lag_seconds(self) -> float:
        """Seconds between now and the last processed block's timestamp (0 before)."""
        return max(0.0, time.time() - self.last_timestamp) if self.last_timestamp else 0.0

    def fault(self, kind: str) -> None:
        """Count one RPC fault of ``kind`` (transient, error, range)."""
        self.rpc_faults[kind] = self.rpc_faults.get(kind, 0) + 1


class ChainIdMismatch(Exception):
    """The node serves another chain than the configured ``chain_id``."""


class Indexer:
    """Indexes the logs of ``source.addresses`` into ``publisher``.

    ``network`` names the chain in every event (``network``) and in the metrics;
    ``chain_id``, when given, must be the node's (else :meth:`open` raises
    :class:`ChainIdMismatch`); ``channels`` are the channel templates (default
    ``events:{event}`` and ``market:{address}``).

    ``from_block`` sets where a first run starts (default: the first block that is
    not yet safe, i.e. new events only); a stored checkpoint always wins over it.
    ``reorg_window`` is how many recent blocks are kept to survive reorgs.  ``follow``
    names the event whose address argument is a contract to watch from then on
    (``codec`` must decode that contract's events too).  ``heads`` (a started
    :class:`~fastws.indexer.heads.NewHeads`, or any
    :class:`~fastws.indexer.heads.HeadSignal`) wakes the loop at each new block instead
    of every ``poll_interval`` while it is live.
    """

    def __init__(self, source: LogSource, codec: EventCodec, publisher: Publisher,
                 store: CheckpointStore, *, confirmations: int = 2,
                 from_block: int | None = None, poll_interval: float = 1.0,
                 reorg_window: int = 128, stats: IndexerStats | None = None,
                 follow: Follow | None = None, heads: HeadSignal | None = None,
                 network: str = "default", chain_id: int | None = None,
                 channels: Channels | None = None) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        self.source = source
        self.codec = codec
        self.publisher = publisher
        self.store = store
        self.confirmations = confirmations
        self.from_block = from_block
        self.poll_interval = poll_interval
        self.reorg_window = max(1, reorg_window)
        self.stats = stats or IndexerStats()
        self.follow = follow
        self.heads = heads
        self.network = network
        self.expected_chain_id = chain_id
        self.chain_id = chain_id or 0
        self.channels = channels or Channels()
        self.stats.network = network
        self.contracts = list(source.addresses)     # the given ones; followed ones join
        self.cp: Checkpoint | None = None
        self._unknown_topics: set[str] = set()
        self._names = {spec.name: spec.channel_name for spec in codec.events.values()}
        self.progress = asyncio.Event()    # set after each step that saved a checkpoint

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> Checkpoint:
        """Load the checkpoint (checked against chain and contracts), or start one."""
        chain_id = await self.source.chain_id()
        if self.expected_chain_id is not None and chain_id != self.expected_chain_id:
            raise ChainIdMismatch(f"chain id {self.expected_chain_id} is configured for "
                                  f"{self.network}, but its node answers chain id {chain_id}")
        self.chain_id = chain_id
        contracts = list(self.contracts)
        follow = str(self.follow) if self.follow else None
        cp = await self.store.load()
        if cp is not None:
            cp.check(chain_id, contracts, follow)
            log.info("resuming after block %d (checkpoint)", cp.block)
            if cp.followed:
                log.info("following %d contracts created at run time", len(cp.followed))
        else:
            if self.from_block is not None:
                start = self.from_block
            else:
                start = max(0, await self.source.head() - self.confirmations + 2)
            cp = Checkpoint(chain_id=chain_id, contracts=contracts, block=start - 1,
                            follow=follow)
            log.info("first run: starting at block %d", start)
        self.cp = cp
        self.source.addresses = contracts + [f.address for f in cp.followed
                                             if f.address not in contracts]
        self.stats.followed = len(cp.followed)
        self.stats.last_block = cp.block
        if cp.pending:         # stored, not (surely) published before a stop: publish now
            log.info("%s: publishing %d stored events again (same keys)", self.network,
                     len(cp.pending))
            await self._send([(self._channels_of(e.data), e.data, e.key) for e in cp.pending])
            cp.pending = []
            await self.store.save(cp)
        self.stats.opened = True
        return cp

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set (or forever); the caller handles cancellation."""
        if self.cp is None:
            await self.open()
        stop = stop or asyncio.Event()
        while not stop.is_set():
            if self.heads is not None:
                self.heads.woken.clear()     # a head from now on wakes the next wait
            more = await self.step()
            if not more:
                await self._idle(stop)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for the next poll: ``poll_interval``, or the next new head while the
        newHeads subscription is up (and at most SUBSCRIBED_POLL)."""
        heads = self.heads
        waits = [asyncio.ensure_future(stop.wait())]
        timeout = self.poll_interval
        if heads is not None:
            waits.append(asyncio.ensure_future(heads.woken.wait()))
            if heads.live:
                timeout = max(self.poll_interval, SUBSCRIBED_POLL)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # ------------------------------------------------------------------ one poll

    async def step(self) -> bool:
        """One poll; True when it moved forward and more safe blocks may be waiting."""
        cp = self.cp
        assert cp is not None, "call open() first"
        src = self.source
        head = await src.head()
        self.stats.head_block = head
        safe = head - self.confirmations + 1
        tip, tip_hash = cp.block, cp.hashes.get(cp.block)
        if safe <= tip:
            if tip_hash is not None:
                hdr = await src.header(tip)
                if hdr is None or hdr.hash != tip_hash:
                    await self._reorg()
                    return True
            return False
        start = tip + 1
        window_from = safe - self.reorg_window + 1        # first block inside the window
        end = safe
        if end >= window_from:
            end = min(end, max(start, window_from) + MAX_HEADERS_PER_STEP - 1)
        logs, last = await src.logs(start, end)
        created: list[Followed] = []
        if self.follow is not None:
            logs, created = await self._follow(logs, last)

        wanted = {lg.block_number for lg in logs} | {last}
        wanted.update(range(max(start, window_from), last + 1))
        if tip_hash is not None:
            wanted.add(start)
        headers = await self._headers(sorted(wanted))
        if headers is None:        # the chain got shorter since eth_blockNumber
            return False

        if tip_hash is not None and headers[start].parent_hash != tip_hash:
            await self._reorg()
            return True
        for lg in logs:
            if headers[lg.block_number].hash != lg.block_hash:
                log.info("block %d changed while reading it; reading again", lg.block_number)
                return False
        for n in range(max(start, window_from) + 1, last + 1):
            if headers[n].parent_hash != headers[n - 1].hash:
                log.info("blocks %d..%d do not link up; reading again", n - 1, n)
                return False

        events = self._events(logs, headers)
        for f in created:
            log.info("following %s from block %d (created by %s)", f.address, f.block,
                     f.created_by)
            cp.followed.append(f)
            src.addresses.append(f.address)
        self.stats.followed = len(cp.followed)
        for n, hdr in headers.items():
            if n >= window_from:
                cp.hashes[n] = hdr.hash
        cp.hashes[last] = headers[last].hash
        cp.block = last
        for _, data, key, block in events:
            if block >= window_from:
                cp.recent.append(PublishedEvent(key, data))
        self._prune(last)
        await self._commit([(ch, data, key) for ch, data, key, _ in events],
                           added=[data for _, data, _, _ in events])
        self.stats.events += len(events)
        self.stats.last_block = last
        self.stats.last_timestamp = headers[last].timestamp
        self.progress.set()
        return last < safe

    async def _follow(self, logs: list[RawLog],
                      last: int) -> tuple[list[RawLog], list[Followed]]:
        """Add to ``logs`` (blocks up to ``last``) the logs of the contracts that they
        create (``follow``), and of those that these create, from each creating block;
        returns the merged logs, sorted, and the contracts found."""
        assert self.follow is not None
        known = set(self.source.addresses)
        found: list[Followed] = []
        todo = logs
        merged = list(logs)
        while todo:
            new: list[Followed] = []
            for lg in todo:
                spec = self.codec.spec_for(lg)
                child = self.follow.child(spec, lg) if spec is not None else None
                if child is not None and child not in known:
                    known.add(child)
                    new.append(Followed(child, lg.block_number, lg.uid))
            if not new:
                break
            found.extend(new)
            first = min(f.block for f in new)
            todo = await self.source.logs_through(first, last, [f.address for f in new])
            born = {f.address: f.block for f in new}
            todo = [lg for lg in todo if lg.block_number >= born[lg.address]]
            merged.extend(todo)
        merged.sort(key=lambda lg: (lg.block_number, lg.log_index))
        return merged, found

    async def _headers(self, numbers: list[int]) -> dict[int, BlockHeader] | None:
        """The headers of ``numbers``, fetched HEADER_CONCURRENCY at a time; None if one
        is past the head."""
        sem = asyncio.Semaphore(HEADER_CONCURRENCY)

        async def one(n: int) -> BlockHeader | None:
            async with sem:
                return await self.source.header(n)

        got = await asyncio.gather(*(one(n) for n in numbers))
        if any(h is None for h in got):
            return None
        return {n: h for n, h in zip(numbers, got, strict=True) if h is not None}

    async def _commit(self, items: list[tuple[list[str], dict[str, Any], str]], *,
                      added: Sequence[dict[str, Any]] = (),
                      removed: Sequence[dict[str, Any]] = ()) -> None:
        """Publish ``items`` and save the checkpoint: in this order with a plain
        checkpoint store; with a durable store, rows and checkpoint (holding ``items``
        as ``pending``) in one transaction first, then publish, then clear pending."""
        cp = self.cp
        assert cp is not None
        commit = getattr(self.store, "commit", None)
        if commit is None:
            await self._send(items)
            await self.store.save(cp)
            return
        cp.pending = [PublishedEvent(key, data) for _, data, key in items]
        await commit(cp, list(added), list(removed))
        if items:
            await self._send(items)
            cp.pending = []
            await self.store.save(cp)

    def _channels_of(self, data: dict[str, Any]) -> list[str]:
        """The channels of an event's (or retraction's) data, by the templates."""
        name = self._names.get(data["eventType"]) or snake_case(data["eventType"])
        return self.channels.render(data, name, data.get("network", self.network),
                                    int(data.get("chainId", self.chain_id)))

    def _events(self, logs: list[RawLog], headers: dict[int, BlockHeader]
                ) -> list[tuple[list[str], dict[str, Any], str, int]]:
        """The events of ``logs`` (in (block, logIndex) order): (channels, data, key,
        block) each."""
        cp = self.cp
        assert cp is not None
        events: list[tuple[list[str], dict[str, Any], str, int]] = []
        for lg in logs:
            spec = self.codec.spec_for(lg)
            if spec is None:
                self.stats.skipped_logs += 1
                topic = lg.topics[0] if lg.topics else "(anonymous)"
                if topic not in self._unknown_topics:
                    self._unknown_topics.add(topic)
                    log.warning("log with topic %s of %s is not in the ABI; skipped",
                                topic, lg.address)
                continue
            try:
                data = event_data(spec, lg, headers[lg.block_number].timestamp)
            except Exception as exc:  # a log that does not decode with its ABI entry
                self.stats.skipped_logs += 1
                log.warning("cannot decode %s in tx %s: %s; skipped", spec.signature,
                            lg.tx_hash, exc)
                continue
            data["network"] = self.network
            data["chainId"] = self.chain_id
            uid = f"{self.chain_id}:{lg.uid}"
            key = uid if lg.uid not in cp.retracted else f"{uid}:{lg.block_hash}"
            channels = self.channels.render(data, spec.channel_name, self.network,
                                            self.chain_id)
            events.append((channels, data, key, lg.block_number))
        return events

    async def _send(self, events: list[tuple[list[str], dict[str, Any], str]]) -> None:
        """Publish each ``(channels, data, key)`` event to its channels, in order.

        A :class:`~fastws.indexer.publish.BatchPublisher` gets them all as one list (the
        HTTP publisher sends it in a few requests); any other publisher gets one event
        at a time, to all its channels at once: each channel still gets its events in
        order, since the next event waits for all."""
        many = getattr(self.publisher, "publish_many", None)
        if many is not None:
            items = [(ch, data, key) for channels, data, key in events for ch in channels]
            if items:
                await many(items)
            return
        for channels, data, key in events:
            await asyncio.gather(*(self.publisher.publish(ch, data, key) for ch in channels))

    # ------------------------------------------------------------------ reorgs

    async def _reorg(self) -> None:
        """Rewind to the common ancestor, retracting what was published after it."""
        cp = self.cp
        assert cp is not None
        self.stats.reorgs += 1
        ancestor: int | None = None
        for n in sorted(cp.hashes, reverse=True):
            hdr = await self.source.header(n)
            if hdr is not None and hdr.hash == cp.hashes[n]:
                ancestor = n
                break
        if ancestor is None:
            ancestor = (min(cp.hashes) - 1) if cp.hashes else cp.block
            log.error("reorg deeper than the %d-block window; rewinding to block %d",
                      self.reorg_window, ancestor)
        gone = [e for e in cp.recent if e.block > ancestor]
        log.warning("reorg: blocks after %d replaced; retracting %d events",
                    ancestor, len(gone))
        retractions = []
        for ev in reversed(gone):
            data = dict(ev.data, removed=True)
            retractions.append((self._channels_of(data), data, ev.key + ":removed"))
        for _, data, _ in retractions:
            self.stats.retractions += 1
            uid = f"{data['txHash']}:{data['logIndex']}"
            if uid not in cp.retracted:
                cp.retracted.append(uid)
        del cp.retracted[:-RETRACTED_KEPT]
        cp.recent = [e for e in cp.recent if e.block <= ancestor]
        cp.hashes = {n: h for n, h in cp.hashes.items() if n <= ancestor}
        dropped = [f for f in cp.followed if f.block > ancestor]
        if dropped:
            gone_addresses = {f.address for f in dropped}
            log.warning("reorg: no longer following %s (created in an abandoned block)",
                        ", ".join(sorted(gone_addresses)))
            cp.followed = [f for f in cp.followed if f.block <= ancestor]
            self.source.addresses = [a for a in self.source.addresses
                                     if a not in gone_addresses or a in self.contracts]
            self.stats.followed = len(cp.followed)
        cp.block = ancestor
        # all of them are published before this returns: before the new chain's events
        await self._commit(retractions, removed=[e.data for e in gone])
        self.stats.last_block = ancestor

    def _prune(self, last: int) -> None:
        cp = self.cp
        assert cp is not None
        keep_from = last - self.reorg_window + 1
        cp.hashes = {n: h for n, h in cp.hashes.items() if n >= keep_from}
        cp.recent = [e for e in cp.recent if e.block >= keep_from]


def contract_list(value: str | Sequence[str]) -> list[str]:
    """``"0xA,0xB"`` (or a list) as lowercase addresses, order kept, duplicates dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        a = item.strip().lower()
        if a and a not in out:
            out.append(a)
    return out
