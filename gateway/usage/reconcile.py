"""Reconciliation: the counter store's counters against the ledger's totals.

For every tenant and meter, the current period's counter (or a gauge's
level) is compared with what the ledger holds for the same period. Events
still queued (the worker's lag) show up as a temporary drift of the counter
above the ledger; a drift that persists with no lag is a fault to look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.clock import EPOCH
from gateway.config.models import GatewayConfig
from gateway.ledger.store import Ledger
from gateway.ledger.usage_ledger import UsageLedger
from gateway.quota.periods import meter_period
from gateway.quota.store import CounterStore

PAGE = 1000


@dataclass(frozen=True, slots=True)
class Drift:
    tenant: str
    meter: str
    period_start: datetime
    counter: int
    ledger: int

    @property
    def difference(self) -> int:
        return self.counter - self.ledger


async def reconcile(
    config: GatewayConfig, store: CounterStore, ledger: Ledger, usage: UsageLedger
) -> tuple[int, list[Drift]]:
    """(counters compared, those whose counter and ledger total differ)."""
    now = datetime.now(UTC)
    compared = 0
    drifts: list[Drift] = []
    after: str | None = None
    while True:
        tenants = await ledger.list_tenants(PAGE, after)
        for tenant in tenants:
            for meter, spec in sorted(config.meters.items()):
                period = meter_period(spec, now, tenant.billing_anchor)
                start = period.start if period else EPOCH
                counter = await store.level(tenant.id, meter, period)
                recorded = await usage.total(tenant.id, meter, start)
                compared += 1
                if counter != recorded:
                    drifts.append(Drift(tenant.id, meter, start, counter, recorded))
        if len(tenants) < PAGE:
            return compared, drifts
        after = tenants[-1].id
