"""The usage view: a tenant's meters as the counters see them now."""

from __future__ import annotations

from typing import Any

from gateway.clock import EPOCH, iso_utc
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.ledger.usage_ledger import UsageLedger
from gateway.quota.engine import QuotaEngine
from gateway.quota.forecast import forecast, window
from gateway.quota.periods import Period, meter_period, period_of
from gateway.quota.policy import credit_of
from gateway.quota.rules import credited, meter_state


def current_period(engine: QuotaEngine, tenant: Tenant, meter: str) -> Period | None:
    """The counter's period now, by the engine's clock (None for a gauge)."""
    return meter_period(engine.config.meters[meter], engine.clock(), tenant.billing_anchor)


async def usage_view(
    engine: QuotaEngine,
    tenant: Tenant,
    ledger: UsageLedger | None = None,
    *,
    recorded: bool = True,
) -> dict[str, Any]:
    """`{tenant, plan, status, period, meters: {name: {used, limit, remaining, ...}}}`;
    with `ledger`, each counter's `forecast` from its hourly rollups and, if `recorded`,
    each meter's `recorded`: what the ledger holds for the same period."""
    policy = engine.plans.get(tenant.plan)
    now = engine.clock()
    cycle = period_of("billing_cycle", now, tenant.billing_anchor)
    meters: dict[str, Any] = {}
    for name in sorted(engine.config.meters):
        period = current_period(engine, tenant, name)
        credit = credit_of(tenant, name, period)
        limit = credited(engine.meter_limit(tenant, name), credit)
        used = await engine.store.level(tenant.id, name, period)
        meters[name] = {
            "type": limit.kind,
            "used": used,
            "limit": None if limit.unlimited else limit.limit,
            "remaining": None if limit.unlimited else max(0, limit.limit - used),
            "enforcement": "hard" if limit.hard else "soft",
            "credit": credit,
            "override": name in tenant.overrides,
            "state": meter_state(limit, used),
            "period": {"start": iso_utc(period.start), "end": iso_utc(period.end)}
            if period and engine.config.meters[name].period != "none"
            else None,
        }
        if ledger is not None and recorded:
            start = period.start if period else EPOCH
            meters[name]["recorded"] = await ledger.total(tenant.id, name, start)
        if ledger is not None and period is not None and meters[name]["period"] is not None:
            since, until = window(period, now)
            hours = [(h, q) for h, q, _ in await ledger.hourly(tenant.id, name, since, until)]
            ahead = forecast(used, limit, period, now, hours)
            meters[name]["forecast"] = ahead.view() if ahead is not None else None
    return {
        "tenant": tenant.id,
        "plan": tenant.plan,
        "status": tenant.status,
        "shadow": policy.shadow if policy else False,
        "period": {"start": iso_utc(cycle.start), "end": iso_utc(cycle.end)},
        "meters": meters,
    }


async def set_gauge(
    engine: QuotaEngine, tenant: Tenant, meter: str, value: int, context: EventContext
) -> None:
    """Set a gauge's level (admin API, console); ValueError for a counter."""
    if engine.config.meters[meter].type != "gauge":
        raise ValueError(f"{meter} is a counter; reset it instead")
    await engine.store.set_level(tenant.id, meter, None, value, context)


async def reset_meter(
    engine: QuotaEngine, tenant: Tenant, meter: str, context: EventContext
) -> None:
    """The meter's current period starts again from 0 (admin API, console)."""
    period = current_period(engine, tenant, meter)
    await engine.store.set_level(tenant.id, meter, period, 0, context)
