"""Time: the wall clock as one injectable function, its units, and month arithmetic.

Everything that reads the time takes a `Clock` (default `utc_now`), so a test
passes a fixed one instead of sleeping. The counter stores keep their own clock
(Redis `TIME`) for decisions; this is the gateway's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

US_PER_S = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The wall clock, aware and in UTC."""
    return datetime.now(UTC)


def from_us(us: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime (exact, no float)."""
    return datetime.fromtimestamp(us // US_PER_S, UTC).replace(microsecond=us % US_PER_S)


def to_us(moment: datetime) -> int:
    """An aware datetime as whole microseconds since the epoch (exact, no float)."""
    return int(moment.timestamp()) * US_PER_S + moment.microsecond


def iso_utc(moment: datetime) -> str:
    """`2026-11-24T00:00:00Z`: the form used in headers and problem bodies."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_months(year: int, month: int, months: int) -> tuple[int, int]:
    """The (year, month) `months` after (or before) (year, month)."""
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def month_start(moment: datetime) -> datetime:
    """The first of `moment`'s month, 00:00 UTC."""
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def months_after(start: datetime, months: int) -> datetime:
    """The first of the month `months` after (or before) the month of `start`."""
    year, month = add_months(start.year, start.month, months)
    return month_start(start).replace(year=year, month=month)
