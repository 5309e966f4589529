"""Refusals per tenant and hour (402 for a used-up quota, 429 for a rate limit), counted in
each process and added to the ledger every few seconds, so that the console can show a
tenant's recent refusals without a row per refused request: a tenant hammering its limit
costs one counter in memory, and one upsert a flush."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import datetime, timedelta

from gateway.clock import utc_now
from gateway.ledger.db import Database, LedgerError
from gateway.ledger.timestamps import loaded, required, utc
from gateway.lifecycle import stop_task

log = logging.getLogger("gateway.signals")
FLUSH_S = 5.0
MAX_KEYS = 100_000  # beyond this many (tenant, hour, status, name) waiting, new ones are dropped

_ADD = """
    INSERT INTO refusals_hourly (tenant_id, hour, status, name, count) VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (tenant_id, hour, status, name) DO UPDATE SET
        count = refusals_hourly.count + excluded.count
"""
_RECENT = """
    SELECT hour, status, name, count FROM refusals_hourly
    WHERE tenant_id = $1 AND hour >= $2 ORDER BY hour DESC, status, name
"""


class RefusalTally:
    """Counts refusals in memory; a task adds them to the ledger every `FLUSH_S`."""

    def __init__(self, db: Database, flush_s: float = FLUSH_S) -> None:
        self._db = db
        self._flush_s = flush_s
        self._counts: Counter[tuple[str, datetime, int, str]] = Counter()
        self._task: asyncio.Task[None] | None = None

    def refused(self, tenant: str, status: int, name: str) -> None:
        hour = utc_now().replace(minute=0, second=0, microsecond=0)
        key = (tenant, hour, status, name)
        if key in self._counts or len(self._counts) < MAX_KEYS:
            self._counts[key] += 1
        if self._task is None:
            self._task = asyncio.create_task(self._later(), name="refusals")

    async def _later(self) -> None:
        try:
            await asyncio.sleep(self._flush_s)
            await self.flush()
        finally:
            self._task = None

    async def flush(self) -> None:
        """Add what was counted to the ledger; kept for the next flush if it cannot."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            async with self._db.transaction() as tx:
                for (tenant, hour, status, name), n in sorted(counts.items()):
                    await tx.execute(_ADD, tenant, utc(hour), status, name, n)
        except LedgerError as exc:
            log.warning("refusal counts not written (%s); kept for the next flush", exc)
            self._counts.update(counts)
        except Exception as exc:  # counts for the console: never worth failing a stop for
            log.warning("refusal counts dropped (%s: %s)", type(exc).__name__, exc)

    async def close(self) -> None:
        await stop_task(self._task)
        await self.flush()


async def recent_refusals(
    db: Database, tenant: str, now: datetime, hours: int = 24
) -> list[dict[str, object]]:
    """The tenant's refusals per hour over the last `hours`, newest first."""
    rows = await db.fetch(_RECENT, tenant, utc(now - timedelta(hours=hours)))
    return [
        {"hour": required(loaded(r["hour"])), "status": int(r["status"]), "name": r["name"],
         "count": int(r["count"])}
        for r in rows
    ]  # fmt: skip
