"""Plans and routes compiled once per config, and each tenant's charges on a route
compiled once for as long as their periods last (the per-request side is the engine's)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.clock import Clock
from gateway.config.models import GatewayConfig, MeterConfig, RouteConfig
from gateway.config.types import UNLIMITED
from gateway.ledger.records import LimitOverride, Tenant
from gateway.quota.gcra import RateLimit
from gateway.quota.periods import Period, PeriodsCache
from gateway.quota.plan import ChargePlan
from gateway.quota.rules import MeterLimit
from gateway.quota.store import MeterCharge
from gateway.quota.tally import DecisionTally, Tallies

log = logging.getLogger("gateway.quota")
_ALWAYS = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class PlanPolicy:
    """A plan's limits, compiled once per config."""

    limits: dict[str, MeterLimit]
    rate_limits: tuple[tuple[RateLimit, str], ...]  # (limit, scope: "tenant" or "route")
    shadow: bool


_NO_POLICY = PlanPolicy({}, (), False)


@dataclass(frozen=True, slots=True)
class RouteCharges:
    """A route's charges, compiled once per config."""

    route: str  # the route's name
    fixed: dict[str, int]  # positive: checked and charged before forwarding
    after_success: dict[str, int]  # negative gauge deltas, applied after a success
    from_response: dict[str, str]  # meter -> response header with the quantity
    keep: str  # charge_on
    shadow: bool
    gauges: frozenset[str]  # the charged meters that are gauges (levels, not usage)

    @classmethod
    def compile(cls, route: RouteConfig, meters: Mapping[str, MeterConfig]) -> RouteCharges:
        fixed, after, response = {}, {}, {}
        for meter, cost in route.charge.items():
            if cost == "response":
                header = meters[meter].from_response_header
                assert header is not None  # the config loader checked it
                response[meter] = header
            elif isinstance(cost, int) and cost > 0:
                fixed[meter] = cost
            elif isinstance(cost, int) and cost < 0:
                after[meter] = cost
        gauges = frozenset(m for m in route.charge if meters[m].type == "gauge")
        return cls(route.name, fixed, after, response, route.charge_on, route.shadow, gauges)

    @property
    def charges(self) -> bool:
        return bool(self.fixed or self.after_success or self.from_response)


@dataclass(frozen=True, slots=True)
class Compiled:
    """A tenant's plan on a route, and what it was compiled from and for how long."""

    plan: ChargePlan | None  # None: nothing to check
    tally: DecisionTally | None  # where its decisions are counted (None: no metrics)
    tenant: Tenant  # the very object: the directory loads a new one when the tenant changes
    route: RouteCharges
    scope_route: str  # the name route-scoped rate limits are keyed by
    valid_from: datetime  # the plan's periods are current from ...
    valid_until: datetime  # ... until (exclusive)


class Policies:
    """The quota side of one config: its meters and plans, and the tenants' compiled
    charges per route (least recently compiled dropped first beyond
    `storage.cache_entries`). A reload builds new ones; requests in flight keep theirs."""

    def __init__(self, config: GatewayConfig, clock: Clock, tallies: Tallies | None = None) -> None:
        self.config = config
        self.meters = self._meters = config.meters
        self._clock = clock
        self._tallies = tallies
        self.plans = {name: self._plan(config, name) for name in config.plans}
        self._periods = PeriodsCache(config.meters)
        self._compiled: dict[tuple[str, str], Compiled] = {}  # by (tenant id, route name)
        # As many (tenant, route) plans as tenants cached: one route each at least.
        self._max_compiled = config.storage.cache_entries

    def _plan(self, config: GatewayConfig, name: str) -> PlanPolicy:
        plan = config.plans[name]
        limits = {
            meter: MeterLimit(
                meter,
                self._meters[meter].type,
                spec.limit,
                hard=spec.enforcement == "hard",
                warn_at=tuple(sorted(spec.warn_at)),
            )
            for meter, spec in plan.limits.items()
        }
        rates = tuple(
            (RateLimit(r.name, r.rate, r.per_s, r.burst or r.rate), r.scope)
            for r in plan.rate_limits
        )
        return PlanPolicy(limits, rates, plan.shadow)

    def _limit(self, policy: PlanPolicy, tenant: Tenant, meter: str) -> MeterLimit:
        return self._limit_of(policy, tenant.overrides, meter)

    def _limit_of(
        self, policy: PlanPolicy, overrides: Mapping[str, LimitOverride], meter: str
    ) -> MeterLimit:
        override = overrides.get(meter)
        if override is not None:
            return MeterLimit(
                meter, self._meters[meter].type, override.limit,
                hard=override.enforcement == "hard", warn_at=tuple(sorted(override.warn_at)),
            )  # fmt: skip
        # A meter the plan does not list is unlimited for it (still counted).
        return policy.limits.get(meter) or MeterLimit(meter, self._meters[meter].type, UNLIMITED)

    def meter_limit(self, tenant: Tenant, meter: str) -> MeterLimit:
        """The limit of `meter` for the tenant: its override, else its plan's (credits aside)."""
        return self.limit_of(tenant.plan, tenant.overrides, meter)

    def limit_of(self, plan: str, overrides: Mapping[str, LimitOverride], meter: str) -> MeterLimit:
        """The limit of `meter` on `plan` with a tenant's `overrides` (credits aside)."""
        return self._limit_of(self.plans.get(plan) or _NO_POLICY, overrides, meter)

    def shadow(self, tenant: Tenant, route: RouteCharges) -> bool:
        """Decide and count as usual, refuse nothing."""
        policy = self.plans.get(tenant.plan)
        return route.shadow or (policy is not None and policy.shadow)

    def charge_plan(self, tenant: Tenant, route: RouteCharges, scope_route: str) -> Compiled:
        """The plan of the tenant on the route now, compiled again only when the tenant
        changed (the directory loads a new Tenant), the route did, or a period rolled over."""
        now = self._clock()
        compiled = self._compiled.get((tenant.id, route.route))
        if (
            compiled is None or compiled.tenant is not tenant or compiled.route is not route
            or compiled.scope_route != scope_route
            or not compiled.valid_from <= now < compiled.valid_until
        ):  # fmt: skip
            compiled = self._compile(tenant, route, scope_route, now)
        return compiled

    def _compile(
        self, tenant: Tenant, route: RouteCharges, scope_route: str, now: datetime
    ) -> Compiled:
        policy = self.plans.get(tenant.plan)
        if policy is None:
            log.error("tenant %s has plan %r, which is not in the config", tenant.id, tenant.plan)
            policy = _NO_POLICY
        valid_from, valid_until = _ALWAYS
        plan = tally = None
        if route.fixed or route.from_response or policy.rate_limits:
            meters = []
            for meter in sorted({*route.fixed, *route.from_response}):
                periods = self._periods.around(meter, now, tenant.billing_anchor)
                if periods:
                    valid_from = max(valid_from, periods[1].start)
                    valid_until = min(valid_until, periods[1].end)
                meters.append(
                    MeterCharge(
                        self._limit(policy, tenant, meter),
                        cost=route.fixed.get(meter, 0),
                        needs_remaining=meter in route.from_response,
                        periods=periods,
                        credits=tuple(credit_of(tenant, meter, p) for p in periods),
                    )
                )
            rates = tuple(
                (limit, scope_route if scope == "route" else "")
                for limit, scope in policy.rate_limits
            )
            plan = ChargePlan(tenant.id, tuple(meters), rates)
            if self._tallies is not None:
                tally = self._tallies.plan(tenant.plan, tuple(m.limit.meter for m in meters))
        compiled = Compiled(plan, tally, tenant, route, scope_route, valid_from, valid_until)
        key = (tenant.id, route.route)
        # Oldest compiled first out (insertion order): one in use is compiled again.
        if self._compiled.pop(key, None) is None and len(self._compiled) >= self._max_compiled:
            del self._compiled[next(iter(self._compiled))]
        self._compiled[key] = compiled
        return compiled


def credit_of(tenant: Tenant, meter: str, period: Period | None) -> int:
    """What the tenant was credited for `meter` in `period` (counters only)."""
    return 0 if period is None else tenant.credited(meter, period.start)
