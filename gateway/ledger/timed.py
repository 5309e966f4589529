"""A `Database` whose every call is timed and whose failures are counted (LedgerMetrics)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from gateway.ledger.db import Database, LedgerError, Queries
from gateway.metrics import LedgerMetrics

T = TypeVar("T")


class TimedDatabase:
    """Wraps a `Database`: each statement, and each transaction as a whole, observed once.

    Statements inside a transaction are the transaction's: timing them apart
    would count their time twice.
    """

    def __init__(self, db: Database, metrics: LedgerMetrics) -> None:
        self._db = db
        self._metrics = metrics
        self.dialect = db.dialect

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except LedgerError:
            self._metrics.errors.labels(op).inc()
            raise
        finally:
            self._metrics.duration.labels(op).observe(time.perf_counter() - started)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._timed("execute", self._db.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self._timed("fetch", self._db.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        return await self._timed("fetchrow", self._db.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._timed("fetchval", self._db.fetchval(sql, *args))

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        await self._timed("executemany", self._db.executemany(sql, rows))

    async def copy_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        await self._timed("copy_rows", self._db.copy_rows(table, columns, rows))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        started = time.perf_counter()
        try:
            async with self._db.transaction() as queries:
                yield queries
        except LedgerError:
            self._metrics.errors.labels("transaction").inc()
            raise
        finally:
            self._metrics.duration.labels("transaction").observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self._db.close()
