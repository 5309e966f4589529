"""Counters rebuilt from the ledger when a counter store lost them.

A Redis that lost its data (or the memory store of a restarted process) has
no epoch key for a shard; nothing is checked or charged there until its
counters are set from the ledger's totals for the periods that may still be
current, and gauges from theirs. With the queue on another Redis
(`storage.queue`), the events it still holds and those waiting in this process
count too; with one Redis, what was queued but not yet in the ledger when the
data went is the stated loss (README, "Failure modes").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.config.models import MeterConfig
from gateway.ledger.events import wire_row
from gateway.ledger.usage_ledger import UsageLedger
from gateway.quota import keyspace
from gateway.quota.periods import Period, period_of
from gateway.quota.store import CounterStore, Level

log = logging.getLogger("gateway.quota")

# Any period that can still be current started less than this long ago (the
# longest is a month), except `none` counters and gauges, which start at the epoch.
RECENT = timedelta(days=40)


async def restore_shards(
    store: CounterStore,
    ledger: UsageLedger,
    meters: Mapping[str, MeterConfig],
    shards: Sequence[int],
    unrecorded: Callable[[Sequence[int]], Awaitable[list[str]]] | None = None,
    expected: bool = False,
) -> None:
    """Restore `shards` of `store` from the ledger's totals (and the events `unrecorded`
    gives: a queue's, which the ledger may not have yet). `expected`: the store starts
    empty by design (memory), so the restore is logged at INFO, not WARNING."""
    if not shards:
        return
    # The queue first: what the worker moves meanwhile is then in the ledger's
    # snapshot, and recognised there by its id.
    queued = _rows(await unrecorded(shards)) if unrecorded is not None else []
    totals = await ledger.recent_totals(datetime.now(UTC) - RECENT, queued)
    wanted = set(shards)
    levels: dict[int, list[Level]] = {shard: [] for shard in shards}
    for tenant, meter, start, quantity in totals:
        shard = keyspace.shard_of(tenant, store.shards)
        spec = meters.get(meter)
        if shard not in wanted or spec is None:
            continue
        period = None if spec.type == "gauge" else _period(spec.period or "billing_cycle", start)
        levels[shard].append((tenant, meter, period, quantity))
    for shard in shards:
        await store.restore(shard, levels[shard])
        # A new process's memory store starts empty by design; a Redis that lost its
        # counters is news an operator must see.
        log.log(logging.INFO if expected else logging.WARNING,
                "counter store shard %d restored from the ledger (%d counters)", shard,
                len(levels[shard]))  # fmt: skip


def _rows(wires: Sequence[str]) -> list[tuple[Any, ...]]:
    rows = []
    for wire in wires:
        try:
            rows.append(wire_row(wire))
        except ValueError:
            log.error("not a usage event in the queue, left out of the restore: %r", wire[:200])
    return rows


def _period(kind: str, start: datetime) -> Period:
    if kind in ("month", "day", "hour", "none"):
        return period_of(kind, start)  # type: ignore[arg-type]
    # A billing cycle's end depends on the tenant's anchor; only the expiry uses it.
    return Period(start, start + timedelta(days=32))
