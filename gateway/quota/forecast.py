"""Where a meter is heading: its usage at the period's end and when it runs out, at the
rate of its recent past (the last 24 hours of the period, from the ledger's hourly rollups).

A steady consumer is forecast exactly; a bursty one is forecast at its
average, which is what a team deciding whether to call the customer wants.
Less than an hour of the period observed forecasts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.clock import iso_utc
from gateway.quota.periods import Period
from gateway.quota.rules import MeterLimit

WINDOW = timedelta(hours=24)
MIN_OBSERVED = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Forecast:
    rate_per_hour: float
    projected: int  # usage at the period's end at this rate
    exhausts_at: datetime | None  # when the limit is reached, if inside the period

    def view(self) -> dict[str, object]:
        """The usage view's `forecast` field."""
        return {
            "rate_per_hour": round(self.rate_per_hour, 3),
            "projected_at_period_end": self.projected,
            "exhausts_at": iso_utc(self.exhausts_at) if self.exhausts_at else None,
        }


def window(period: Period, now: datetime) -> tuple[datetime, datetime]:
    """The span whose rollups give the rate: whole hours, inside the period, up to now."""
    since = max(period.start, now - WINDOW).replace(minute=0, second=0, microsecond=0)
    return since, now


def forecast(
    used: int,
    limit: MeterLimit,
    period: Period,
    now: datetime,
    hours: Sequence[tuple[datetime, int]],
) -> Forecast | None:
    """At the rate of `hours` (hour, quantity: the rollups inside `window`, oldest first);
    `limit` already credited. The rate is taken from the first hour with usage on: a
    tenant that began an hour ago is not averaged over a day."""
    since, _ = window(period, now)
    if hours:
        since = max(since, hours[0][0])
    observed_s = (now - since).total_seconds()
    if observed_s < MIN_OBSERVED.total_seconds() or now >= period.end:
        return None
    rate_per_s = max(0, sum(q for _, q in hours)) / observed_s
    left_s = (period.end - now).total_seconds()
    exhausts_at = None
    if not limit.unlimited and rate_per_s > 0 and used < limit.limit:
        at = now + timedelta(seconds=(limit.limit - used) / rate_per_s)
        if at < period.end:
            exhausts_at = at
    return Forecast(rate_per_s * 3600, used + round(rate_per_s * left_s), exhausts_at)
