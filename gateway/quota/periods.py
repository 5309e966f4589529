"""Quota periods: pure functions of (kind, anchor, now).

A `billing_cycle` period runs from the tenant's billing anchor, an exact
instant, to the same day and time of the next month. An anchor on the 29th,
30th or 31st falls on the last day of a shorter month, and comes back to its
own day in the months that have it (Jan 31 -> Feb 28 -> Mar 31), as Stripe
bills. Periods are half-open: [start, end).
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal

from gateway.clock import EPOCH, add_months
from gateway.config.models import MeterConfig

PeriodKind = Literal["billing_cycle", "month", "day", "hour", "none"]
DEFAULT_ANCHOR = datetime(2000, 1, 1, tzinfo=UTC)  # the 1st of the month, 00:00 UTC
# `none` never resets: one period from the epoch to the end of representable time.
_FOREVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Period:
    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        """A stable name for the period (part of counter keys and ledger rows)."""
        return _key(self.start)

    def seconds_left(self, now: datetime) -> int:
        """Whole seconds to the end, rounded up (for Retry-After)."""
        return ceil_seconds((self.end - now).total_seconds())


def ceil_seconds(left_s: float) -> int:
    """Seconds left, rounded up to whole seconds; 0 once past."""
    return max(0, int(-(-left_s // 1)))


def _cycle_start(anchor: datetime, year: int, month: int) -> datetime:
    """The anchor's day and time in (year, month), clamped to the month's last day."""
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def billing_cycle(anchor: datetime, now: datetime) -> Period:
    """The billing period of an anchor that contains `now`."""
    anchor = anchor.astimezone(UTC)
    start = _cycle_start(anchor, now.year, now.month)
    if start > now:
        start = _cycle_start(anchor, *add_months(now.year, now.month, -1))
    end = _cycle_start(anchor, *add_months(start.year, start.month, 1))
    return Period(start, end)


def periods_around(
    kind: PeriodKind, now: datetime, anchor: datetime | None = None
) -> tuple[Period, Period, Period]:
    """The previous, current and next periods by the caller's clock.

    A counter store decides by its own clock which of them a charge falls in,
    so a gateway whose clock is a little off at a boundary still charges the
    period the store's clock says it is.
    """
    current = period_of(kind, now, anchor)
    if kind == "none":
        return current, current, current
    previous = period_of(kind, current.start - timedelta(microseconds=1), anchor)
    return previous, current, period_of(kind, current.end, anchor)


def period_of(kind: PeriodKind, now: datetime, anchor: datetime | None = None) -> Period:
    """The period of `kind` containing `now` (aware, any timezone; computed in UTC)."""
    now = now.astimezone(UTC)
    if kind == "billing_cycle":
        return billing_cycle(anchor or DEFAULT_ANCHOR, now)
    if kind == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = add_months(start.year, start.month, 1)
        return Period(start, start.replace(year=year, month=month))
    if kind == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Period(start, start + timedelta(days=1))
    if kind == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return Period(start, start + timedelta(hours=1))
    return Period(EPOCH, _FOREVER)


def meter_periods(meter: MeterConfig, now: datetime, anchor: datetime | None) -> tuple[Period, ...]:
    """A meter's previous, current and next periods around `now`; () for a gauge."""
    if meter.type == "gauge":
        return ()
    return periods_around(meter.period or "billing_cycle", now, anchor)


def meter_period(meter: MeterConfig, now: datetime, anchor: datetime | None) -> Period | None:
    """A meter's period containing `now`; None for a gauge (a level has no period)."""
    if meter.type == "gauge":
        return None
    return period_of(meter.period or "billing_cycle", now, anchor)


@lru_cache(maxsize=4096)
def _key(start: datetime) -> str:
    # strftime is slow, and a counter's key is built on every request.
    return start.strftime("%Y%m%dT%H%M%S")


class PeriodsCache:
    """`meter_periods` remembered per meter and anchor while the current period lasts.

    Periods change once a month, day or hour, yet every request needs them;
    computing them (calendar arithmetic, three periods) cost more than the rest
    of building a charge. Bounded: cleared when it holds `max_entries`.
    """

    def __init__(self, meters: Mapping[str, MeterConfig], max_entries: int = 100_000) -> None:
        self._meters = meters
        self._max_entries = max_entries
        self._cache: dict[tuple[str, datetime | None], tuple[Period, ...]] = {}

    def around(self, meter: str, now: datetime, anchor: datetime | None) -> tuple[Period, ...]:
        """The meter's previous, current and next periods around `now`; () for a gauge."""
        key = (meter, anchor)
        periods = self._cache.get(key)
        if periods is not None and (not periods or periods[1].start <= now < periods[1].end):
            return periods
        periods = meter_periods(self._meters[meter], now, anchor)
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        self._cache[key] = periods
        return periods
