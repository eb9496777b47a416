"""Where the indexer remembers how far it got: the checkpoint and its stores.

The checkpoint names the last fully processed block and keeps what a reorg needs
after a restart: the hashes of the recent blocks (the reorg window) and the events
published from them (to retract them); with a durable store, the publications
written to it but not yet known to be published (``pending``); with ``--follow``, also
the contracts followed so far (each with the block of the event that created it).
It is saved after every processed range, once all of the range's publications were
accepted, so a restart re-publishes at most one range, and the idempotency keys make
the server drop those repeats.

Stores: :class:`FileCheckpoint` (a local JSON file, replaced atomically) with the HTTP
publisher; :class:`RedisCheckpoint` (one key, next to the broker's data) with
``--broker redis://``; :class:`MemoryCheckpoint` for the in-process demo.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Checkpoint", "CheckpointMismatch", "CheckpointStore", "FileCheckpoint",
           "Followed", "MemoryCheckpoint", "PublishedEvent", "RedisCheckpoint"]

VERSION = 1


class CheckpointMismatch(Exception):
    """The stored checkpoint belongs to another chain or another set of contracts."""


@dataclass(slots=True)
class PublishedEvent:
    """An event published from a block that may still be reorganized away."""

    key: str                 # the idempotency key it was published with
    data: dict[str, Any]     # its data, as published

    @property
    def block(self) -> int:
        return int(self.data["blockNumber"])


@dataclass(frozen=True, slots=True)
class Followed:
    """A contract followed because a watched contract's event named it (``--follow``)."""

    address: str     # lowercase 0x address
    block: int       # the block of the creating event: its logs are read from there
    created_by: str  # txHash:logIndex of the creating event

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"address": self.address, "block": self.block, "createdBy": self.created_by}


@dataclass(slots=True)
class Checkpoint:
    """The indexer's durable state."""

    chain_id: int
    contracts: list[str]
    block: int                                    # last fully processed block
    hashes: dict[int, str] = field(default_factory=dict)       # recent block → hash
    recent: list[PublishedEvent] = field(default_factory=list)  # published, in the window
    retracted: list[str] = field(default_factory=list)         # txHash:logIndex, recent
    follow: str | None = None                     # the --follow EVENT.ARG it was written with
    followed: list[Followed] = field(default_factory=list)     # contracts found by it
    pending: list[PublishedEvent] = field(default_factory=list)  # stored, to publish

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (block numbers as keys become a list of pairs)."""
        return {
            "version": VERSION,
            "chainId": self.chain_id,
            "contracts": self.contracts,
            "block": self.block,
            "hashes": sorted([n, h] for n, h in self.hashes.items()),
            "recent": [{"key": e.key, "data": e.data} for e in self.recent],
            "retracted": self.retracted,
            "follow": self.follow,
            "followed": [f.to_json() for f in self.followed],
            **({"pending": [{"key": e.key, "data": e.data} for e in self.pending]}
               if self.pending else {}),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Checkpoint:
        """Read what :meth:`to_json` wrote."""
        if doc.get("version") != VERSION:
            raise ValueError(f"unknown checkpoint version {doc.get('version')!r}")
        return cls(
            chain_id=int(doc["chainId"]),
            contracts=[str(a) for a in doc["contracts"]],
            block=int(doc["block"]),
            hashes={int(n): str(h) for n, h in doc.get("hashes", ())},
            recent=[PublishedEvent(str(e["key"]), dict(e["data"])) for e in doc.get("recent", ())],
            retracted=[str(u) for u in doc.get("retracted", ())],
            follow=doc.get("follow"),
            followed=[Followed(str(f["address"]), int(f["block"]), str(f["createdBy"]))
                      for f in doc.get("followed", ())],
            pending=[PublishedEvent(str(e["key"]), dict(e["data"]))
                     for e in doc.get("pending", ())],
        )

    def check(self, chain_id: int, contracts: list[str], follow: str | None = None) -> None:
        """Raise :class:`CheckpointMismatch` unless it was written for this chain, these
        contracts and this ``--follow``."""
        if self.chain_id != chain_id:
            raise CheckpointMismatch(f"written for chain id {self.chain_id}, not {chain_id}")
        if sorted(self.contracts) != sorted(contracts):
            raise CheckpointMismatch(f"written for contracts {','.join(self.contracts)}")
        if self.follow != follow:
            was = f"--follow {self.follow}" if self.follow else "no --follow"
            raise CheckpointMismatch(f"written with {was}")


class CheckpointStore(Protocol):
    """Loads and saves one checkpoint."""

    async def load(self) -> Checkpoint | None:
        """The saved checkpoint, or None before the first save."""
        ...

    async def save(self, checkpoint: Checkpoint) -> None:
        """Persist ``checkpoint`` (atomically: a crash leaves the old or the new one)."""
        ...


class MemoryCheckpoint:
    """A checkpoint that lives as long as the process (the in-process demo)."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self.saves = 0

    async def load(self) -> Checkpoint | None:
        return Checkpoint.from_json(self.doc) if self.doc is not None else None

    async def save(self, checkpoint: Checkpoint) -> None:
        self.doc = json.loads(json.dumps(checkpoint.to_json()))
        self.saves += 1


class FileCheckpoint:
    """A JSON file, written to a temporary file, fsynced and renamed over the old one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def load(self) -> Checkpoint | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return Checkpoint.from_json(json.loads(text))

    async def save(self, checkpoint: Checkpoint) -> None:
        body = json.dumps(checkpoint.to_json(), separators=(",", ":")).encode()
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class RedisCheckpoint:
    """One Redis key holding the checkpoint's JSON (``SET`` replaces it atomically).

    Redis errors are retried with backoff: the indexer waits for Redis rather than
    losing its place.
    """

    def __init__(self, url: str, key: str) -> None:
        import redis.asyncio as aioredis

        self.url, self.key = url, key
        self._redis = aioredis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)

    async def _retry(self, what: str, fn: Any) -> Any:
        import redis.exceptions

        from fastws.indexer.source import Backoff, retry_forever

        return await retry_forever(fn, f"checkpoint {what} ({self.key})", Backoff(0.1, 5.0),
                                   (redis.exceptions.ConnectionError,
                                    redis.exceptions.TimeoutError, OSError))

    async def load(self) -> Checkpoint | None:
        raw = await self._retry("read", lambda: self._redis.get(self.key))
        return Checkpoint.from_json(json.loads(raw)) if raw else None

    async def save(self, checkpoint: Checkpoint) -> None:
        body = json.dumps(checkpoint.to_json(), separators=(",", ":"))
        await self._retry("write", lambda: self._redis.set(self.key, body))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
