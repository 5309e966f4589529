"""One small async database interface over asyncpg and over sqlite3 on a worker thread.

SQL is written once with PostgreSQL's numbered parameters (`$1, $2`); the SQLite
side rewrites them to its own numbered form (`?1, ?2`). Neither side may use a
`$` inside a string literal.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import asyncpg

T = TypeVar("T")

PG_POOL_MAX_SIZE = 10
SQLITE_BUSY_TIMEOUT_MS = 5_000


class LedgerError(Exception):
    """A ledger database failure that callers may handle without knowing the backend."""


class LedgerUnavailable(LedgerError):
    """The database cannot be reached or used right now; callers apply their failure policy."""


class LedgerIntegrityError(LedgerError):
    """A constraint refused a write: a duplicate key or a reference to a missing row."""


class Queries(Protocol):
    """Statements with `$N` parameters; rows come back as dicts."""

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement for its effect."""
        ...

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """All rows of a query."""
        ...

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        """The first row of a query, or None."""
        ...

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        ...

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Run one statement once per row of arguments."""
        ...

    async def copy_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Bulk-load rows into `table` (COPY on PostgreSQL)."""
        ...


class Database(Queries, Protocol):
    """A connection (pool) to one ledger database."""

    dialect: str  # "postgresql" or "sqlite"

    def transaction(self) -> AbstractAsyncContextManager[Queries]:
        """Statements on the yielded object run in one transaction, rolled back on error."""
        ...

    async def close(self) -> None:
        """Release every connection; the object is unusable afterwards."""
        ...


class _Boundary:
    """Re-raises a driver's errors as ledger errors as they leave this module."""

    def __init__(self, classify: Callable[[Exception], type[LedgerError] | None]) -> None:
        self._classify = classify

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception) and (kind := self._classify(exc)) is not None:
            raise kind(str(exc) or type(exc).__name__) from exc


# --- PostgreSQL ---------------------------------------------------------------------------

_PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, unreachable, timed out (TimeoutError is an OSError)
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # a fast shutdown ended our session
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    # A connection broken mid-operation (the server went away) can surface as
    # this on release: "cannot switch to state ...; another operation is in progress".
    asyncpg.exceptions.InternalClientError,
)


def _pg_error_kind(exc: Exception) -> type[LedgerError] | None:
    if isinstance(exc, _PG_UNAVAILABLE):
        return LedgerUnavailable
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return LedgerIntegrityError
    return None


_PG_BOUNDARY = _Boundary(_pg_error_kind)


class _PgQueries:
    """Statements on an asyncpg pool or on one of its connections (both have the same API)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    async def execute(self, sql: str, *args: Any) -> None:
        with _PG_BOUNDARY:
            await self._target.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with _PG_BOUNDARY:
            return [dict(row) for row in await self._target.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        with _PG_BOUNDARY:
            row = await self._target.fetchrow(sql, *args)
        return None if row is None else dict(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with _PG_BOUNDARY:
            return await self._target.fetchval(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        with _PG_BOUNDARY:
            await self._target.executemany(sql, rows)

    async def copy_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        with _PG_BOUNDARY:
            await self._target.copy_records_to_table(table, records=rows, columns=list(columns))


class PostgresDatabase(_PgQueries):
    """PostgreSQL through an asyncpg connection pool."""

    dialect = "postgresql"

    @classmethod
    async def open(cls, dsn: str, max_size: int = PG_POOL_MAX_SIZE) -> PostgresDatabase:
        """Connect a pool to `dsn`; raises LedgerUnavailable when the server cannot be reached."""
        with _PG_BOUNDARY:
            return cls(await asyncpg.create_pool(dsn, min_size=1, max_size=max_size))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        """Statements on the yielded object run in one transaction on one connection."""
        with _PG_BOUNDARY:
            async with self._target.acquire() as conn, conn.transaction():
                yield _PgQueries(conn)

    async def close(self) -> None:
        """Close the pool, waiting for connections in use to be released."""
        await self._target.close()


# --- SQLite -------------------------------------------------------------------------------

# Connection-level trouble, by primary result code; anything else is a bug or a constraint.
_SQLITE_UNAVAILABLE = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR}
)
_PARAMETER = re.compile(r"\$(\d+)")
_Statement = Callable[[sqlite3.Connection, str, tuple[Any, ...]], T]


def _sqlite_error_kind(exc: Exception) -> type[LedgerError] | None:
    if isinstance(exc, OSError):  # the database's directory could not be created
        return LedgerUnavailable
    if isinstance(exc, sqlite3.IntegrityError):
        return LedgerIntegrityError
    if isinstance(exc, sqlite3.OperationalError):
        # Extended result codes carry the primary code in their low byte.
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _SQLITE_UNAVAILABLE:
            return LedgerUnavailable
    return None


_SQLITE_BOUNDARY = _Boundary(_sqlite_error_kind)


@lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    return _PARAMETER.sub(r"?\1", sql)


def _sqlite_param(value: Any) -> Any:
    if isinstance(value, datetime):
        # Fixed width with microseconds and always +00:00, so text order is time order.
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def _execute(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    conn.execute(sql, params).close()


def _fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    with closing(conn.execute(sql, params)) as cur:
        names = [col[0] for col in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _fetch_one(
    conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]
) -> dict[str, Any] | None:
    # Closing resets the statement, which ends the implicit transaction of a
    # partly read result instead of leaving it open until garbage collection.
    with closing(conn.execute(sql, params)) as cur:
        row = cur.fetchone()
        names = [col[0] for col in cur.description or ()]
    return None if row is None else dict(zip(names, row, strict=True))


def _fetch_value(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> Any:
    with closing(conn.execute(sql, params)) as cur:
        row = cur.fetchone()
    return None if row is None else row[0]


def _rollback_if_open(conn: sqlite3.Connection) -> None:
    # Some errors (a full disk, an I/O error) have rolled back already.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _open_sqlite(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit BEGINs; transactions are explicit and IMMEDIATE.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


class _SqliteQueries:
    """Statements on the one connection, each run on its worker thread."""

    def __init__(self, conn: sqlite3.Connection, worker: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._worker = worker

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        with _SQLITE_BOUNDARY:
            return await loop.run_in_executor(self._worker, job, self._conn)

    async def _statement(self, fn: _Statement[T], sql: str, args: tuple[Any, ...]) -> T:
        sql = _sqlite_sql(sql)
        params = tuple(_sqlite_param(arg) for arg in args)
        return await self._run(lambda conn: fn(conn, sql, params))

    async def execute(self, sql: str, *args: Any) -> None:
        await self._statement(_execute, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self._statement(_fetch_all, sql, args)

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        return await self._statement(_fetch_one, sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._statement(_fetch_value, sql, args)

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        sql = _sqlite_sql(sql)
        params = [tuple(_sqlite_param(arg) for arg in row) for row in rows]
        await self._run(lambda conn: conn.executemany(sql, params).close())

    async def copy_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await self.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)


class SqliteDatabase(_SqliteQueries):
    """SQLite through the stdlib driver, one connection on one dedicated thread."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, worker: ThreadPoolExecutor) -> None:
        super().__init__(conn, worker)
        # A transaction's statements share the connection with everyone else's,
        # so nothing else may run on it between its BEGIN and its COMMIT.
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> SqliteDatabase:
        """Open (creating if needed) the database file at `path`, or `:memory:`."""
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        loop = asyncio.get_running_loop()
        try:
            with _SQLITE_BOUNDARY:
                conn = await loop.run_in_executor(worker, _open_sqlite, path, busy_timeout_ms)
        except BaseException:
            worker.shutdown(wait=True)  # idle: the failed open was its only job
            raise
        return cls(conn, worker)

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            return await super()._run(job)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        """Statements on the yielded object run between BEGIN IMMEDIATE and COMMIT."""
        async with self._lock:
            tx = _SqliteQueries(self._conn, self._worker)
            try:
                # IMMEDIATE takes the write lock up front: a transaction that reads
                # and then writes cannot fail half way with SQLITE_BUSY. Inside the
                # `try`: a caller cancelled while its BEGIN runs on the thread must
                # still roll back, or every later BEGIN fails.
                await tx.execute("BEGIN IMMEDIATE")
                yield tx
                await tx.execute("COMMIT")
            except BaseException:
                # The worker runs jobs in order, so this follows any statement still
                # running; shielded, since a cancelled job that has not started never runs.
                await asyncio.shield(tx._run(_rollback_if_open))
                raise

    async def close(self) -> None:
        """Close the connection on its thread, then stop the thread."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await super()._run(sqlite3.Connection.close)
        # The worker is idle now, so joining it does not block.
        self._worker.shutdown(wait=True)


# --- URLs ---------------------------------------------------------------------------------


def sqlite_path(url: str) -> str:
    """The path in a `sqlite:///relative`, `sqlite:////absolute` or `sqlite:///:memory:` URL."""
    scheme, sep, rest = url.partition("://")
    # The authority is always empty, so the path starts after the third slash.
    if scheme != "sqlite" or not sep or not rest.startswith("/") or rest == "/":
        raise ValueError(f"expected a URL such as sqlite:///ledger.db, got {url!r}")
    return rest[1:]


async def connect(url: str) -> Database:
    """Open the database at a `sqlite://`, `postgresql://` or `postgres://` URL."""
    scheme = url.partition("://")[0]
    if scheme in ("postgresql", "postgres"):
        return await PostgresDatabase.open(url)
    if scheme == "sqlite":
        return await SqliteDatabase.open(sqlite_path(url))
    raise ValueError(f"expected a sqlite://, postgresql:// or postgres:// URL, got {url!r}")
