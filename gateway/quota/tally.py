"""Counting quota decisions by plan, meter and outcome (and by tenant, when asked) at
the cost of one counter child's `inc` per meter of the request: the children are
fetched once per plan and route, when the tenant's charges are compiled.

The outcome of each meter of a checked request: `allowed`, `warned` (past a
`warn_at` threshold), `overage` (past a soft limit); refused: `exhausted` (this
meter's hard limit), `refused` (another meter's), `rate_limited`;
`shadow_refused` (served in shadow mode although refused); the store failing:
`fail_open` (served, charged later), `fail_closed` (503).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping

from prometheus_client import Counter

from gateway.metrics import OUTCOMES, QuotaMetrics
from gateway.quota.rules import Decision, warned_meter

NO_METER = "_none"  # the meter label of a check with rate limits only
OTHER_TENANTS = "_other"  # the tenant label of every tenant without one of its own


class DecisionTally:
    """The decision counters of one plan's (or tenant's) meters on one route."""

    __slots__ = ("meters", "allowed", "children")

    def __init__(self, family: Counter, head: tuple[str, ...], meters: tuple[str, ...]) -> None:
        self.meters = meters or (NO_METER,)
        self.children = {
            (meter, outcome): family.labels(*head, meter, outcome)
            for meter in self.meters
            for outcome in OUTCOMES
        }
        self.allowed = tuple(self.children[meter, "allowed"] for meter in self.meters)

    def count(self, outcome: str) -> None:
        """The same outcome for every meter."""
        for meter in self.meters:
            self.children[meter, outcome].inc()

    def count_each(self, outcomes: Mapping[str, str], default: str) -> None:
        """Each meter's outcome in `outcomes`, `default` for the others."""
        for meter in self.meters:
            self.children[meter, outcomes.get(meter, default)].inc()

    def decided(self, decision: Decision, shadow: bool) -> None:
        """Count what the store decided (for a refusal: served anyway when `shadow`)."""
        refusal = decision.refusal
        if refusal is None:
            if not decision.warnings:
                for child in self.allowed:
                    child.inc()
                return
            self.count_each(dict(map(warned_meter, decision.warnings)), "allowed")
        elif shadow:
            self.count("shadow_refused")
        elif refusal.status == 429:
            self.count("rate_limited")
        else:
            self.count_each({refusal.name: "exhausted"}, "refused")


class TenantTallies:
    """Decisions by tenant: the `top` busiest tenants keep their label, the rest share
    `_other`. A tenant takes a free label at once; once all are taken, every
    `rebalance_s` the busiest since the last rebalance take them (a tenant losing
    its label loses its series; counts never move between series, so rates hold)."""

    def __init__(
        self,
        family: Counter,
        top: int,
        rebalance_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._family = family
        self._top = top
        self._rebalance_s = rebalance_s
        self._clock = clock
        self._next_rebalance = clock() + rebalance_s
        self.labelled: set[str] = set()
        self._window: dict[str, int] = {}  # decisions per tenant since the last rebalance
        self._tallies: dict[tuple[str, tuple[str, ...]], DecisionTally] = {}

    def tally(self, tenant: str, meters: tuple[str, ...]) -> DecisionTally:
        """The tally one decision of `tenant` on these meters counts in."""
        self._window[tenant] = self._window.get(tenant, 0) + 1
        if tenant not in self.labelled:
            if len(self.labelled) < self._top:
                self.labelled.add(tenant)
            elif self._clock() >= self._next_rebalance:
                self._rebalance()
        key = (tenant if tenant in self.labelled else OTHER_TENANTS, meters)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = DecisionTally(self._family, key[:1], meters)
        return tally

    def _rebalance(self) -> None:
        window, labelled = self._window, self.labelled
        # Ties go to the tenants labelled already: no churn between equals.
        keep = set(heapq.nlargest(self._top, window, key=lambda t: (window[t], t in labelled)))
        for key in [k for k in self._tallies if k[0] in labelled - keep]:
            for meter, outcome in self._tallies.pop(key).children:
                self._family.remove(key[0], meter, outcome)
        self.labelled = keep
        self._window = {}
        self._next_rebalance = self._clock() + self._rebalance_s


class Tallies:
    """Where a process counts its decisions: per plan, and per tenant when asked."""

    def __init__(self, metrics: QuotaMetrics) -> None:
        self._family = metrics.decisions
        self._plans: dict[tuple[str, tuple[str, ...]], DecisionTally] = {}
        family = metrics.tenant_decisions
        self.tenants = TenantTallies(family, metrics.tenant_top) if family is not None else None

    def plan(self, plan: str, meters: tuple[str, ...]) -> DecisionTally:
        """The counters of checks on these meters under `plan` (compile time, not per request)."""
        tally = self._plans.get((plan, meters))
        if tally is None:
            tally = self._plans[plan, meters] = DecisionTally(self._family, (plan,), meters)
        return tally
