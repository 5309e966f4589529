"""One request's quota work: charged before the forward, settled after it, whatever happened.

The failure policy (fail_open, fail_closed) and shadow mode are decided here,
not by the HTTP adapter: `check` either lets the request through (with the
headers to add) or raises a typed refusal, and `finish` always runs, from the
`finally` around the forward.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.clock import iso_utc
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.problems import Refused
from gateway.quota.engine import Charged, QuotaEngine
from gateway.quota.policy import RouteCharges
from gateway.quota.rules import Decision
from gateway.quota.store import StoreUnavailable

# What a request that got no response is settled as: nothing was served, so
# `charge_on: success` refunds it, as for an unreachable upstream.
NO_RESPONSE_STATUS = 502


def rate_limit_fields(decision: Decision) -> list[tuple[str, str]]:
    """`RateLimit-Policy` and `RateLimit` (hard quotas and rate limits only)."""
    fields = []
    if decision.policy:
        fields.append(("RateLimit-Policy", decision.policy))
    if decision.ratelimit:
        fields.append(("RateLimit", decision.ratelimit))
    return fields


def quota_refusal(engine: QuotaEngine, tenant: Tenant, decision: Decision) -> Refused:
    """402 for a used-up hard quota, 429 for a rate limit."""
    refusal = decision.refusal
    assert refusal is not None
    headers = dict(rate_limit_fields(decision))
    if refusal.status == 429 or refusal.reset_at is not None:
        # Not for a gauge (or a counter without period): waiting frees nothing.
        headers["Retry-After"] = str(max(1, refusal.retry_after_s))
    if refusal.status == 429:
        return Refused(
            429, "rate-limited",
            f"rate limit {refusal.name!r} allows {refusal.limit} requests; retry in "
            f"{headers['Retry-After']} s",
            headers=headers, tenant=tenant.id, limit=refusal.limit,
        )  # fmt: skip
    reset_at = iso_utc(refusal.reset_at) if refusal.reset_at else None
    return Refused(
        402, "quota-exhausted",
        f"the {refusal.name} quota of plan {tenant.plan!r} is used up "
        f"({refusal.used} of {refusal.limit})" + (f" until {reset_at}" if reset_at else ""),
        headers=headers, tenant=tenant.id, meter=refusal.name, limit=refusal.limit,
        used=refusal.used, reset_at=reset_at, upgrade_url=engine.config.upgrade_url(tenant.plan),
    )  # fmt: skip


class Metering:
    """The quota side of one request on one route."""

    def __init__(
        self, engine: QuotaEngine, tenant: Tenant, route: RouteCharges, context: EventContext
    ) -> None:
        self._engine = engine
        self._tenant = tenant
        self._route = route
        self._context = context
        self._charged: Charged | None = None
        self.headers: list[tuple[str, str]] = []  # RateLimit fields and warnings, once checked

    async def check(self) -> None:
        """Check and charge the request; Refused (402, 429, or 503 under fail_closed)."""
        engine, tenant, route, context = self._engine, self._tenant, self._route, self._context
        prepared = engine.prepared(tenant, route, context)
        if prepared is None:  # nothing to check now; maybe something to settle
            if route.charges:
                self._charged = engine.charged(tenant, route, None, None, context)
            return
        request, tally = prepared
        try:
            result = await engine.check(request)
        except StoreUnavailable:
            engine.failed(tally, tenant.id)
            if not engine.fail_open:
                engine.void(request)  # refused: it must charge nothing, even if it ran late
                raise Refused(
                    503, "counter-store-unavailable",
                    "quotas cannot be checked right now; retry shortly",
                    headers={"Retry-After": "1"},
                ) from None  # fmt: skip
            self._charged = engine.charged(tenant, route, request, None, context)
            engine.spool(self._charged)
            return
        decision = result.decision
        if decision.refusal is not None:
            shadow = engine.shadow(tenant, route)
            engine.decided(tally, tenant.id, decision, shadow)
            if not shadow:
                if engine.refusals is not None:
                    engine.refusals.refused(
                        tenant.id, decision.refusal.status, decision.refusal.name
                    )
                raise quota_refusal(engine, tenant, decision)
            # Shadow: what would have been refused is served and counted as usual.
            self._charged = engine.charged(tenant, route, request, result, context)
            await engine.charge_anyway(self._charged)
            return
        engine.decided(tally, tenant.id, decision, False)
        if engine.signals is not None and not result.replayed:
            engine.signals.saw(request, result)
        self.headers = rate_limit_fields(decision)
        self.headers += [("X-Quota-Warning", warning) for warning in decision.warnings]
        self._charged = engine.charged(tenant, route, request, result, context)

    async def finish(self, status: int | None, headers: Mapping[str, str]) -> None:
        """Settle what `check` charged by the response's status; None when no response
        was made (the forward failed unexpectedly). Runs once; refused requests owe nothing."""
        charged, self._charged = self._charged, None
        if charged is not None:
            status = NO_RESPONSE_STATUS if status is None else status
            await self._engine.settle(charged, status, headers)
