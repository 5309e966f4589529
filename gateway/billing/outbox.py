"""The Stripe outbox in the ledger: rollup changes become rows before anything is sent.

A row (identifier, quantity, timestamp) is written in the same transaction
that advances its tenant/meter/period cursor, and never changes afterwards:
whatever happens to a send, a resend is the same meter event. Rows are sent
by whoever holds the lease of their tenant and meter, so at most one call per
customer and meter is in flight across every worker process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.billing.rules import event_time, report_identifier
from gateway.clock import EPOCH
from gateway.config.models import MeterConfig
from gateway.ledger.db import Database, Queries
from gateway.ledger.timestamps import loaded, required, utc
from gateway.quota.periods import Period, billing_cycle, period_of

PENDING, SENT, REJECTED, EXPIRED = "pending", "sent", "rejected", "expired"
PLAN_BATCH = 200  # cursors advanced per transaction

_ROW_COLUMNS = (
    "identifier, tenant_id, meter, period_start, period_end, seq, customer, event_name,"
    " quantity, event_at, created_at, state, attempts, first_attempt_at, next_attempt_at,"
    " sent_at, last_error"
)
_GROWTH = """
    SELECT t.tenant_id, t.meter, t.period_start, t.quantity, n.stripe_customer,
           n.billing_anchor, coalesce(c.reported, 0) AS reported, coalesce(c.seq, 0) AS seq
    FROM usage_totals t
    JOIN tenants n ON n.id = t.tenant_id
    LEFT JOIN stripe_cursors c
        ON c.tenant_id = t.tenant_id AND c.meter = t.meter AND c.period_start = t.period_start
    WHERE n.stripe_customer IS NOT NULL
    AND (t.period_start >= $1 OR t.period_start = $2)
    AND t.quantity <> coalesce(c.reported, 0)
    AND t.meter IN ({meters})
    ORDER BY t.tenant_id, t.meter, t.period_start
"""
_LEDGER_TOTALS = """
    SELECT t.tenant_id, t.meter, t.period_start, t.quantity, n.stripe_customer, n.billing_anchor
    FROM usage_totals t JOIN tenants n ON n.id = t.tenant_id
    WHERE n.stripe_customer IS NOT NULL
    AND (t.period_start >= $1 OR t.period_start = $2)
    AND t.meter IN ({meters})
    ORDER BY t.tenant_id, t.meter, t.period_start
"""
_NEW_CURSOR = """
    INSERT INTO stripe_cursors (tenant_id, meter, period_start, reported, seq)
    VALUES ($1, $2, $3, 0, 0) ON CONFLICT DO NOTHING
"""
# Optimistic: only the writer that saw the cursor as it is advances it.
_ADVANCE = """
    UPDATE stripe_cursors SET reported = $4, seq = seq + 1
    WHERE tenant_id = $1 AND meter = $2 AND period_start = $3 AND reported = $5 AND seq = $6
    RETURNING seq
"""
_INSERT_ROW = f"""
    INSERT INTO stripe_outbox ({_ROW_COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, NULL, $11, NULL, $13)
"""
_DUE_GROUPS = """
    SELECT DISTINCT tenant_id, meter FROM stripe_outbox
    WHERE state = 'pending' AND next_attempt_at <= $1
    LIMIT $2
"""
_LEASE = """
    INSERT INTO stripe_leases (tenant_id, meter, holder, until) VALUES ($1, $2, $3, {until})
    ON CONFLICT (tenant_id, meter) DO UPDATE SET holder = excluded.holder, until = excluded.until
    WHERE stripe_leases.until < {now} OR stripe_leases.holder = excluded.holder
    RETURNING tenant_id
"""
# Workers on several machines share a PostgreSQL ledger: its clock, not theirs, decides
# when a lease has run out, so that a worker whose clock runs ahead takes none over.
_LEASE_BY_DB_CLOCK = _LEASE.format(
    until="clock_timestamp() + make_interval(secs => $4)", now="clock_timestamp()"
)
# SQLite is a file on one machine: the workers that share it share its clock.
_LEASE_BY_OWN_CLOCK = _LEASE.format(until="$4", now="$5")
_RELEASE = "DELETE FROM stripe_leases WHERE tenant_id = $1 AND meter = $2 AND holder = $3"
_GROUP_ROWS = f"""
    SELECT {_ROW_COLUMNS} FROM stripe_outbox
    WHERE tenant_id = $1 AND meter = $2 AND state = 'pending'
    ORDER BY period_start, seq
"""
_ATTEMPT = """
    UPDATE stripe_outbox SET attempts = attempts + 1,
        first_attempt_at = coalesce(first_attempt_at, $2)
    WHERE identifier = $1 AND state = 'pending'
"""
_FINISH = """
    UPDATE stripe_outbox SET state = $2, sent_at = $3, last_error = $4
    WHERE identifier = $1 AND state = 'pending'
"""
_DEFER = """
    UPDATE stripe_outbox SET next_attempt_at = $2, last_error = $3
    WHERE identifier = $1 AND state = 'pending'
"""
_REJECT_SENT = """
    UPDATE stripe_outbox SET state = 'rejected', last_error = $2
    WHERE identifier = $1 AND state = 'sent'
    RETURNING identifier
"""
_SENT_BETWEEN = f"""
    SELECT {_ROW_COLUMNS} FROM stripe_outbox
    WHERE event_name = $1 AND state = 'sent' AND sent_at >= $2 AND sent_at <= $3
    ORDER BY tenant_id, meter, period_start, seq
"""
_REOPEN = """
    UPDATE stripe_outbox SET state = 'pending', next_attempt_at = $2, last_error = $3
    WHERE identifier = $1 AND state = 'sent'
"""
_SENT_TOTAL = """
    SELECT coalesce(sum(quantity), 0) FROM stripe_outbox
    WHERE tenant_id = $1 AND meter = $2 AND period_start = $3 AND state = 'sent'
"""
_PENDING_STATS = """
    SELECT count(*) AS rows, coalesce(sum(quantity), 0) AS quantity,
           min(created_at) AS oldest
    FROM stripe_outbox WHERE state = 'pending'
"""
_COUNT_BY_STATE = "SELECT state, count(*) AS rows FROM stripe_outbox GROUP BY state"
_REPORTED = """
    SELECT o.tenant_id, o.meter, o.period_start, o.customer, o.event_name,
           sum(CASE WHEN o.state = 'sent' THEN o.quantity ELSE 0 END) AS sent,
           sum(CASE WHEN o.state = 'pending' THEN o.quantity ELSE 0 END) AS pending
    FROM stripe_outbox o
    GROUP BY o.tenant_id, o.meter, o.period_start, o.customer, o.event_name
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One meter event, as stored before it is sent."""

    identifier: str
    tenant: str
    meter: str
    period_start: datetime
    period_end: datetime
    seq: int
    customer: str
    event_name: str
    quantity: int
    event_at: datetime
    state: str
    attempts: int
    first_attempt_at: datetime | None
    next_attempt_at: datetime
    last_error: str | None


@dataclass(frozen=True, slots=True)
class PendingStats:
    rows: int
    quantity: int
    oldest: datetime | None


def _row(r: dict[str, Any]) -> OutboxRow:
    return OutboxRow(
        identifier=r["identifier"],
        tenant=r["tenant_id"],
        meter=r["meter"],
        period_start=required(loaded(r["period_start"])),
        period_end=required(loaded(r["period_end"])),
        seq=int(r["seq"]),
        customer=r["customer"],
        event_name=r["event_name"],
        quantity=int(r["quantity"]),
        event_at=required(loaded(r["event_at"])),
        state=r["state"],
        attempts=int(r["attempts"]),
        first_attempt_at=loaded(r["first_attempt_at"]),
        next_attempt_at=required(loaded(r["next_attempt_at"])),
        last_error=r["last_error"],
    )


def usage_period(spec: MeterConfig, period_start: datetime, anchor: datetime | None) -> Period:
    """The period a rollup row's start opens, by the tenant's anchor where it still fits."""
    kind = spec.period or "billing_cycle"
    period = period_of(kind, period_start, anchor)
    if period.start == period_start or kind != "billing_cycle":
        return period
    # The anchor moved since (a new subscription): the period ran from its own start.
    return billing_cycle(period_start, period_start)


class Outbox:
    """The outbox's statements on the ledger database."""

    def __init__(self, db: Database, meters: dict[str, MeterConfig], events: dict[str, str]):
        self.db = db
        self._meters = meters
        self.events = events  # meter -> Stripe event name

    async def _reported_totals(self, sql: str, since: datetime) -> list[dict[str, Any]]:
        marks = ", ".join(f"${i}" for i in range(3, 3 + len(self.events)))
        return await self.db.fetch(
            sql.format(meters=marks), utc(since), EPOCH, *sorted(self.events)
        )

    async def ledger_totals(self, since: datetime) -> list[tuple[str, str, str, Period, int]]:
        """(tenant, meter, customer, period, ledger total) of every reported meter."""
        if not self.events:
            return []
        out = []
        for r in await self._reported_totals(_LEDGER_TOTALS, since):
            start = required(loaded(r["period_start"]))
            period = usage_period(self._meters[r["meter"]], start, loaded(r["billing_anchor"]))
            out.append(
                (r["tenant_id"], r["meter"], r["stripe_customer"], period, int(r["quantity"]))
            )
        return out

    async def plan(self, now: datetime, since: datetime) -> list[OutboxRow]:
        """Turn every reported meter's rollup change (periods started since `since`, and
        those that never reset) into outbox rows; the rows created. A rollup that shrank
        since its last report (a refund written after its charge was reported) gives a
        negative row, which Stripe sums like any other."""
        if not self.events:
            return []
        growth = await self._reported_totals(_GROWTH, since)
        created: list[OutboxRow] = []
        for start in range(0, len(growth), PLAN_BATCH):
            async with self.db.transaction() as tx:
                for candidate in growth[start : start + PLAN_BATCH]:
                    row = await self._advance(tx, candidate, now)
                    if row is not None:
                        created.append(row)
        return created

    async def _advance(self, tx: Queries, c: dict[str, Any], now: datetime) -> OutboxRow | None:
        period_start = required(loaded(c["period_start"]))
        key = (c["tenant_id"], c["meter"], period_start)
        await tx.execute(_NEW_CURSOR, *key)
        seq = await tx.fetchval(
            _ADVANCE, *key, int(c["quantity"]), int(c["reported"]), int(c["seq"])
        )
        if seq is None:
            return None  # another worker advanced it meanwhile; the next round sees its row
        period = usage_period(self._meters[c["meter"]], period_start, loaded(c["billing_anchor"]))
        at = event_time(period.start, period.end, now)
        row = OutboxRow(
            identifier=report_identifier(c["tenant_id"], c["meter"], period_start, int(seq)),
            tenant=c["tenant_id"],
            meter=c["meter"],
            period_start=period_start,
            period_end=period.end,
            seq=int(seq),
            customer=c["stripe_customer"],
            event_name=self.events[c["meter"]],
            quantity=int(c["quantity"]) - int(c["reported"]),
            event_at=at or period.end,
            state=PENDING if at is not None else EXPIRED,
            attempts=0,
            first_attempt_at=None,
            next_attempt_at=now,
            last_error=None if at is not None else "the period ended more than 35 days ago",
        )
        await tx.execute(
            _INSERT_ROW, row.identifier, row.tenant, row.meter, utc(row.period_start),
            utc(row.period_end), row.seq,
            row.customer, row.event_name, row.quantity, utc(row.event_at), utc(now), row.state,
            row.last_error,
        )  # fmt: skip
        return row

    async def lease(
        self, holder: str, now: datetime, lease_s: float, limit: int
    ) -> list[tuple[str, str]]:
        """(tenant, meter) groups with rows due, now leased to `holder`."""
        due = await self.db.fetch(_DUE_GROUPS, utc(now), limit)
        held = []
        for group in due:
            key = (group["tenant_id"], group["meter"])
            if await self.renew(holder, key, now, lease_s):
                held.append(key)
        return held

    async def renew(
        self, holder: str, group: tuple[str, str], now: datetime, lease_s: float
    ) -> bool:
        """Take or extend the group's lease; False while another holder has it."""
        if self.db.dialect == "postgresql":
            taken = await self.db.fetchval(_LEASE_BY_DB_CLOCK, *group, holder, float(lease_s))
        else:
            until = utc(now + timedelta(seconds=lease_s))
            taken = await self.db.fetchval(_LEASE_BY_OWN_CLOCK, *group, holder, until, utc(now))
        return taken is not None

    async def release(self, holder: str, groups: Iterable[tuple[str, str]]) -> None:
        for group in groups:
            await self.db.execute(_RELEASE, *group, holder)

    async def rows(self, group: tuple[str, str]) -> list[OutboxRow]:
        """The group's unsent rows, oldest first."""
        return [_row(r) for r in await self.db.fetch(_GROUP_ROWS, *group)]

    async def attempt(self, identifier: str, now: datetime) -> None:
        """Count a send about to leave (after a crash, the row says it may have arrived)."""
        await self.db.execute(_ATTEMPT, identifier, utc(now))

    async def finish(
        self, identifiers: Sequence[str], state: str, now: datetime, error: str | None = None
    ) -> None:
        """Mark rows sent (or rejected, or expired) for good."""
        async with self.db.transaction() as tx:
            for identifier in identifiers:
                await tx.execute(_FINISH, identifier, state, utc(now), error)

    async def defer(self, identifiers: Sequence[str], until: datetime, error: str) -> None:
        """Leave rows pending until `until`, with the error that held them back."""
        async with self.db.transaction() as tx:
            for identifier in identifiers:
                await tx.execute(_DEFER, identifier, utc(until), error[:500])

    async def reject_sent(self, identifier: str, error: str) -> bool:
        """A sent row that Stripe refused later (the v2 stream validates asynchronously)."""
        return await self.db.fetchval(_REJECT_SENT, identifier, error[:500]) is not None

    async def sent_between(
        self, event_name: str, start: datetime, end: datetime
    ) -> list[OutboxRow]:
        """Rows of a Stripe meter marked sent between `start` and `end`."""
        return [
            _row(r) for r in await self.db.fetch(_SENT_BETWEEN, event_name, utc(start), utc(end))
        ]

    async def reopen(self, identifiers: Sequence[str], now: datetime, error: str) -> None:
        """Sent rows that Stripe may not hold after all: pending again, due now."""
        async with self.db.transaction() as tx:
            for identifier in identifiers:
                await tx.execute(_REOPEN, identifier, utc(now), error[:500])

    async def sent_total(self, row: OutboxRow) -> int:
        """What the row's tenant, meter and period have had marked sent."""
        value = await self.db.fetchval(_SENT_TOTAL, row.tenant, row.meter, utc(row.period_start))
        return int(value or 0)

    async def pending(self) -> PendingStats:
        r = await self.db.fetchrow(_PENDING_STATS)
        assert r is not None
        return PendingStats(int(r["rows"]), int(r["quantity"]), loaded(r["oldest"]))

    async def counts(self) -> dict[str, int]:
        """Rows by state."""
        return {r["state"]: int(r["rows"]) for r in await self.db.fetch(_COUNT_BY_STATE)}

    async def reported(self) -> list[dict[str, Any]]:
        """Per tenant, meter and period: the quantity sent and still pending."""
        rows = await self.db.fetch(_REPORTED)
        for r in rows:
            r["period_start"] = required(loaded(r["period_start"]))
            r["sent"], r["pending"] = int(r["sent"]), int(r["pending"])
        return rows
