"""A tenant's charges on a route, compiled once for as long as their periods last.

Every request of a tenant on a route checks the same buckets with the same
limits, credits and periods until a period rolls over or the tenant changes;
only the store's state differs. `ChargePlan` works out once what does not
change (each period's credited limit, which buckets could refuse and from what
usage on, the `RateLimit-Policy` field), so that deciding a request the store
allowed is a few integer comparisons and one formatted `RateLimit` field.

`ChargePlan.decide` answers exactly what `rules.decide` answers for the same
state (a property test holds it to that); whatever the plan does not handle
itself (a refusal, duplicate names) it leaves to `rules.decide`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.clock import US_PER_S, from_us, to_us
from gateway.quota.gcra import RateLimit
from gateway.quota.periods import Period, ceil_seconds
from gateway.quota.rules import (
    Decision,
    MeterLimit,
    advertised,
    credited,
    decide,
    policy_field,
    warning,
)


@dataclass(frozen=True, slots=True)
class MeterCharge:
    limit: MeterLimit
    cost: int = 0  # charged now when positive
    needs_remaining: bool = False  # charged from the response: something must be left
    periods: tuple[Period, ...] = ()  # counters: periods around now (see periods_around)
    credits: tuple[int, ...] = ()  # per period: what the tenant was credited on top of the limit


RateLimits = tuple[tuple[RateLimit, str], ...]  # (limit, scope: "" or a route)
Costs = dict[str, tuple[Period | None, int]]  # meter -> (period, cost)


def charged_costs(meters: Sequence[MeterCharge], periods: Mapping[str, Period]) -> Costs:
    """What the meters charge now, each in its period in `periods` (else its current one,
    None for a gauge): what a refund or a spooled charge must take back or apply."""
    costs: Costs = {}
    for meter in meters:
        if meter.cost > 0:
            name = meter.limit.meter
            period = periods.get(name) or (meter.periods[1] if meter.periods else None)
            costs[name] = (period, meter.cost)
    return costs


class _Chosen:
    """The plan's tables for one choice of period per meter (the store's clock picks it)."""

    __slots__ = ("limits", "periods", "policy", "refusing", "warning_from", "advertised", "costs")

    def __init__(
        self, meters: Sequence[MeterCharge], rate_limits: Sequence[RateLimit], chosen: Sequence[int]
    ) -> None:
        self.limits = [
            credited(m.limit, m.credits[i] if m.credits else 0)
            for m, i in zip(meters, chosen, strict=True)
        ]
        self.periods = {
            m.limit.meter: m.periods[i] for m, i in zip(meters, chosen, strict=True) if m.periods
        }
        self.policy = policy_field(self.limits, self.periods, rate_limits)
        # (meter index, the most usage it may have now): beyond it, rules.decide refuses.
        self.refusing: list[tuple[int, int]] = []
        # (meter index, its limit, the least usage after a charge that needs a warning).
        self.warning_from: list[tuple[int, MeterLimit, int]] = []
        for i, (meter, limit) in enumerate(zip(meters, self.limits, strict=True)):
            if meter.cost > 0 or meter.needs_remaining:
                if limit.hard and not limit.unlimited:
                    most = limit.limit - meter.cost if meter.cost > 0 else limit.limit - 1
                    self.refusing.append((i, most))
            if not limit.unlimited and limit.limit > 0:
                # rules._reached in basis points: used * 10_000 >= points * limit.
                points = [round(t * 10_000) * limit.limit for t in limit.warn_at]
                least = min((-(-p // 10_000) for p in points), default=limit.limit + 1)
                self.warning_from.append((i, limit, min(least, limit.limit + 1)))
        self.costs = charged_costs(meters, self.periods)
        # (meter index, the field's start, limit, period end in us), in the field's order.
        index = {m.limit.meter: i for i, m in enumerate(meters)}
        self.advertised = [
            (index[limit.meter], f'"{limit.meter}";r=', limit.limit, to_us(period.end))
            for limit, period in advertised(self.limits, self.periods)
        ]


class ChargePlan:
    """What every request of `tenant` with these meters and rate limits checks."""

    __slots__ = ("tenant", "meters", "rate_limits", "_names", "_costs", "_rates", "_exact",
                 "_chosen", "__weakref__")  # fmt: skip

    def __init__(self, tenant: str, meters: tuple[MeterCharge, ...], rate_limits: RateLimits):
        self.tenant = tenant
        self.meters = meters
        self.rate_limits = rate_limits
        self._names = [m.limit.meter for m in meters]
        self._costs = [max(0, m.cost) for m in meters]
        # (name, interval, capacity, the RateLimit item's start) per rate limit.
        self._rates = [
            (r.name, r.interval_us, r.burst * r.interval_us, f'"{r.name}";r=')
            for r, _ in rate_limits
        ]
        # rules.decide keys its answer by name: with a name twice, only it is exact.
        names = [r.name for r, _ in rate_limits]
        self._exact = len(set(self._names)) == len(meters) and len(set(names)) == len(names)
        self._chosen: dict[tuple[int, ...], _Chosen] = {}

    def _tables(self, chosen: tuple[int, ...]) -> _Chosen:
        tables = self._chosen.get(chosen)
        if tables is None:
            limits = [r for r, _ in self.rate_limits]
            tables = self._chosen[chosen] = _Chosen(self.meters, limits, chosen)
        return tables

    def charged_costs(self, periods: Mapping[str, Period]) -> Costs:
        """`charged_costs` of the plan's meters (read only: the plan's own when `periods`
        is what its `decide` answered)."""
        for tables in self._chosen.values():
            if tables.periods is periods:
                return tables.costs
        return charged_costs(self.meters, periods)

    def decide(
        self, now_us: int, chosen: tuple[int, ...], used: Sequence[int], tats: Sequence[int]
    ) -> tuple[Decision, dict[str, Period]]:
        """`rules.decide` for the state a store read, and each counter's period chosen.

        The periods' mapping is the plan's own, shared by its answers: read it only.
        """
        tables = self._chosen.get(chosen) or self._tables(chosen)
        allowed = self._exact
        for i, most in tables.refusing:
            if used[i] > most:
                allowed = False
        new_tats = {}
        rate_fields = []
        for (name, interval, capacity, start), tat in zip(self._rates, tats, strict=True):
            held = (tat if tat > now_us else now_us) + interval - now_us  # in us, > 0
            if held > capacity:
                allowed = False
            new_tats[name] = now_us + held
            remaining = (capacity - held) // interval
            rate_fields.append(f"{start}{max(0, remaining)};t={-(-held // US_PER_S)}")
        if not allowed:
            return self._decide(tables, now_us, used, tats), tables.periods
        costs = self._costs
        used_after = {}
        for name, before, cost in zip(self._names, used, costs, strict=True):
            used_after[name] = before + cost
        warnings = []
        for i, limit, least in tables.warning_from:
            before, after = used[i], used[i] + costs[i]
            if after > before and after >= least:
                text = warning(limit, before, after)
                if text is not None:
                    warnings.append(text)
        fields = []
        for i, start, quota, end_us in tables.advertised:
            left = max(0, quota - used[i] - costs[i])
            fields.append(f"{start}{left};t={ceil_seconds((end_us - now_us) / US_PER_S)}")
        return Decision(
            None, used_after, new_tats, tuple(warnings), tables.policy,
            ", ".join(fields + rate_fields),
        ), tables.periods  # fmt: skip

    def _decide(
        self, tables: _Chosen, now_us: int, used: Sequence[int], tats: Sequence[int]
    ) -> Decision:
        return decide(
            tables.limits,
            tables.periods,
            dict(zip(self._names, used, strict=True)),
            {m.limit.meter: m.cost for m in self.meters if m.cost > 0},
            [limit for limit, _ in self.rate_limits],
            {limit.name: tat for (limit, _), tat in zip(self.rate_limits, tats, strict=True)},
            from_us(now_us),
            now_us,
            needs_remaining=frozenset(m.limit.meter for m in self.meters if m.needs_remaining),
        )
