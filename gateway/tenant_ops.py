"""Changing tenants and API keys: one implementation for the admin API and the CLI.

Every change is written to the ledger, then announced so that every gateway
process drops its cached copy.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from gateway.auth.apikeys import new_key
from gateway.config.loader import format_path
from gateway.config.models import GatewayConfig, LimitConfig
from gateway.config.types import MAX_QUANTITY, Name, SubscriptionStatus
from gateway.invalidation import Bus
from gateway.ledger.records import ApiKey, Credit, LimitOverride, Tenant
from gateway.ledger.store import Ledger
from gateway.quota.periods import meter_period

# Printable, no spaces: ids travel in usage events' flat wire form and in Redis keys.
_TENANT_ID = re.compile(r"^[!-~]{1,200}$")


class TenantChangeError(ValueError):
    """A change that cannot be applied; the message names the field."""


class TenantChanges(BaseModel):
    """The body of `PUT /admin/tenants/{id}`: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    plan: Name | None = None
    status: SubscriptionStatus | None = None
    billing_anchor: AwareDatetime | None = None
    stripe_customer: str | None = None
    stripe_subscription: str | None = None
    disabled: bool | None = None
    # The tenant's own limits, replacing its plan's for the meters named; the
    # whole map is replaced ({} removes every override).
    overrides: dict[Name, LimitConfig] | None = None


def parse_changes(data: Any) -> TenantChanges:
    """Validate a change set; errors name the field, like config errors do."""
    try:
        return TenantChanges.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = format_path(first["loc"]) or "body"
        raise TenantChangeError(f"{where}: {first['msg']}") from None


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    """The API form of a tenant."""
    return {
        "id": tenant.id,
        "name": tenant.name,
        "plan": tenant.plan,
        "status": tenant.status,
        "status_changed_at": _iso(tenant.status_changed_at),
        "billing_anchor": _iso(tenant.billing_anchor),
        "stripe_customer": tenant.stripe_customer,
        "stripe_subscription": tenant.stripe_subscription,
        "disabled": tenant.disabled,
        "overrides": {
            meter: {
                "limit": "unlimited" if o.limit < 0 else o.limit,
                "enforcement": o.enforcement,
                "warn_at": list(o.warn_at),
            }
            for meter, o in sorted(tenant.overrides.items())
        },
        "created_at": _iso(tenant.created_at),
        "updated_at": _iso(tenant.updated_at),
    }


def api_key_json(key: ApiKey) -> dict[str, Any]:
    """The API form of a key record (never the key itself)."""
    return {
        "prefix": key.prefix,
        "tenant": key.tenant_id,
        "name": key.name,
        "created_at": _iso(key.created_at),
        "revoked_at": _iso(key.revoked_at),
        "last_used_at": _iso(key.last_used_at),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None


class TenantOps:
    """Tenant and key changes against one ledger, announced on one bus."""

    def __init__(self, config: GatewayConfig, ledger: Ledger, bus: Bus) -> None:
        self._config = config
        self._ledger = ledger
        self._bus = bus

    async def put(self, tenant_id: str, changes: TenantChanges) -> tuple[Tenant, bool]:
        """Create or update a tenant; (stored tenant, created)."""
        if changes.plan is not None and changes.plan not in self._config.plans:
            known = ", ".join(sorted(self._config.plans)) or "none"
            raise TenantChangeError(f"plan: unknown plan {changes.plan!r} (defined: {known})")
        if not _TENANT_ID.match(tenant_id):
            raise TenantChangeError("id: 1 to 200 printable characters without spaces")
        current = await self._ledger.get_tenant(tenant_id)
        given = changes.model_dump(exclude_unset=True)
        if changes.overrides is not None:
            given["overrides"] = self._overrides(changes.overrides)
        if current is None:
            if changes.plan is None:
                raise TenantChangeError("plan: required for a new tenant")
            now = datetime.now(UTC)
            fields = {k: v for k, v in given.items() if v is not None}
            tenant = Tenant(
                id=tenant_id,
                plan=changes.plan,
                status=fields.pop("status", "active"),
                status_changed_at=now,
                **{k: v for k, v in fields.items() if k != "plan"},
            )
        else:
            for key in ("plan", "status", "disabled", "overrides"):
                if key in given and given[key] is None:
                    raise TenantChangeError(f"{key}: may not be null")
            if given.get("status", current.status) != current.status:
                # A grace period runs from the moment the status changed.
                given["status_changed_at"] = datetime.now(UTC)
            tenant = replace(current, **given)
        stored = await self._ledger.put_tenant(tenant)
        await self._bus.publish("tenant", tenant_id)
        return stored, current is None

    def _overrides(self, given: dict[str, LimitConfig]) -> dict[str, LimitOverride]:
        unknown = sorted(set(given) - set(self._config.meters))
        if unknown:
            known = ", ".join(sorted(self._config.meters)) or "none"
            raise TenantChangeError(
                f"overrides.{unknown[0]}: unknown meter {unknown[0]!r} (defined: {known})"
            )
        return {
            meter: LimitOverride(spec.limit, spec.enforcement, tuple(sorted(spec.warn_at)))
            for meter, spec in given.items()
        }

    async def credit(self, tenant_id: str, meter: str, quantity: int) -> Credit | None:
        """Add `quantity` to the tenant's quota of `meter` for the current period; None if
        the tenant is unknown. A negative quantity takes back credit, never below none."""
        spec = self._config.meters.get(meter)
        if spec is None:
            raise TenantChangeError(f"meter: unknown meter {meter!r}")
        if spec.type != "counter":
            raise TenantChangeError(f"meter: {meter} is a gauge; credits are for counters")
        current = await self._ledger.get_tenant(tenant_id)
        if current is None:
            return None
        period = meter_period(spec, datetime.now(UTC), current.billing_anchor)
        assert period is not None  # a counter, checked above
        already = current.credited(meter, period.start)
        if already + quantity > MAX_QUANTITY:
            raise TenantChangeError(f"quantity: the period's credit would pass {MAX_QUANTITY}")
        if already + quantity < 0:
            raise TenantChangeError(
                f"quantity: {quantity} would take back more than the {already} credited"
            )
        credit = Credit(meter, period.start, period.end, quantity)
        await self._ledger.add_credit(tenant_id, credit)
        await self._bus.publish("tenant", tenant_id)
        return credit

    async def disable(self, tenant_id: str) -> Tenant | None:
        """Disable (never delete: the ledger keeps its history); None if unknown."""
        current = await self._ledger.get_tenant(tenant_id)
        if current is None:
            return None
        stored = await self._ledger.put_tenant(replace(current, disabled=True))
        await self._bus.publish("tenant", tenant_id)
        return stored

    async def create_key(self, tenant_id: str, name: str | None) -> tuple[str, ApiKey] | None:
        """A new key for the tenant: (the key, shown once; its record); None if unknown."""
        if await self._ledger.get_tenant(tenant_id) is None:
            return None
        key, prefix, digest = new_key()
        record = ApiKey(
            prefix=prefix,
            tenant_id=tenant_id,
            key_hash=digest,
            created_at=datetime.now(UTC),
            name=name,
        )
        await self._ledger.add_api_key(record)
        await self._bus.publish("api_key", prefix)
        return key, record

    async def revoke_key(self, prefix: str) -> bool:
        """Revoke; False if no active key has this prefix."""
        revoked = await self._ledger.revoke_api_key(prefix, datetime.now(UTC))
        await self._bus.publish("api_key", prefix)
        return revoked
