"""Is this hour's usage unusual for this tenant? Judged against the tenant's own past.

The baseline is the same hour of the week in the previous weeks (and the hours
beside it) once the tenant has three weeks of history, else every hour of its
last week. Its median and median absolute deviation (MAD) are robust: a few
earlier spikes in the baseline move neither. An hour is anomalous when it is
above `median + k * spread` (the spread at least a tenth of the median and at
least 1, so that a flat history does not make every wobble an incident), at
least `min_ratio` times the median, and at least `min_quantity`: a tenant
moving from 2 calls to 4 is not an incident, one moving from 200 to 2,000 is.
A partial current hour is judged as it stands, never extrapolated: it can
only become anomalous, never stop being so within the hour.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

HOUR = timedelta(hours=1)
WEEK = timedelta(days=7)
SEASONAL_WEEKS = 3  # of history before the same hour of the week is the baseline
MIN_SAMPLES = 9  # fewer hours to compare with judge nothing
MIN_HISTORY = timedelta(days=1)  # nor does less than a day of history
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution, scaled to its standard deviation


@dataclass(frozen=True, slots=True)
class AnomalySettings:
    k: float = 6.0
    min_ratio: float = 3.0
    min_quantity: int = 100
    baseline_weeks: int = 4


@dataclass(frozen=True, slots=True)
class Verdict:
    anomalous: bool
    observed: int
    median: float
    threshold: float  # what `observed` had to exceed

    @property
    def ratio(self) -> float:
        return self.observed / self.median if self.median > 0 else float(self.observed)


def baseline(
    history: Mapping[datetime, int], first: datetime, hour: datetime, weeks: int
) -> list[int]:
    """The hours `hour` is compared with; `history` holds the hours with usage (others are
    0) since `first`, the tenant's first hour with any; nothing after `hour` counts."""
    if hour - first >= SEASONAL_WEEKS * WEEK:
        samples = []
        for week in range(1, weeks + 1):
            for shift in (-1, 0, 1):
                at = hour - week * WEEK + shift * HOUR
                if first <= at < hour:
                    samples.append(history.get(at, 0))
        return samples
    start = max(first, hour - WEEK)
    if hour - start < MIN_HISTORY:
        return []
    return [history.get(start + i * HOUR, 0) for i in range(int((hour - start) / HOUR))]


def judge(observed: int, samples: list[int], settings: AnomalySettings) -> Verdict | None:
    """None when there is too little history to judge."""
    if len(samples) < MIN_SAMPLES:
        return None
    median = statistics.median(samples)
    mad = statistics.median(abs(x - median) for x in samples)
    spread = max(MAD_TO_SIGMA * mad, 0.1 * median, 1.0)
    threshold = median + settings.k * spread
    anomalous = (
        observed > threshold
        and observed >= settings.min_quantity
        and observed >= settings.min_ratio * median
    )
    return Verdict(anomalous, observed, median, threshold)
