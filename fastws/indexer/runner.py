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

Exactly once: an event is published with the idempotency key ``txHash:logIndex``;
the checkpoint is saved after the range's publications were accepted, so a crash
re-publishes at most that range and the server drops the repeats (it remembers keys
for 5 minutes).  A retraction's key is the event's key plus ``:removed``; an event that
comes back in another block after a retraction gets ``txHash:logIndex:<blockHash>``,
so that the server does not take it for a repeat of the retracted one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastws.indexer.checkpoint import Checkpoint, CheckpointStore, Followed, PublishedEvent
from fastws.indexer.heads import SUBSCRIBED_POLL, HeadSignal
from fastws.indexer.mapping import EventCodec, Follow, RawLog, event_data, snake_case
from fastws.indexer.publish import Publisher
from fastws.indexer.source import BlockHeader, LogSource

__all__ = ["Indexer", "IndexerStats"]

log = logging.getLogger("fastws.indexer")

RETRACTED_KEPT = 4096        # txHash:logIndex of recent retractions remembered
MAX_HEADERS_PER_STEP = 200   # inside the reorg window: one header per block
HEADER_CONCURRENCY = 8       # header reads in flight at once


@dataclass(slots=True)
class IndexerStats:
    """Counters and gauges of one indexer, read by its metrics collector."""

    head_block: int = 0
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

    def fault(self, kind: str) -> None:
        """Count one RPC fault of ``kind`` (transient, error, range)."""
        self.rpc_faults[kind] = self.rpc_faults.get(kind, 0) + 1


class Indexer:
    """Indexes the logs of ``source.addresses`` into ``publisher``.

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
                 follow: Follow | None = None, heads: HeadSignal | None = None) -> None:
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
        self.contracts = list(source.addresses)     # the given ones; followed ones join
        self.cp: Checkpoint | None = None
        self._unknown_topics: set[str] = set()
        self.progress = asyncio.Event()    # set after each step that saved a checkpoint

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> Checkpoint:
        """Load the checkpoint (checked against chain and contracts), or start one."""
        chain_id = await self.source.chain_id()
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

        await self._publish_logs(logs, headers, window_from)
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
        self._prune(last)
        await self.store.save(cp)
        self.stats.last_block = last
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

    async def _publish_logs(self, logs: list[RawLog], headers: dict[int, BlockHeader],
                            window_from: int) -> None:
        """Publish the events of ``logs`` (in (block, logIndex) order) and remember those
        inside the reorg window."""
        cp = self.cp
        assert cp is not None
        events: list[tuple[str, dict[str, Any], str, int]] = []
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
            key = lg.uid if lg.uid not in cp.retracted else f"{lg.uid}:{lg.block_hash}"
            events.append((spec.channel_name, data, key, lg.block_number))
        await self._send([(name, data, key) for name, data, key, _ in events])
        for _, data, key, block in events:
            self.stats.events += 1
            if block >= window_from:
                cp.recent.append(PublishedEvent(key, data))

    async def _send(self, events: list[tuple[str, dict[str, Any], str]]) -> None:
        """Publish each ``(channel name, data, key)`` event to its two channels, in order.

        A :class:`~fastws.indexer.publish.BatchPublisher` gets them all as one list (the
        HTTP publisher sends it in a few requests); any other publisher gets one event
        at a time, to both channels at once: each channel still gets its events in
        order, since the next event waits for both."""
        many = getattr(self.publisher, "publish_many", None)
        if many is not None:
            await many([item for name, data, key in events
                        for item in ((f"events:{name}", data, key),
                                     (f"market:{data['marketAddress']}", data, key))])
            return
        for name, data, key in events:
            await asyncio.gather(
                self.publisher.publish(f"events:{name}", data, key),
                self.publisher.publish(f"market:{data['marketAddress']}", data, key))

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
        names = {spec.name: spec.channel_name for spec in self.codec.events.values()}
        retractions = []
        for ev in reversed(gone):
            data = dict(ev.data, removed=True)
            channel_name = names.get(data["eventType"]) or snake_case(data["eventType"])
            retractions.append((channel_name, data, ev.key + ":removed"))
        # all of them are published before this returns: before the new chain's events
        await self._send(retractions)
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
        await self.store.save(cp)
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
