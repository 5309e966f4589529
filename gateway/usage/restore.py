"""Counters rebuilt from the ledger when a counter store lost them.

A Redis that lost its data (or the memory store of a restarted process) has
no epoch key for a shard; nothing is checked or charged there until its
counters are set from the ledger's totals for the periods that may still be
current, and gauges from theirs. What was queued but not yet in the ledger
when the data went is the stated loss (README, "Failure modes").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from gateway.config.models import MeterConfig
from gateway.ledger.usage import UsageLedger
from gateway.quota import keys
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
) -> None:
    """Restore `shards` of `store` from the ledger's totals."""
    if not shards:
        return
    totals = await ledger.recent_totals(datetime.now(UTC) - RECENT)
    wanted = set(shards)
    levels: dict[int, list[Level]] = {shard: [] for shard in shards}
    for tenant, meter, start, quantity in totals:
        shard = keys.shard_of(tenant, store.shards)
        spec = meters.get(meter)
        if shard not in wanted or spec is None:
            continue
        period = None if spec.type == "gauge" else _period(spec.period or "billing_cycle", start)
        levels[shard].append((tenant, meter, period, quantity))
    for shard in shards:
        await store.restore(shard, levels[shard])
        log.warning("counter store shard %d restored from the ledger (%d counters)", shard,
                    len(levels[shard]))  # fmt: skip


def _period(kind: str, start: datetime) -> Period:
    if kind in ("month", "day", "hour", "none"):
        return period_of(kind, start)  # type: ignore[arg-type]
    # A billing cycle's end depends on the tenant's anchor; only the expiry uses it.
    return Period(start, start + timedelta(days=32))
