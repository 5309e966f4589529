"""Quotas as HTTP: 402/429/503 problems, RateLimit fields, warnings, the failure policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.clock import iso_utc
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.metrics import QuotaMetrics
from gateway.pipeline.admission import upgrade_url
from gateway.problems import problem
from gateway.quota.engine import Charged, QuotaEngine
from gateway.quota.rules import Decision, Refusal
from gateway.quota.store import StoreUnavailable


@dataclass
class Metered:
    """A request the quota engine let through: what to settle and what to tell."""

    charged: Charged | None
    headers: list[tuple[str, str]] = field(default_factory=list)


def rate_limit_fields(decision: Decision) -> list[tuple[str, str]]:
    """`RateLimit-Policy` and `RateLimit` (hard quotas and rate limits only)."""
    fields = []
    if decision.policy:
        fields.append(("RateLimit-Policy", decision.policy))
    if decision.ratelimit:
        fields.append(("RateLimit", decision.ratelimit))
    return fields


def refusal_response(
    engine: QuotaEngine, tenant: Tenant, refusal: Refusal, decision: Decision, rid: str
) -> web.Response:
    """402 for a used-up hard quota, 429 for a rate limit."""
    headers = dict(rate_limit_fields(decision))
    headers["Retry-After"] = str(max(1, refusal.retry_after_s))
    if refusal.status == 429:
        return problem(
            429, "rate-limited",
            f"rate limit {refusal.name!r} allows {refusal.limit} requests; retry in "
            f"{headers['Retry-After']} s",
            request_id=rid, headers=headers, tenant=tenant.id, limit=refusal.limit,
        )  # fmt: skip
    reset_at = iso_utc(refusal.reset_at) if refusal.reset_at else None
    return problem(
        402, "quota-exhausted",
        f"the {refusal.name} quota of plan {tenant.plan!r} is used up "
        f"({refusal.used} of {refusal.limit})" + (f" until {reset_at}" if reset_at else ""),
        request_id=rid, headers=headers, tenant=tenant.id, meter=refusal.name,
        limit=refusal.limit, used=refusal.used, reset_at=reset_at,
        upgrade_url=upgrade_url(engine.config, tenant.plan),
    )  # fmt: skip


async def meter(
    engine: QuotaEngine,
    tenant: Tenant,
    route_index: int,
    context: EventContext,
    metrics: QuotaMetrics,
) -> Metered | web.Response:
    """Check and charge a request, or the response that refuses it."""
    rid = context.request_id
    request = engine.request(tenant, route_index, context)
    if request is None:  # nothing to check now; maybe something to settle
        charges = engine.routes[route_index].charges
        charged = engine.charged(tenant, route_index, None, None, context) if charges else None
        return Metered(charged)
    try:
        result = await engine.check(request)
    except StoreUnavailable:
        if not engine.fail_open:
            metrics.decided("store_error_closed")
            engine.void(request)  # refused: it must charge nothing, even if it ran late
            return problem(
                503, "counter-store-unavailable",
                "quotas cannot be checked right now; retry shortly",
                request_id=rid, headers={"Retry-After": "1"},
            )  # fmt: skip
        metrics.decided("store_error_open")
        charged = engine.charged(tenant, route_index, request, None, context)
        engine.spool(charged)
        return Metered(charged)
    decision = result.decision
    if decision.refusal is not None:
        if not engine.shadow(tenant, route_index):
            metrics.decided("quota_exceeded" if decision.refusal.status == 402 else "rate_limited")
            return refusal_response(engine, tenant, decision.refusal, decision, rid)
        # Shadow: what would have been refused is served and counted as usual.
        metrics.decided("shadow_refusal")
        charged = engine.charged(tenant, route_index, request, result, context)
        await engine.charge_anyway(charged)
        return Metered(charged)
    metrics.decided("allowed")
    headers = rate_limit_fields(decision)
    headers += [("X-Quota-Warning", warning) for warning in decision.warnings]
    return Metered(engine.charged(tenant, route_index, request, result, context), headers)
