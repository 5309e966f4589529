"""Usage events in the ledger: idempotent batch inserts and the rollups they feed.

A batch is bulk-loaded into a staging table (COPY on PostgreSQL), then moved
with `INSERT ... ON CONFLICT DO NOTHING RETURNING`: only the rows that were
new come back, and only those are added to the rollups, in the same
transaction and in key order (so that concurrent writers never deadlock). A
redelivered event therefore changes nothing. On PostgreSQL `usage_events` is
partitioned by month; partitions are created before the first event of a
month is written and dropped past the retention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.clock import EPOCH, months_after
from gateway.ledger.db import Database, Queries
from gateway.ledger.events import COLUMNS, UsageEvent
from gateway.ledger.timestamps import loaded, required, utc

_COLUMN_LIST = ", ".join(COLUMNS)

_STAGING = {
    "postgresql": (
        "CREATE TEMP TABLE IF NOT EXISTS usage_staging (LIKE usage_events) ON COMMIT DELETE ROWS"
    ),
    "sqlite": "CREATE TEMP TABLE IF NOT EXISTS usage_staging AS SELECT * FROM usage_events WHERE 0",
}
# "WHERE true": SQLite would otherwise read ON CONFLICT as part of the SELECT.
_MOVE = f"""
    INSERT INTO usage_events ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM usage_staging WHERE true
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, meter, period_start, at, quantity
"""
# PostgreSQL does it in one statement: the new rows never leave the server.
# ORDER BY: rollup rows are locked in key order, so concurrent writers cannot deadlock.
_MOVE_AND_ROLL_UP = f"""
    WITH new AS (
        INSERT INTO usage_events ({_COLUMN_LIST})
        SELECT {_COLUMN_LIST} FROM usage_staging
        ON CONFLICT DO NOTHING
        RETURNING tenant_id, meter, period_start, at, quantity
    ), totals AS (
        INSERT INTO usage_totals (tenant_id, meter, period_start, quantity, events)
        SELECT tenant_id, meter, period_start, sum(quantity), count(*) FROM new
        GROUP BY tenant_id, meter, period_start ORDER BY tenant_id, meter, period_start
        ON CONFLICT (tenant_id, meter, period_start) DO UPDATE SET
            quantity = usage_totals.quantity + excluded.quantity,
            events = usage_totals.events + excluded.events
    ), hours AS (
        INSERT INTO usage_hourly (tenant_id, meter, hour, quantity, events)
        SELECT tenant_id, meter, date_trunc('hour', at, 'UTC') AS hour, sum(quantity), count(*)
        FROM new GROUP BY tenant_id, meter, hour ORDER BY tenant_id, meter, hour
        ON CONFLICT (tenant_id, meter, hour) DO UPDATE SET
            quantity = usage_hourly.quantity + excluded.quantity,
            events = usage_hourly.events + excluded.events
    )
    SELECT count(*) FROM new
"""
_ADD_TOTAL = """
    INSERT INTO usage_totals (tenant_id, meter, period_start, quantity, events)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (tenant_id, meter, period_start) DO UPDATE SET
        quantity = usage_totals.quantity + excluded.quantity,
        events = usage_totals.events + excluded.events
"""
_RECENT_TOTALS = """
    SELECT tenant_id, meter, period_start, quantity FROM usage_totals
    WHERE period_start >= $1 OR period_start = $2
"""
# The same, plus staged events the ledger does not hold yet, in one statement: one
# snapshot, so an event the worker commits meanwhile is counted once either way.
_RECENT_TOTALS_AND_STAGED = """
    SELECT tenant_id, meter, period_start, sum(quantity) AS quantity FROM (
        SELECT tenant_id, meter, period_start, quantity FROM usage_totals
        WHERE period_start >= $1 OR period_start = $2
        UNION ALL
        SELECT s.tenant_id, s.meter, s.period_start, s.quantity FROM usage_staging s
        WHERE (s.period_start >= $1 OR s.period_start = $2)
        AND NOT EXISTS (SELECT 1 FROM usage_events e WHERE e.at = s.at AND e.id = s.id)
    ) AS t GROUP BY tenant_id, meter, period_start
"""
_ADD_HOURLY = """
    INSERT INTO usage_hourly (tenant_id, meter, hour, quantity, events)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (tenant_id, meter, hour) DO UPDATE SET
        quantity = usage_hourly.quantity + excluded.quantity,
        events = usage_hourly.events + excluded.events
"""
_TOTAL = (
    "SELECT quantity FROM usage_totals WHERE tenant_id = $1 AND meter = $2 AND period_start = $3"
)
_HOURLY = """
    SELECT hour, quantity, events FROM usage_hourly
    WHERE tenant_id = $1 AND meter = $2 AND hour >= $3 AND hour < $4 ORDER BY hour
"""
_PARTITIONS = """
    SELECT child.relname AS name FROM pg_inherits
    JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
    JOIN pg_class child ON child.oid = pg_inherits.inhrelid
    WHERE parent.relname = 'usage_events'
"""
_PARTITION_NAME = re.compile(r"^usage_events_(\d{4})_(\d{2})$")


@dataclass(frozen=True, slots=True)
class Written:
    inserted: int
    duplicates: int


class UsageLedger:
    """Usage events, totals per tenant/meter/period and hourly history on one `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._partitions: set[datetime] = set()  # month starts known to exist

    async def write(self, events: Sequence[UsageEvent]) -> Written:
        """Insert the events not in the ledger yet and add them to the rollups, atomically."""
        return await self.write_rows([event.row() for event in events])

    async def write_rows(self, rows: Sequence[tuple[Any, ...]]) -> Written:
        """`write` for rows in `COLUMNS` order (see `events.wire_row`)."""
        if not rows:
            return Written(0, 0)
        if self.db.dialect == "postgresql":
            months = {(row[0].year, row[0].month) for row in rows}
            await self.ensure_partitions(datetime(y, m, 1, tzinfo=UTC) for y, m in months)
        async with self.db.transaction() as tx:
            await self._stage(tx, rows)
            if self.db.dialect == "postgresql":
                inserted = int(await tx.fetchval(_MOVE_AND_ROLL_UP))
            else:
                new = await tx.fetch(_MOVE)
                await _add_rollups(tx, new)
                inserted = len(new)
        return Written(inserted, len(rows) - inserted)

    async def _stage(self, tx: Queries, rows: Sequence[tuple[Any, ...]]) -> None:
        await tx.execute(_STAGING[self.db.dialect])
        if self.db.dialect == "sqlite":  # PostgreSQL's empties itself at commit
            await tx.execute("DELETE FROM usage_staging")
        await tx.copy_rows("usage_staging", COLUMNS, rows)

    async def ensure_partitions(self, months: Iterable[datetime]) -> None:
        """Create the monthly partitions of `usage_events` that do not exist (PostgreSQL)."""
        if self.db.dialect != "postgresql":
            return
        for start in sorted(set(months) - self._partitions):
            end = months_after(start, 1)
            await self.db.execute(
                f"CREATE TABLE IF NOT EXISTS {_partition(start)} PARTITION OF usage_events"
                f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
            self._partitions.add(start)

    async def drop_partitions_before(self, cutoff: datetime) -> list[str]:
        """Drop the monthly partitions that end at or before `cutoff`; their names."""
        if self.db.dialect != "postgresql":
            return []
        dropped = []
        for row in await self.db.fetch(_PARTITIONS):
            match = _PARTITION_NAME.match(row["name"])
            if match is None:
                continue
            start = datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)
            if months_after(start, 1) <= cutoff:
                await self.db.execute(f"DROP TABLE IF EXISTS {row['name']}")
                self._partitions.discard(start)
                dropped.append(row["name"])
        return sorted(dropped)

    async def total(self, tenant: str, meter: str, period_start: datetime) -> int:
        """The ledger's total of `meter` for the tenant in the period starting then."""
        value = await self.db.fetchval(_TOTAL, tenant, meter, utc(period_start))
        return int(value or 0)

    async def recent_totals(
        self, since: datetime, unrecorded: Sequence[tuple[Any, ...]] = ()
    ) -> list[tuple[str, str, datetime, int]]:
        """(tenant, meter, period start, total) of periods started since `since`, and of
        those that start at the epoch (gauges, counters that never reset), counting also
        the `unrecorded` rows (see `events.wire_row`) that the ledger does not hold yet."""
        if not unrecorded:
            rows = await self.db.fetch(_RECENT_TOTALS, utc(since), EPOCH)
        else:
            unique = list({(row[0], row[1]): row for row in unrecorded}.values())
            async with self.db.transaction() as tx:
                await self._stage(tx, unique)
                rows = await tx.fetch(_RECENT_TOTALS_AND_STAGED, utc(since), EPOCH)
        return [
            (r["tenant_id"], r["meter"], required(loaded(r["period_start"])), int(r["quantity"]))
            for r in rows
        ]

    async def hourly(
        self, tenant: str, meter: str, since: datetime, until: datetime
    ) -> list[tuple[datetime, int, int]]:
        """(hour, quantity, events) of the hours in [since, until) that have any."""
        rows = await self.db.fetch(_HOURLY, tenant, meter, utc(since), utc(until))
        return [(required(loaded(r["hour"])), int(r["quantity"]), int(r["events"])) for r in rows]


def _partition(start: datetime) -> str:
    return f"usage_events_{start.year:04d}_{start.month:02d}"


async def _add_rollups(tx: Queries, new: list[dict[str, Any]]) -> None:
    totals: dict[tuple[str, str, datetime], list[int]] = {}
    hours: dict[tuple[str, str, datetime], list[int]] = {}
    for row in new:
        at = required(loaded(row["at"]))
        period = required(loaded(row["period_start"]))
        hour = at.replace(minute=0, second=0, microsecond=0)
        for table, key in ((totals, (row["tenant_id"], row["meter"], period)),
                           (hours, (row["tenant_id"], row["meter"], hour))):  # fmt: skip
            sums = table.setdefault(key, [0, 0])
            sums[0] += int(row["quantity"])
            sums[1] += 1
    # Key order: two writers touching the same rows lock them in the same order.
    await tx.executemany(_ADD_TOTAL, [(*key, *sums) for key, sums in sorted(totals.items())])
    await tx.executemany(_ADD_HOURLY, [(*key, *sums) for key, sums in sorted(hours.items())])
