"""What the ledger stores: tenants and their API keys, as plain frozen records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class LimitOverride:
    """One tenant's own limit for a meter, in place of its plan's."""

    limit: int  # -1: unlimited
    enforcement: str = "hard"  # or "soft"
    warn_at: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Credit:
    """A one-off addition to a tenant's quota of a meter for one period."""

    meter: str
    period_start: datetime
    period_end: datetime
    quantity: int


@dataclass(frozen=True, slots=True)
class Tenant:
    """A customer of the gateway; all datetimes are timezone-aware UTC."""

    id: str
    plan: str
    status: str  # a Stripe subscription status such as "active" or "past_due"
    status_changed_at: datetime
    name: str | None = None
    billing_anchor: datetime | None = None
    stripe_customer: str | None = None
    stripe_subscription: str | None = None
    disabled: bool = False
    overrides: dict[str, LimitOverride] = field(default_factory=dict)  # meter -> its limit
    # Credits of periods not over yet; loaded by `Ledger.get_tenant` only.
    credits: tuple[Credit, ...] = ()
    created_at: datetime | None = None  # set by the ledger
    updated_at: datetime | None = None  # set by the ledger

    def credited(self, meter: str, period_start: datetime) -> int:
        """What the tenant was credited for `meter` in the period starting at `period_start`."""
        return credited_in(self.credits, meter, period_start)


def credited_in(credits: Iterable[Credit], meter: str, period_start: datetime) -> int:
    """What `credits` add to `meter` in the period starting at `period_start`."""
    return sum(c.quantity for c in credits if c.meter == meter and c.period_start == period_start)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key of a tenant, found by its public prefix; only a hash of the secret is kept."""

    prefix: str
    tenant_id: str
    key_hash: str  # hex
    created_at: datetime
    name: str | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
