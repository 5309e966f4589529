"""Pure quota rules: billing periods and GCRA, with `now` passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clock import US_PER_S
from gateway.config.models import MeterConfig
from gateway.quota.gcra import RateLimit, gcra
from gateway.quota.periods import Period, PeriodKind, PeriodsCache, meter_periods, period_of


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


MS = timedelta(milliseconds=1)
JAN31 = utc(2024, 1, 31, 10, 0)  # 2024 is a leap year
JAN31_COMMON = utc(2025, 1, 31, 10, 0)


@pytest.mark.parametrize(
    ("anchor", "now", "start", "end"),
    [
        # Leap year: the 31st falls on Feb 29, then comes back to Mar 31.
        (JAN31, utc(2024, 2, 15), JAN31, utc(2024, 2, 29, 10)),
        (JAN31, utc(2024, 2, 29, 10) - MS, JAN31, utc(2024, 2, 29, 10)),
        (JAN31, utc(2024, 2, 29, 10), utc(2024, 2, 29, 10), utc(2024, 3, 31, 10)),
        (JAN31, utc(2024, 3, 31, 10) - MS, utc(2024, 2, 29, 10), utc(2024, 3, 31, 10)),
        (JAN31, utc(2024, 4, 30, 10), utc(2024, 4, 30, 10), utc(2024, 5, 31, 10)),
        # Common year: Feb 28.
        (JAN31_COMMON, utc(2025, 2, 28, 10) - MS, JAN31_COMMON, utc(2025, 2, 28, 10)),
        (JAN31_COMMON, utc(2025, 2, 28, 10), utc(2025, 2, 28, 10), utc(2025, 3, 31, 10)),
        # 29th and 30th anchors in February.
        (utc(2025, 1, 29), utc(2025, 2, 28, 12), utc(2025, 2, 28), utc(2025, 3, 29)),
        (utc(2024, 1, 30), utc(2024, 2, 29, 12), utc(2024, 2, 29), utc(2024, 3, 30)),
        # Across a year end, and an anchor in the future (only its day and time count).
        (utc(2026, 3, 15, 8), utc(2026, 12, 31), utc(2026, 12, 15, 8), utc(2027, 1, 15, 8)),
        (utc(2027, 5, 15, 8), utc(2026, 11, 20), utc(2026, 11, 15, 8), utc(2026, 12, 15, 8)),
    ],
)
def test_billing_cycle(anchor: datetime, now: datetime, start: datetime, end: datetime) -> None:
    assert period_of("billing_cycle", now, anchor) == Period(start, end)


@pytest.mark.parametrize(
    ("kind", "now", "start", "end"),
    [
        ("billing_cycle", utc(2026, 11, 21, 15), utc(2026, 11, 1), utc(2026, 12, 1)),  # default
        ("month", utc(2026, 12, 31, 23, 59, 59, 999000), utc(2026, 12, 1), utc(2027, 1, 1)),
        ("month", utc(2027, 1, 1), utc(2027, 1, 1), utc(2027, 2, 1)),
        ("day", utc(2024, 2, 28, 23, 59, 59, 999000), utc(2024, 2, 28), utc(2024, 2, 29)),
        ("day", utc(2024, 2, 29), utc(2024, 2, 29), utc(2024, 3, 1)),
        ("hour", utc(2026, 11, 21, 15, 59, 59, 999000), utc(2026, 11, 21, 15),
         utc(2026, 11, 21, 16)),
    ],
)  # fmt: skip
def test_calendar_periods(kind: PeriodKind, now: datetime, start: datetime, end: datetime) -> None:
    assert period_of(kind, now) == Period(start, end)


def test_none_never_resets_and_other_timezones_are_converted() -> None:
    forever = period_of("none", utc(2026, 1, 1))
    assert forever == period_of("none", utc(2090, 6, 1))
    tokyo = timezone(timedelta(hours=9))
    # 08:30 on Dec 1 in Tokyo is still Nov 30 in UTC.
    assert period_of("month", datetime(2026, 12, 1, 8, 30, tzinfo=tokyo)).start == utc(2026, 11, 1)


def test_period_key_and_seconds_left() -> None:
    period = period_of("day", utc(2026, 11, 21, 12))
    assert period.key == "20261121T000000"
    assert period.seconds_left(utc(2026, 11, 21, 23, 59, 59, 1)) == 1  # rounded up
    assert period.seconds_left(utc(2026, 11, 22)) == 0


moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(anchor=moments, now=moments)
def test_billing_cycles_tile_time(anchor: datetime, now: datetime) -> None:
    period = period_of("billing_cycle", now, anchor)
    assert period.start <= now < period.end
    assert timedelta(days=28) <= period.end - period.start <= timedelta(days=31)
    following = period_of("billing_cycle", period.end, anchor)
    assert following.start == period.end  # no gap, no overlap
    assert period_of("billing_cycle", period.end - timedelta(microseconds=1), anchor) == period
    assert period.start.day == min(anchor.day, period.start.day) and (
        period.start.time() == anchor.time()
    )


FIVE_PER_S = RateLimit("per_second", rate=5, per_s=1, burst=10)


def test_gcra_burst_then_sustained_rate() -> None:
    tat, now = 0, 10 * US_PER_S
    remaining = []
    for _ in range(10):
        result = gcra(FIVE_PER_S, tat, now)
        assert result.allowed
        tat = result.tat_us
        remaining.append(result.remaining)
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    refused = gcra(FIVE_PER_S, tat, now)
    assert (refused.allowed, refused.tat_us, refused.retry_after_us) == (False, tat, 200_000)
    # Refused requests charge nothing: a client hammering while refused is not locked out.
    for _ in range(100):
        assert gcra(FIVE_PER_S, tat, now + 100_000).tat_us == tat
    assert gcra(FIVE_PER_S, tat, now + 199_999).allowed is False
    assert gcra(FIVE_PER_S, tat, now + 200_000).allowed is True
    # At the sustained rate, every request passes.
    for step in range(1, 50):
        result = gcra(FIVE_PER_S, tat, now + 200_000 * step)
        assert result.allowed
        tat = result.tat_us


def test_gcra_costs_and_reset() -> None:
    assert gcra(FIVE_PER_S, 0, 0, cost=10).allowed
    assert not gcra(FIVE_PER_S, 0, 0, cost=11).allowed  # more than the burst never passes
    result = gcra(FIVE_PER_S, 0, 0, cost=4)
    assert (result.remaining, result.reset_us) == (6, 800_000)
    assert RateLimit("slow", rate=1, per_s=60, burst=1).interval_us == 60 * US_PER_S


@given(
    rate=st.integers(1, 50),
    per_s=st.sampled_from([0.5, 1.0, 10.0, 60.0]),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 400_000), min_size=1, max_size=200),
)
def test_gcra_never_allows_more_than_burst_plus_rate(
    rate: int, per_s: float, burst: int, gaps: list[int]
) -> None:
    limit = RateLimit("x", rate=rate, per_s=per_s, burst=burst)
    tat, now, start, allowed = 0, 0, 0, 0
    for gap in gaps:
        now += gap
        result = gcra(limit, tat, now)
        if result.allowed:
            allowed += 1
            tat = result.tat_us
        else:
            assert result.retry_after_us > 0
    elapsed_us = now - start
    assert allowed <= burst + elapsed_us // limit.interval_us


def test_cached_periods_follow_the_clock_across_a_boundary() -> None:
    meters = {
        "calls": MeterConfig(type="counter", period="day"),
        "seats": MeterConfig(type="gauge"),
    }
    cache = PeriodsCache(meters, max_entries=2)
    noon = datetime(2026, 3, 1, 12, tzinfo=UTC)
    first = cache.around("calls", noon, None)
    assert first == meter_periods(meters["calls"], noon, None)
    assert cache.around("calls", noon.replace(hour=23), None) is first  # same day: kept
    next_day = cache.around("calls", datetime(2026, 3, 2, tzinfo=UTC), None)
    assert next_day[1].start == datetime(2026, 3, 2, tzinfo=UTC) and next_day[0] == first[1]
    assert cache.around("seats", noon, None) == ()
    anchor = datetime(2025, 1, 15, 6, tzinfo=UTC)  # another key: a full cache starts again
    assert cache.around("calls", noon, anchor) == meter_periods(meters["calls"], noon, anchor)
