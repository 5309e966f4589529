"""Signals about subscriptions: a tenant's status changed, a grace period began or ended.

Read from the tenants table by the worker's watch: a status change (from a
Stripe webhook or the admin API) stamps `status_changed_at`, and a grace
period ends by the clock alone, with nothing written anywhere. A signal's id
includes the change's time, so each change signals once however often it is
seen, and a later change to the same status signals again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from gateway.clock import iso_utc, to_us
from gateway.config.models import SubscriptionConfig
from gateway.ledger.db import Database
from gateway.ledger.timestamps import loaded, required, utc
from gateway.quota.periods import Period
from gateway.signals.crossings import Signal

STATUS_CHANGED = "subscription.status_changed"
GRACE_STARTED = "subscription.grace_started"
GRACE_ENDED = "subscription.grace_ended"
LOOKBACK = timedelta(days=2)  # changes older than this at the first round are history

_CHANGED_SINCE = """
    SELECT id, plan, status, status_changed_at FROM tenants
    WHERE status_changed_at >= $1 AND status_changed_at > created_at
    ORDER BY status_changed_at, id
"""


def _signal(kind: str, row: dict[str, Any], now: datetime, **extra: object) -> Signal:
    changed = required(loaded(row["status_changed_at"]))
    # The change's time is the "period" of the signal: one per change.
    return Signal(
        kind, str(row["id"]), "", Period(changed, changed), 0, None, to_us(now),
        details=(("plan", row["plan"]), ("status", row["status"]),
                 ("status_changed_at", iso_utc(changed)), *extra.items()),
    )  # fmt: skip


async def subscription_signals(
    db: Database, config: SubscriptionConfig, now: datetime
) -> list[Signal]:
    """Status changes of the last `LOOKBACK` (and the grace windows they opened)."""
    longest = max(config.grace.values(), default=0.0)
    since = now - LOOKBACK - timedelta(seconds=longest)
    found = []
    for row in await db.fetch(_CHANGED_SINCE, utc(since)):
        changed = required(loaded(row["status_changed_at"]))
        if now - changed <= LOOKBACK:
            found.append(_signal(STATUS_CHANGED, row, now))
        grace_s = config.grace.get(row["status"])
        if grace_s is None:
            continue
        ends = changed + timedelta(seconds=grace_s)
        if now - changed <= LOOKBACK:
            found.append(_signal(GRACE_STARTED, row, now, grace_ends_at=iso_utc(ends)))
        if ends <= now <= ends + LOOKBACK:
            found.append(_signal(GRACE_ENDED, row, now, grace_ended_at=iso_utc(ends)))
    return found
