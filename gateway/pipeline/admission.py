"""Who is calling, and may they be served at all: 401, 403, 402 or admitted."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from gateway.auth.authenticate import Unauthenticated
from gateway.config.models import GatewayConfig
from gateway.directory import DirectoryUnavailable
from gateway.ledger.records import Tenant
from gateway.problems import problem
from gateway.services import Services
from gateway.subscription import standing


@dataclass(frozen=True, slots=True)
class Admitted:
    tenant: Tenant
    warning: str | None  # X-Quota-Warning, e.g. while in a grace period


def upgrade_url(config: GatewayConfig, plan: str) -> str | None:
    """Where a refused tenant can fix its subscription."""
    spec = config.plans.get(plan)
    return (spec.upgrade_url if spec else None) or config.billing.upgrade_url


async def admit(
    request: web.Request, services: Services, config: GatewayConfig, rid: str
) -> Admitted | web.Response:
    """The admitted tenant, or the problem response that refuses the request."""
    try:
        principal = await services.authenticator.authenticate(request.headers)
        tenant = await services.directory.tenant(principal.tenant_id)
    except Unauthenticated as exc:
        return problem(
            401, "unauthenticated", exc.detail, request_id=rid,
            headers={"WWW-Authenticate": exc.challenge()},
        )  # fmt: skip
    except DirectoryUnavailable:
        return problem(
            503, "ledger-unavailable", "tenant lookups are failing; retry shortly",
            request_id=rid, headers={"Retry-After": "1"},
        )  # fmt: skip
    if tenant is None:
        return problem(
            403, "tenant-unknown", f"tenant {principal.tenant_id!r} is not known",
            request_id=rid, tenant=principal.tenant_id,
        )  # fmt: skip
    if tenant.disabled:
        return problem(
            403, "tenant-disabled", f"tenant {tenant.id!r} is disabled",
            request_id=rid, tenant=tenant.id,
        )  # fmt: skip
    verdict = standing(
        tenant.status, tenant.status_changed_at, datetime.now(UTC), config.subscription
    )
    if not verdict.allowed:
        status = config.subscription.deny_status
        return problem(
            status, "subscription-inactive", verdict.detail, request_id=rid,
            tenant=tenant.id, plan=tenant.plan, upgrade_url=upgrade_url(config, tenant.plan),
        )  # fmt: skip
    return Admitted(tenant, verdict.warning)
