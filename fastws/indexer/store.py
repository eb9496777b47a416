"""The durable event store: every confirmed event a row of PostgreSQL (``--store``).

:class:`EventStore` holds one asyncpg pool for every chain of the indexer and creates
what it needs when missing (in a transaction holding an advisory lock, so that two
indexers starting at once do not race)::

    fastws_events       one row per event: network, chain_id, block_number,
                        block_hash, tx_hash, log_index, address, event, args (jsonb),
                        block_timestamp (timestamptz), removed (bool), indexed_at;
                        unique on (chain_id, block_hash, log_index), indexed on
                        (chain_id, address, block_number)
    fastws_checkpoints  one row per chain checkpoint: key, network, chain_id,
                        block_number (the last processed block), doc (jsonb)

:class:`ChainStore` is one chain's view: a checkpoint store (``load``, ``save``) whose
:meth:`ChainStore.commit` writes a range's new rows (or marks a reorg's rows
``removed``) and the checkpoint in one transaction (see
:mod:`fastws.indexer.runner` for the order of store and publish).  A row that comes
back (a reorg back to a block seen before) is set ``removed = false`` again.

The store unreachable (refused, reset, timed out, restarting) → every call is
retried with full-jitter backoff (0.2 s doubling up to 10 s), a warning per retry
naming the store (without its password); nothing new is published meanwhile, since
publishing waits for the commit.  ``ready`` is false from a failed call until the next
one succeeds (the indexer's ``/readyz``).  Needs ``asyncpg`` (the ``chain`` extra).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from fastws.indexer.checkpoint import Checkpoint
from fastws.indexer.source import Backoff

__all__ = ["SCHEMA", "ChainStore", "EventStore", "redact"]

log = logging.getLogger("fastws.indexer")

SCHEMA = """
CREATE TABLE IF NOT EXISTS fastws_events (
    id              bigserial PRIMARY KEY,
    network         text        NOT NULL,
    chain_id        bigint      NOT NULL,
    block_number    bigint      NOT NULL,
    block_hash      text        NOT NULL,
    tx_hash         text        NOT NULL,
    log_index       bigint      NOT NULL,
    address         text        NOT NULL,
    event           text        NOT NULL,
    args            jsonb       NOT NULL,
    block_timestamp timestamptz NOT NULL,
    removed         boolean     NOT NULL DEFAULT false,
    indexed_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, block_hash, log_index)
);
CREATE INDEX IF NOT EXISTS fastws_events_chain_address_block
    ON fastws_events (chain_id, address, block_number);
CREATE TABLE IF NOT EXISTS fastws_checkpoints (
    key          text        PRIMARY KEY,
    network      text        NOT NULL,
    chain_id     bigint      NOT NULL,
    block_number bigint      NOT NULL,
    doc          jsonb       NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
"""

_INSERT = """
INSERT INTO fastws_events (network, chain_id, block_number, block_hash, tx_hash,
                           log_index, address, event, args, block_timestamp)
SELECT $1::text, $2::bigint, t.b, t.bh, t.th, t.li, t.a, t.e, t.ar::jsonb, to_timestamp(t.ts)
FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[],
            $9::text[], $10::bigint[]) AS t(b, bh, th, li, a, e, ar, ts)
ON CONFLICT (chain_id, block_hash, log_index) DO UPDATE SET removed = false
"""

_REMOVE = """
UPDATE fastws_events SET removed = true
FROM unnest($2::text[], $3::bigint[]) AS t(bh, li)
WHERE chain_id = $1 AND block_hash = t.bh AND log_index = t.li
"""

_SAVE = """
INSERT INTO fastws_checkpoints (key, network, chain_id, block_number, doc, updated_at)
VALUES ($1, $2, $3, $4, $5::jsonb, now())
ON CONFLICT (key) DO UPDATE SET network = excluded.network, chain_id = excluded.chain_id,
    block_number = excluded.block_number, doc = excluded.doc, updated_at = now()
"""


def redact(url: str) -> str:
    """``url`` without its password (for log lines)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _retryable() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.exceptions.OperatorInterventionError,
            asyncpg.exceptions.InsufficientResourcesError)


def _is_config_error(exc: BaseException) -> bool:
    """A URL that no retry can fix (asyncpg calls it an InterfaceError too)."""
    import asyncpg

    return isinstance(exc, asyncpg.exceptions.ClientConfigurationError)


class EventStore:
    """One PostgreSQL database for every chain of the indexer (an asyncpg pool)."""

    def __init__(self, url: str, *, backoff: Backoff | None = None, max_size: int = 8,
                 connect_timeout: float = 5.0, sleep: Callable[[float], Awaitable[None]]
                 | None = None) -> None:
        self.url = url
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.ready = False
        self.failures = 0
        self._pool: Any = None
        self._sleep = sleep or asyncio.sleep
        self._opening: Any = None

    async def _open_pool(self) -> Any:
        import asyncpg

        if self._pool is None:
            pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.max_size,
                                             timeout=self.connect_timeout,
                                             command_timeout=30.0)
            try:
                async with pool.acquire() as con, con.transaction():
                    await con.execute("SELECT pg_advisory_xact_lock(hashtext('fastws_events'))")
                    await con.execute(SCHEMA)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
        return self._pool

    async def run(self, what: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """``fn(connection)`` on a pooled connection, retried with backoff while the
        store cannot be reached."""
        retry_on = _retryable()
        attempt = 0
        while True:
            try:
                pool = await self._open_pool()
                async with pool.acquire() as con:
                    result = await fn(con)
            except retry_on as exc:
                if _is_config_error(exc):
                    raise
                self.ready = False
                self.failures += 1
                delay = self.backoff.delay(attempt)
                log.warning("store %s: %s failed (%s: %s); retry in %.2fs, publishing "
                            "nothing new meanwhile", redact(self.url), what,
                            type(exc).__name__, exc, delay)
                attempt += 1
                await self._sleep(delay)
                continue
            if not self.ready:
                log.info("store %s: connected", redact(self.url))
            self.ready = True
            return result

    async def connect(self) -> None:
        """Open the pool and create the tables (retried until the store answers)."""
        await self.run("connect", lambda con: con.fetchval("SELECT 1"))

    def chain(self, key: str, network: str) -> ChainStore:
        """The checkpoint store of one chain (``key``: its checkpoint's row)."""
        return ChainStore(self, key, network)

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (TimeoutError, OSError):     # a store that does not answer any more
                pool.terminate()


class ChainStore:
    """One chain's checkpoint in ``fastws_checkpoints`` and its rows of
    ``fastws_events``."""

    def __init__(self, store: EventStore, key: str, network: str) -> None:
        self.store, self.key, self.network = store, key, network
        self.commits = 0

    async def load(self) -> Checkpoint | None:
        """The stored checkpoint, or None."""
        raw = await self.store.run(
            f"checkpoint read ({self.key})",
            lambda con: con.fetchval("SELECT doc::text FROM fastws_checkpoints WHERE key = $1",
                                     self.key))
        return Checkpoint.from_json(orjson.loads(raw)) if raw else None

    async def save(self, checkpoint: Checkpoint) -> None:
        """Write the checkpoint alone."""
        body = orjson.dumps(checkpoint.to_json()).decode()
        await self.store.run(f"checkpoint write ({self.key})",
                             lambda con: con.execute(_SAVE, self.key, self.network,
                                                     checkpoint.chain_id, checkpoint.block,
                                                     body))

    async def commit(self, checkpoint: Checkpoint, added: list[dict[str, Any]],
                     removed: list[dict[str, Any]]) -> None:
        """In one transaction: insert the rows of the events ``added`` (their published
        data), set ``removed`` on the rows of ``removed``, save ``checkpoint``."""
        body = orjson.dumps(checkpoint.to_json()).decode()
        chain_id = checkpoint.chain_id
        cols: list[list[Any]] = [[], [], [], [], [], [], [], []]
        for d in added:
            for col, value in zip(cols, (d["blockNumber"], d["blockHash"], d["txHash"],
                                         d["logIndex"], d["marketAddress"], d["eventType"],
                                         orjson.dumps(d["args"]).decode(), d["timestamp"]),
                                  strict=True):
                col.append(value)
        gone_hashes = [d["blockHash"] for d in removed]
        gone_index = [d["logIndex"] for d in removed]

        async def tx(con: Any) -> None:
            async with con.transaction():
                if added:
                    await con.execute(_INSERT, self.network, chain_id, *cols)
                if removed:
                    await con.execute(_REMOVE, chain_id, gone_hashes, gone_index)
                await con.execute(_SAVE, self.key, self.network, chain_id, checkpoint.block,
                                  body)

        await self.store.run(f"commit of block {checkpoint.block} ({self.network})", tx)
        self.commits += 1
