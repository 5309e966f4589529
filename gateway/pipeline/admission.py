"""Who is calling, and may they be served at all: admitted, or refused 401, 403, 402 or 503."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.auth.authenticate import AmbiguousCredentials, Authenticator, Unauthenticated
from gateway.clock import Clock, utc_now
from gateway.config.models import GatewayConfig
from gateway.directory import DirectoryUnavailable
from gateway.ledger.records import Tenant
from gateway.problems import Refused
from gateway.services import Services
from gateway.subscription import standing


@dataclass(frozen=True, slots=True)
class Admitted:
    tenant: Tenant
    warning: str | None  # X-Quota-Warning, e.g. while in a grace period
    bearer: bool  # authenticated by the bearer token in Authorization (not an API key)


async def admit(
    headers: Mapping[str, str],
    authenticator: Authenticator,
    services: Services,
    config: GatewayConfig,
    clock: Clock = utc_now,
) -> Admitted:
    """The admitted tenant; Refused when the request may not be served."""
    try:
        principal = await authenticator.authenticate(headers)
        tenant = await services.directory.tenant(principal.tenant_id)
    except Unauthenticated as exc:
        raise Refused(
            401, "unauthenticated", exc.detail, headers={"WWW-Authenticate": exc.challenge()}
        ) from None
    except AmbiguousCredentials as exc:
        raise Refused(400, "ambiguous-credentials", str(exc)) from None
    except DirectoryUnavailable:
        raise Refused(
            503, "ledger-unavailable", "tenant lookups are failing; retry shortly",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    if tenant is None:
        raise Refused(
            403, "tenant-unknown", f"tenant {principal.tenant_id!r} is not known",
            tenant=principal.tenant_id,
        )  # fmt: skip
    if tenant.disabled:
        raise Refused(403, "tenant-disabled", f"tenant {tenant.id!r} is disabled", tenant=tenant.id)
    verdict = standing(tenant.status, tenant.status_changed_at, clock(), config.subscription)
    if not verdict.allowed:
        raise Refused(
            config.subscription.deny_status, "subscription-inactive", verdict.detail,
            tenant=tenant.id, plan=tenant.plan, upgrade_url=config.upgrade_url(tenant.plan),
        )  # fmt: skip
    return Admitted(tenant, verdict.warning, principal.via == "jwt")
