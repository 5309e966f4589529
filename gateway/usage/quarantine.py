"""Usage entries the ledger refuses for good: set aside where an operator sees and replays
them, so that everything after them is still written.

A batch the ledger refuses for a reason other than being unreachable is written
again in halves, down to single entries; the entries it refuses one by one are
quarantined (in the ledger's `usage_quarantine` table, each as its wire line
with the error) and counted, and the rest is written as usual. When every part
of a batch fails, the fault is the ledger's, not the entries': nothing is
quarantined and the caller retries, unless the batch is a single entry that
failed `SINGLE_ATTEMPTS` times in a row. `gateway usage quarantine` lists the
entries, and with `--replay` writes them again (after the cause is fixed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter

from gateway.clock import utc_now
from gateway.ledger.db import Database, LedgerUnavailable
from gateway.ledger.timestamps import loaded, required, utc
from gateway.ledger.usage_ledger import Written

log = logging.getLogger("gateway.usage")
T = TypeVar("T")
SINGLE_ATTEMPTS = 3

_PUT = "INSERT INTO usage_quarantine (source, line, error, at) VALUES ($1, $2, $3, $4)"
_LIST = "SELECT id, source, line, error, at FROM usage_quarantine ORDER BY id LIMIT $1"
_DELETE = "DELETE FROM usage_quarantine WHERE id = $1"


class LedgerRefused(Exception):
    """Every part of a batch failed: the ledger's fault, to be retried later."""


class QuarantineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.quarantined = Counter(
            "gateway_usage_quarantined_events_total",
            "Usage entries the ledger refused for good, set aside in usage_quarantine "
            "(see `gateway usage quarantine`), by the component that met them",
            ["source"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class Quarantined:
    id: int
    source: str
    line: str  # the entry's wire form
    error: str
    at: datetime


class Quarantine:
    """The quarantine table, written by one component (`source`: recorder, worker, journal)."""

    def __init__(self, db: Database, source: str, metrics: QuarantineMetrics | None = None) -> None:
        self.db = db
        self.source = source
        self.metrics = metrics

    async def put(self, lines: Sequence[str], error: str) -> None:
        """Set entries aside; LedgerUnavailable when it cannot (the caller keeps them)."""
        now = utc(utc_now())
        async with self.db.transaction() as tx:
            for line in lines:
                # JSON-escaped: a NUL or a lone surrogate is what some refusals are about.
                await tx.execute(_PUT, self.source, json.dumps(line), error[:1000], now)
        if self.metrics is not None:
            self.metrics.quarantined.labels(self.source).inc(len(lines))
        for line in lines:
            log.error("usage entry quarantined (%s): %s: %r", self.source, error[:300], line[:300])

    async def entries(self, limit: int = 1000) -> list[Quarantined]:
        return [
            Quarantined(
                int(r["id"]),
                r["source"],
                json.loads(r["line"]),
                r["error"],
                required(loaded(r["at"])),
            )  # fmt: skip
            for r in await self.db.fetch(_LIST, limit)
        ]

    async def release(self, entry_id: int) -> None:
        """An entry replayed into the ledger leaves the quarantine."""
        await self.db.execute(_DELETE, entry_id)


@dataclass
class Isolated(Generic[T]):
    written: Written
    refused: list[tuple[T, str]]  # the items refused one by one, with the error


async def write_isolating(
    write: Callable[[Sequence[T]], Awaitable[Written]],
    items: Sequence[T],
    single_failures: int = 0,
) -> Isolated[T]:
    """Write `items`, isolating the ones the ledger refuses (see the module's docstring);
    `single_failures`: how often a one-item batch already failed. LedgerUnavailable and
    LedgerRefused propagate: the caller keeps every item and retries."""
    try:
        return Isolated(await write(items), [])
    except LedgerUnavailable:
        raise
    except Exception as exc:
        if len(items) > 1:
            first = exc
        elif single_failures + 1 >= SINGLE_ATTEMPTS:
            return Isolated(Written(0, 0), [(items[0], _describe(exc))])
        else:
            raise LedgerRefused(_describe(exc)) from exc
    middle = len(items) // 2
    left = await _bisect(write, items[:middle])
    right = await _bisect(write, items[middle:])
    refused = left.refused + right.refused
    if len(refused) == len(items):  # nothing went in: the ledger's fault, not the entries'
        raise LedgerRefused(_describe(first)) from first
    return Isolated(_sum(left.written, right.written), refused)


async def _bisect(
    write: Callable[[Sequence[T]], Awaitable[Written]], items: Sequence[T]
) -> Isolated[T]:
    if not items:
        return Isolated(Written(0, 0), [])
    try:
        return Isolated(await write(items), [])
    except LedgerUnavailable:
        raise
    except Exception as exc:
        if len(items) == 1:
            return Isolated(Written(0, 0), [(items[0], _describe(exc))])
    middle = len(items) // 2
    left = await _bisect(write, items[:middle])
    right = await _bisect(write, items[middle:])
    return Isolated(_sum(left.written, right.written), left.refused + right.refused)


def _sum(a: Written, b: Written) -> Written:
    return Written(a.inserted + b.inserted, a.duplicates + b.duplicates)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
