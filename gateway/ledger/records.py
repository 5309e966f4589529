"""What the ledger stores: tenants and their API keys, as plain frozen records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
    created_at: datetime | None = None  # set by the ledger
    updated_at: datetime | None = None  # set by the ledger


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
