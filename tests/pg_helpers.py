"""PostgreSQL for the indexer's store tests: a database per test, a TCP proxy to cut it.

The tests use the machine's PostgreSQL (``FASTWS_TEST_POSTGRES``, default
``postgresql://postgres@127.0.0.1:5432``: trust auth, user postgres), each in a
database of its own, created and dropped (``WITH (FORCE)``) around the test.  When no
PostgreSQL answers, the tests FAIL with one line saying so: a skip would let CI pass
without ever testing the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

PG = os.environ.get("FASTWS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432").rstrip("/")


async def _admin() -> Any:
    import asyncpg

    try:
        return await asyncpg.connect(PG + "/postgres", timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(f"no PostgreSQL answers at {PG} ({type(exc).__name__}: {exc}); the "
                    "store tests need one (trust auth, user postgres; or set "
                    "FASTWS_TEST_POSTGRES to a server's URL)", pytrace=False)


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a fresh, empty database, dropped afterwards (``WITH (FORCE)``)."""
    admin = await _admin()
    name = f"fastws_test_{secrets.token_hex(6)}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG}/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def query(url: str, sql: str, *args: Any) -> list[Any]:
    """The rows of one query (a connection of its own)."""
    import asyncpg

    con = await asyncpg.connect(url, timeout=5)
    try:
        return list(await con.fetch(sql, *args))
    finally:
        await con.close()


async def count(url: str, sql: str, *args: Any) -> int:
    """``SELECT count(*) …``: 0 when the table does not exist yet."""
    import asyncpg

    try:
        rows = await query(url, sql, *args)
    except asyncpg.UndefinedTableError:
        return 0
    return int(rows[0][0])


class PgProxy:
    """A TCP proxy to PostgreSQL that a test opens and cuts: :meth:`start` listens on
    ``port`` (chosen once), :meth:`cut` closes the listener and every connection."""

    def __init__(self, port: int, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.port, self.target = port, target
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()


def main() -> int:
    """``make test``'s check: say clearly (and exit 1) when no PostgreSQL answers."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(PG)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    try:
        socket.create_connection((host, port), 3).close()
    except OSError as exc:
        print(f"make test: NO POSTGRESQL ANSWERS at {host}:{port} ({exc}): the indexer's "
              "store tests (tests/test_indexer_store.py) will FAIL. Start PostgreSQL (trust "
              "auth, user postgres) or point FASTWS_TEST_POSTGRES at one.")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
