"""Recovery: replay what a subscriber missed, and notice what this node missed.

Two jobs, both about stream positions (docs/history.md):

* :meth:`Recovery.recover` — a subscribe with ``since`` (or ``positioned``) reads the
  channel's history (a pattern: its namespace's log) and sends the publications
  after the client's position before ``subscribed``, merging what arrives live
  meanwhile without a duplicate or a gap.
* Gap detection — the node remembers the last ``(epoch, offset)`` it delivered per
  channel (:meth:`Recovery.on_publication`); a jump, a periodic comparison with the
  broker's top (:meth:`Recovery.check_positions`) or a broker reconnect
  (:meth:`Recovery.reset`) closes the affected subscribers with 4010 so that their
  clients recover with ``since``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastws import channels, protocol
from fastws._match import glob_match
from fastws.broker import BrokerUnavailable
from fastws.broker.base import NS_LOG_SIZE
from fastws.broker.memory import MemoryBroker
from fastws.codes import DISCONNECT_INSUFFICIENT_STATE

if TYPE_CHECKING:
    from fastws.node import Node
    from fastws.session import Session

__all__ = ["Recovery"]

log = logging.getLogger("fastws")

POSITION_CHECK_INTERVAL = 10.0  # seconds between checks of channel positions (gaps)
MAX_POSITIONS = 100_000         # channels whose last offset is remembered (gap detection)
CHECK_BATCH = 1000              # channels checked per round
LAST_SCAN = 1000                # a pattern's `last` N: found among the log's newest entries


class Recovery:
    """Stream positions of one node: replay on subscribe, gap detection."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # per channel, buffers of sessions recovering with `since` (see recover);
        # under "": (pattern, buffer) of pattern subscriptions recovering
        self._recovering: dict[str, list[Any]] = {}
        # per channel: (epoch, offset) of the last publication delivered (gap detection)
        self._positions: dict[str, tuple[str, int]] = {}
        self.gaps = 0
        self._check_from = 0
        self._task: asyncio.Task | None = None
        # the memory broker cannot lose a publication: no gap detection, no check
        self.track = not isinstance(node.broker, MemoryBroker)

    def start(self) -> None:
        """Start the periodic position check (a broker that can lose publications)."""
        if self.track:
            self._task = asyncio.get_running_loop().create_task(self._position_loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # ------------------------------------------------------------ live publications

    def on_publication(self, channel: str, payload: bytes, offset: int, epoch: str,
                       log_offset: int, log_epoch: str) -> None:
        """Each publication before it is fanned out: check its position, and keep its
        push (``payload``, as the live subscribers get it) for the sessions recovering
        this channel."""
        if offset and self.track:
            last = self._positions.get(channel)
            self._positions[channel] = (epoch, offset)
            if last is not None and (offset > last[1] + 1 if last[0] == epoch
                                     else offset != 1):
                self._gap(channel, last, epoch, offset)
            elif last is None and len(self._positions) > MAX_POSITIONS:
                self._positions.clear()
        if self._recovering:
            waiting = self._recovering.get(channel)
            if waiting:
                for buf in waiting:
                    buf.append((offset, epoch, payload, log_offset, log_epoch))
            for pattern, buf in self._recovering.get("", ()):
                if glob_match(pattern, channel):
                    buf.append((channel, offset, epoch, payload, log_offset, log_epoch))

    def forget(self, name: str) -> None:
        """The node no longer delivers ``name``: a later subscribe starts afresh."""
        if channels.is_pattern(name):
            self._positions.clear()
        else:
            self._positions.pop(name, None)

    # ------------------------------------------------------------ gaps

    def _gap(self, channel: str, last: tuple[str, int], epoch: str, offset: int) -> None:
        """``channel``'s offsets jumped (a publication never reached this node, e.g. Redis
        pub/sub dropped it): close its local subscribers with 4010 so that their clients
        recover with ``since``."""
        self.gaps += 1
        log.warning("publications lost on %s (%s:%d, then %s:%d): closing its subscribers "
                    "with 4010", channel, last[0], last[1], epoch, offset)
        for sess in self.node.hub.subscribers(channel):
            if not sess.closing:
                sess.disconnect(DISCONNECT_INSUFFICIENT_STATE)

    async def check_positions(self) -> int:
        """Compare the last offset this node delivered on each channel with the broker's
        top (like Centrifugo's positioning): a channel that went on without us lost
        publications here, so its subscribers are closed with 4010.  Returns how many
        channels were found behind."""
        broker = self.node.broker
        names = list(self._positions)
        if not names or not broker.up:
            return 0
        if len(names) > CHECK_BATCH:  # a slice per round, in turn
            start = self._check_from % len(names)
            names = (names[start:] + names[:start])[:CHECK_BATCH]
            self._check_from = start + CHECK_BATCH
        tops = await asyncio.gather(*(broker.history(n, limit=0) for n in names),
                                    return_exceptions=True)
        await broker.sync()  # whatever was published before the reads is delivered
        behind = 0
        for name, top in zip(names, tops, strict=True):
            seen = self._positions.get(name)
            if isinstance(top, BaseException) or seen is None or not top.offset:
                continue
            if (top.epoch, top.offset) != seen and (top.epoch != seen[0]
                                                    or top.offset > seen[1]):
                behind += 1
                self._positions[name] = (top.epoch, top.offset)
                self._gap(name, seen, top.epoch, top.offset)
        return behind

    async def _position_loop(self) -> None:
        while True:
            await asyncio.sleep(POSITION_CHECK_INTERVAL)
            try:
                await self.check_positions()
            except BrokerUnavailable:
                pass
            except Exception:
                log.exception("position check failed")

    def reset(self, lost: Callable[[str], bool] | None = None) -> None:
        """After the broker reconnected: publications may have been lost meanwhile, so
        subscribed sessions are closed with 4010 and their clients recover with
        ``since``.  With ``lost`` (one Redis Cluster shard came back) only the sessions
        holding a channel it names, or any pattern (its feeds span every shard)."""
        if lost is None:
            self._positions.clear()
        else:
            for name in [n for n in self._positions if lost(n)]:
                del self._positions[name]
        for sess in self.node.hub.connections():
            if sess.subs and not sess.closing and (lost is None or any(
                    channels.is_pattern(n) or lost(n) for n in sess.subs)):
                sess.disconnect(DISCONNECT_INSUFFICIENT_STATE)

    # ------------------------------------------------------------ replay

    async def recover(self, sess: Session, name: str,
                      since: protocol.Since | None, last: int = 0) -> dict[str, Any]:
        """Send the publications missed after ``since`` as event pushes; returns what
        goes into ``subscribed``: ``recovered`` (were they all still there) and, for a
        channel with history, its stream's ``offset``/``epoch`` after the replay (the
        clients keep it when ``recovered`` is false).  Without ``since`` (a
        ``positioned`` subscribe) only the position: everything after it is delivered.
        ``last`` (without ``since``): the newest ``last`` publications kept are sent
        first (SPEC §13), then the position is answered the same way."""
        if since is not None:
            last = 0
        if channels.is_pattern(name):
            return await self._recover_pattern(sess, name, since, last)
        broker = self.node.broker
        ns = self.node.config.for_channel(name)
        if ns.history_size <= 0:
            return {} if since is None else {"recovered": False}
        # The broker delivers this channel already: publications that arrive while
        # history is read are kept and sent after it (without repeating what it held).
        # broker.sync() waits until everything published before the read has reached
        # us (a Redis pub/sub connection may lag behind the command connection), so
        # none of those can come live after the merge, duplicating history.
        buf: list[tuple[int, str, bytes, int, str]] = []
        waiting = self._recovering.setdefault(name, [])
        waiting.append(buf)
        try:
            hist = await broker.history(
                name, limit=ns.history_size if since is not None else last,
                since_offset=since.offset if since is not None else None,
                since_epoch=since.epoch if since is not None else None)
            await broker.sync()
        finally:
            waiting.remove(buf)
            if not waiting:
                self._recovering.pop(name, None)
        if hist.recovered and (since is not None or last):
            for offset, data, *sender in hist.publications:  # (the sender: SPEC §13)
                sess.send_text(protocol.replay_payload(name, data, offset, hist.epoch,
                                                       *sender))
        for offset, epoch, payload, _log_offset, _log_epoch in buf:
            if offset == 0 or epoch != hist.epoch or offset > hist.offset:
                sess.send_text(payload)
        if self.track and hist.offset and name not in self._positions:
            # everything up to the top has reached us (sync): checks start from there
            self._positions[name] = (hist.epoch, hist.offset)
        if since is None:
            return {"offset": hist.offset, "epoch": hist.epoch}
        return {"recovered": hist.recovered, "offset": hist.offset, "epoch": hist.epoch}

    async def _recover_pattern(self, sess: Session, name: str,
                               since: protocol.Since | None, last: int = 0) -> dict[str, Any]:
        """Recover a pattern from its namespace's log: ``since`` is the last event the
        subscription delivered (its ``channel``, ``offset``, ``epoch``), or without
        ``channel`` a position in the log itself (what a ``positioned`` subscribe
        answered); the log's entries after it that the pattern matches are replayed,
        then what came meanwhile (merged by log offset, which the broker hands the node
        internally).  Without ``since``, only the log's position is answered."""
        broker = self.node.broker
        nothing: dict[str, Any] = {} if since is None else {"recovered": False}
        space = channels.namespace_of(name)
        if not space or not broker.keeps_logs or (
                since is not None and since.channel and not glob_match(name, since.channel)):
            return nothing  # spans namespaces, a broker without logs (cluster), no position
        ns = self.node.config.namespace(space)
        if ns.history_size <= 0 or ns.private:
            return nothing
        entry: tuple[str, list[tuple[str, int, str, bytes, int, str]]] = (name, [])
        waiting = self._recovering.setdefault("", [])
        waiting.append(entry)
        try:
            hist = await broker.log_history(
                space, limit=NS_LOG_SIZE if since is not None else 0,
                since_channel=since.channel if since is not None else "",
                since_offset=since.offset if since is not None else 0,
                since_epoch=since.epoch if since is not None else "")
            if last and hist.offset:  # the log's newest entries, for the last N matching
                hist = await broker.log_history(
                    space, limit=LAST_SCAN, since_channel="",
                    since_offset=max(0, hist.offset - LAST_SCAN), since_epoch=hist.epoch)
                matching = [p for p in hist.publications if glob_match(name, p[1])]
                for _log_offset, channel, offset, epoch, data, *sender in matching[-last:]:
                    sess.send_text(protocol.replay_payload(channel, data, offset, epoch,
                                                           *sender))
            await broker.sync()
        finally:
            waiting.remove(entry)
            if not waiting:
                self._recovering.pop("", None)
        if hist.recovered and since is not None:
            for _log_offset, channel, offset, epoch, data, *sender in hist.publications:
                if glob_match(name, channel):
                    sess.send_text(protocol.replay_payload(channel, data, offset, epoch,
                                                           *sender))
        for _channel, _offset, _epoch, payload, log_offset, log_epoch in entry[1]:
            if log_offset == 0 or log_epoch != hist.epoch or log_offset > hist.offset:
                sess.send_text(payload)
        if since is None:
            return {"offset": hist.offset, "epoch": hist.epoch}
        return {"recovered": hist.recovered}
