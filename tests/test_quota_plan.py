"""A compiled charge plan decides exactly as `rules.decide`, whatever the state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clock import from_us, to_us
from gateway.config.types import UNLIMITED
from gateway.quota.gcra import RateLimit
from gateway.quota.periods import Period, PeriodKind, periods_around
from gateway.quota.plan import ChargePlan, MeterCharge
from gateway.quota.rules import MeterLimit, credited, decide

NOW = datetime(2026, 11, 21, 15, 30, 12, 345678, tzinfo=UTC)
NAMES = ("api_calls", "tokens", "members")

limits = st.one_of(st.just(UNLIMITED), st.integers(0, 40))
warn_at = st.lists(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.999, 1.0]), max_size=3).map(
    lambda ts: tuple(sorted(ts))
)


@st.composite
def meters(draw: st.DrawFn) -> tuple[MeterCharge, ...]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=3))  # repeats too
    charges = []
    for name in names:
        gauge = draw(st.booleans())
        limit = MeterLimit(
            name, "gauge" if gauge else "counter", draw(limits), draw(st.booleans()), draw(warn_at)
        )
        kind: PeriodKind = draw(st.sampled_from(["month", "day", "hour", "none"]))
        periods = () if gauge else periods_around(kind, NOW)
        credits = () if gauge else tuple(draw(st.lists(st.integers(0, 5), min_size=3, max_size=3)))
        cost = draw(st.integers(-2, 3))
        charges.append(MeterCharge(limit, cost, draw(st.booleans()), periods, credits))
    return tuple(charges)


rates = st.lists(
    st.builds(
        RateLimit,
        st.sampled_from(["per_second", "per_minute"]),
        st.integers(1, 10),
        st.sampled_from([0.5, 1.0, 60.0]),
        st.integers(1, 10),
    ),
    max_size=2,
)


@settings(max_examples=400, deadline=None)
@given(meters(), rates, st.data())
def test_the_plan_decides_as_the_rules(
    charges: tuple[MeterCharge, ...], rate_limits: list[RateLimit], data: st.DataObject
) -> None:
    plan = ChargePlan("acme", charges, tuple((r, "") for r in rate_limits))
    now_us = to_us(NOW) + data.draw(st.integers(-2_000_000, 2_000_000))
    for _ in range(3):  # a plan is asked many times, its tables kept between
        chosen = tuple(data.draw(st.integers(0, 2)) if m.periods else 0 for m in charges)
        # Near the limits and their thresholds, where an answer changes.
        near = [m.limit.limit if not m.limit.unlimited else 10 for m in charges]
        used = [max(0, n + data.draw(st.integers(-12, 3))) for n in near]
        tats = [
            max(0, now_us + data.draw(st.integers(-3 * r.interval_us, 12 * r.interval_us)))
            for r in rate_limits
        ]
        decision, periods = plan.decide(now_us, chosen, used, tats)
        expected_periods = {
            m.limit.meter: m.periods[i] for m, i in zip(charges, chosen, strict=True) if m.periods
        }
        expected = decide(
            [
                credited(m.limit, m.credits[i] if m.credits else 0)
                for m, i in zip(charges, chosen, strict=True)
            ],
            expected_periods,
            {m.limit.meter: u for m, u in zip(charges, used, strict=True)},
            {m.limit.meter: m.cost for m in charges if m.cost > 0},
            rate_limits,
            {r.name: t for r, t in zip(rate_limits, tats, strict=True)},
            from_us(now_us),
            now_us,
            needs_remaining=frozenset(m.limit.meter for m in charges if m.needs_remaining),
        )
        assert (decision, periods) == (expected, expected_periods)


def test_seconds_left_round_up_as_the_periods_do() -> None:
    # The RateLimit field's t= comes from integers; Period.seconds_left from datetimes.
    period = Period(NOW - timedelta(days=3), NOW + timedelta(seconds=10, microseconds=1))
    limit = MeterLimit("api_calls", "counter", 5)
    plan = ChargePlan("acme", (MeterCharge(limit, 1, periods=(period,) * 3),), ())
    for offset_us in (0, 1, 999_999, 1_000_000, 1_000_001, 10_000_001, 10_000_002):
        now_us = to_us(NOW) + offset_us
        decision, _ = plan.decide(now_us, (1,), [0], [])
        assert decision.ratelimit == f'"api_calls";r=4;t={period.seconds_left(from_us(now_us))}'
