"""Signals and their notifications in the ledger: an outbox that workers deliver from.

A signal is written once (its id says what it is about, so a second process
seeing the same thing writes nothing), together with one notification per
endpoint that asked for its type. A notification is delivered by whichever
worker holds its lease; a lease that runs out (the worker died) lets another
take it over, so a receiver may see a notification twice and must dedupe on
`webhook-id`, as the Standard Webhooks convention says.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.clock import iso_utc
from gateway.ledger.db import Database
from gateway.ledger.timestamps import loaded, required, utc
from gateway.signals.crossings import Signal

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_INSERT_SIGNAL = """
    INSERT INTO signals (id, type, tenant_id, meter, period_start, created_at, payload)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""
_INSERT_NOTIFICATION = """
    INSERT INTO notifications (signal_id, endpoint, state, attempts, created_at, next_attempt_at)
    VALUES ($1, $2, 'pending', 0, $3, $3)
    ON CONFLICT DO NOTHING
"""
# Under PostgreSQL's read committed, a second worker racing for the same row
# re-checks the lease on the row the first one updated, and skips it.
_CLAIM = """
    UPDATE notifications SET lease_holder = $1, lease_until = $2, attempts = attempts + 1
    WHERE (signal_id, endpoint) IN (
        SELECT signal_id, endpoint FROM notifications
        WHERE state = 'pending' AND next_attempt_at <= $3
        AND (lease_until IS NULL OR lease_until < $3)
        ORDER BY next_attempt_at LIMIT $4
    )
    AND state = 'pending' AND (lease_until IS NULL OR lease_until < $3)
    RETURNING signal_id, endpoint, attempts, created_at
"""
_PAYLOADS = "SELECT id, payload FROM signals WHERE id IN ({ids})"
_DELIVERED = """
    UPDATE notifications SET state = 'delivered', delivered_at = $4, lease_until = NULL,
        last_error = NULL
    WHERE signal_id = $1 AND endpoint = $2 AND lease_holder = $3 AND state = 'pending'
"""
_RETRY = """
    UPDATE notifications SET next_attempt_at = $4, lease_until = NULL, last_error = $5
    WHERE signal_id = $1 AND endpoint = $2 AND lease_holder = $3 AND state = 'pending'
"""
_DEAD = """
    UPDATE notifications SET state = 'dead', lease_until = NULL, last_error = $4
    WHERE signal_id = $1 AND endpoint = $2 AND lease_holder = $3 AND state = 'pending'
"""
_COUNT_BY_STATE = "SELECT state, count(*) AS rows FROM notifications GROUP BY state"
_LIST = """
    SELECT s.id, s.type, s.tenant_id, s.meter, s.created_at, n.endpoint, n.state, n.attempts,
           n.delivered_at, n.last_error
    FROM signals s JOIN notifications n ON n.signal_id = s.id
    WHERE ($1 = '' OR s.tenant_id = $1) AND ($2 = '' OR n.state = $2)
    ORDER BY s.created_at DESC, s.id, n.endpoint
    LIMIT $3
"""
_OF_TYPE = """
    SELECT id, tenant_id, meter, created_at, payload FROM signals
    WHERE type = $1 AND period_start >= $2
    ORDER BY period_start DESC, tenant_id, meter
    LIMIT $3
"""
# A page's current flags: recent enough signals, sorted out by `flags`.
_FLAGS = """
    SELECT tenant_id, type, payload FROM signals
    WHERE created_at >= $1 AND tenant_id IN ({tenants}) AND type IN ({kinds})
    ORDER BY created_at DESC
"""
FLAG_LOOKBACK = timedelta(days=45)  # longer than any period a forecast is about
_REQUEUE = """
    UPDATE notifications SET state = 'pending', next_attempt_at = $3, lease_until = NULL
    WHERE signal_id = $1 AND endpoint = $2 AND state = 'dead'
    RETURNING signal_id
"""


@dataclass(frozen=True, slots=True)
class Due:
    """A notification leased for one delivery attempt."""

    signal_id: str
    endpoint: str
    attempts: int  # this one included
    created_at: datetime
    payload: str


class SignalStore:
    """The signal and notification statements on the ledger database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self, signals: Sequence[tuple[Signal, Sequence[str]]], now: datetime
    ) -> list[Signal]:
        """Write each signal and a notification per endpoint; the signals new to the ledger."""
        new = []
        async with self.db.transaction() as tx:
            for signal, endpoints in signals:
                start = utc(signal.period.start) if signal.period is not None else None
                created = await tx.fetchval(
                    _INSERT_SIGNAL, signal.id, signal.type, signal.tenant, signal.meter, start,
                    utc(now), signal.payload(),
                )  # fmt: skip
                if created is None:
                    continue
                new.append(signal)
                for endpoint in endpoints:
                    await tx.execute(_INSERT_NOTIFICATION, signal.id, endpoint, utc(now))
        return new

    async def claim(self, holder: str, now: datetime, lease_s: float, limit: int) -> list[Due]:
        """Lease up to `limit` notifications that are due to `holder`, with their payloads."""
        until = utc(now + timedelta(seconds=lease_s))
        async with self.db.transaction() as tx:
            rows = await tx.fetch(_CLAIM, holder, until, utc(now), limit)
            if not rows:
                return []
            ids = sorted({r["signal_id"] for r in rows})
            marks = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
            payloads = {
                r["id"]: r["payload"] for r in await tx.fetch(_PAYLOADS.format(ids=marks), *ids)
            }
        return [
            Due(
                r["signal_id"],
                r["endpoint"],
                int(r["attempts"]),
                required(loaded(r["created_at"])),
                payloads[r["signal_id"]],
            )
            for r in rows
        ]

    async def delivered(self, due: Due, holder: str, now: datetime) -> None:
        await self.db.execute(_DELIVERED, due.signal_id, due.endpoint, holder, utc(now))

    async def retry(self, due: Due, holder: str, at: datetime, error: str) -> None:
        """Leave the notification pending, due again at `at`."""
        await self.db.execute(_RETRY, due.signal_id, due.endpoint, holder, utc(at), error[:500])

    async def dead(self, due: Due, holder: str, error: str) -> None:
        """Give up on the notification; an operator can requeue it (`requeue`)."""
        await self.db.execute(_DEAD, due.signal_id, due.endpoint, holder, error[:500])

    async def requeue(self, signal_id: str, endpoint: str, now: datetime) -> bool:
        """A dead notification pending again, due now."""
        return await self.db.fetchval(_REQUEUE, signal_id, endpoint, utc(now)) is not None

    async def counts(self) -> dict[str, int]:
        """Notifications by state."""
        return {r["state"]: int(r["rows"]) for r in await self.db.fetch(_COUNT_BY_STATE)}

    async def of_type(self, kind: str, since: datetime, limit: int) -> list[dict[str, Any]]:
        """Signals of one type about periods (hours, for anomalies) starting since `since`:
        each `data` with the signal's id and when it was first seen."""
        rows = await self.db.fetch(_OF_TYPE, kind, utc(since), limit)
        out = []
        for r in rows:
            data = dict(json.loads(r["payload"])["data"])
            data["id"] = r["id"]
            data["detected_at"] = iso_utc(required(loaded(r["created_at"])))
            out.append(data)
        return out

    async def flags(
        self, tenants: Sequence[str], kinds: Sequence[str], now: datetime
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """(tenant, type) -> the newest signal's data still current at `now` (an anomaly of
        this hour or the last; a forecast for a period not over), for a page of tenants."""
        first = 2 + len(tenants)
        marks = ", ".join(f"${i}" for i in range(2, first))
        kind_marks = ", ".join(f"${i}" for i in range(first, first + len(kinds)))
        sql = _FLAGS.format(tenants=marks, kinds=kind_marks)
        rows = await self.db.fetch(sql, utc(now - FLAG_LOOKBACK), *tenants, *kinds)
        # An anomaly is current in its hour and the next; anything else until its period ends.
        last_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            data = json.loads(r["payload"])["data"]
            end = data.get("period_end")
            over = last_hour if r["type"] == "usage.anomaly" else now
            if end is not None and datetime.fromisoformat(end) > over:
                out.setdefault((r["tenant_id"], r["type"]), data)
        return out

    async def recent(self, tenant: str = "", state: str = "", limit: int = 100) -> list[Any]:
        """The newest notifications, optionally of one tenant or in one state."""
        rows = await self.db.fetch(_LIST, tenant, state, limit)
        for r in rows:
            r["created_at"] = required(loaded(r["created_at"]))
            r["delivered_at"] = loaded(r["delivered_at"])
        return rows
