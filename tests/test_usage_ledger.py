"""Usage events in the ledger, on SQLite and PostgreSQL alike: idempotent, rolled up."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

from gateway.clock import to_us
from gateway.ledger import Ledger
from gateway.ledger.events import UsageEvent, decode
from gateway.ledger.usage_ledger import UsageLedger

JAN = datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
PERIOD = to_us(datetime(2026, 1, 15, tzinfo=UTC))


def event(n: int, at: datetime = JAN, quantity: int = 1, **fields: object) -> UsageEvent:
    base = UsageEvent(f"op{n}:api_calls", "acme", "api_calls", quantity, to_us(at), PERIOD,
                      "charge", "api", "GET", 0, f"rid-{n}")  # fmt: skip
    return replace(base, **fields)  # type: ignore[arg-type]


async def test_events_are_written_once_and_rolled_up(ledger: Ledger) -> None:
    usage = UsageLedger(ledger.db)
    batch = [event(n) for n in range(100)] + [event(100, FEB, quantity=5)]
    first = await usage.write(batch)
    assert (first.inserted, first.duplicates) == (101, 0)
    # A redelivery (the worker died before XACK) and a batch that overlaps it.
    again = await usage.write(batch[:50])
    assert (again.inserted, again.duplicates) == (0, 50)
    mixed = await usage.write([event(5), event(200), event(200)])  # a duplicate within a batch
    assert (mixed.inserted, mixed.duplicates) == (1, 2)
    period_start = datetime(2026, 1, 15, tzinfo=UTC)
    assert await usage.total("acme", "api_calls", period_start) == 101 + 5
    rows = await ledger.db.fetch("SELECT tenant_id, meter, quantity FROM usage_totals")
    assert [(r["tenant_id"], r["meter"], r["quantity"]) for r in rows] == [
        ("acme", "api_calls", 106)
    ]
    hours = await usage.hourly("acme", "api_calls", datetime(2026, 1, 1, tzinfo=UTC), FEB)
    assert hours == [(datetime(2026, 1, 31, 23, tzinfo=UTC), 101, 101)]
    feb = await usage.hourly("acme", "api_calls", FEB, datetime(2026, 3, 1, tzinfo=UTC))
    assert feb == [(FEB, 5, 1)]


async def test_refunds_subtract_and_same_id_at_another_time_is_another_event(
    ledger: Ledger,
) -> None:
    usage = UsageLedger(ledger.db)
    await usage.write([event(1, quantity=3), event(1, kind="refund", quantity=-3,
                                                    id="op1:api_calls:void")])  # fmt: skip
    assert await usage.total("acme", "api_calls", datetime(2026, 1, 15, tzinfo=UTC)) == 0


async def test_concurrent_writers_of_overlapping_batches_count_each_event_once(
    ledger: Ledger,
) -> None:
    usage = UsageLedger(ledger.db)
    batches = [[event(n) for n in range(start, start + 300)] for start in (0, 100, 200, 0)]
    results = await asyncio.gather(*(usage.write(batch) for batch in batches))
    assert sum(r.inserted for r in results) == 500
    assert await usage.total("acme", "api_calls", datetime(2026, 1, 15, tzinfo=UTC)) == 500


async def test_partitions_are_created_and_dropped_by_month(ledger: Ledger) -> None:
    usage = UsageLedger(ledger.db)
    await usage.write([event(1), event(2, FEB)])
    dropped = await usage.drop_partitions_before(FEB)
    if ledger.db.dialect == "postgresql":
        assert dropped == ["usage_events_2026_01"]
        count = await ledger.db.fetchval("SELECT count(*) FROM usage_events")
        assert count == 1
        await usage.write([event(1)])  # the partition comes back when needed
    else:
        assert dropped == []


def test_the_wire_form_round_trips() -> None:
    original = event(7, route='we"ird', status=201)
    assert decode(original.encode()) == original
