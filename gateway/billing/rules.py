"""Pure rules of reporting usage to Stripe: identifiers, timestamps, windows, backoff.

Stripe dedupes a meter event's identifier for about a day and accepts
timestamps from 35 days back to 5 minutes ahead; its summaries aggregate
whole minutes. Every report of one period carries a timestamp inside that
period, so that Stripe invoices it in the same billing period as the ledger.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

STRIPE_PAST = timedelta(days=35)  # the oldest timestamp Stripe accepts
PAST_MARGIN = timedelta(hours=1)  # kept clear of that edge: a send may take a while
# Stripe remembers identifiers "at least 24 hours"; past this age a resend is
# only safe once its summaries show the event missing.
DEDUPE_TRUSTED = timedelta(hours=23)
MINUTE = timedelta(minutes=1)
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
V2_EVENTS_PER_REQUEST = 100  # the meter event stream's limit


def report_identifier(tenant: str, meter: str, period_start: datetime, seq: int) -> str:
    """The meter event identifier of one outbox row: the same on every resend."""
    key = f"{tenant}\x1f{meter}\x1f{period_start.isoformat()}\x1f{seq}"
    return "gw_" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _minute_ceil(moment: datetime) -> datetime:
    floor = moment.replace(second=0, microsecond=0)
    return floor if floor == moment else floor + MINUTE


def summary_window(period_start: datetime, period_end: datetime) -> tuple[datetime, datetime]:
    """The whole minutes inside a period: what Stripe's summaries can be asked about."""
    start = _minute_ceil(period_start)
    end = period_end.replace(second=0, microsecond=0)
    return start, max(start, end)


def event_time(period_start: datetime, period_end: datetime, now: datetime) -> datetime | None:
    """The timestamp to report a period's usage with at `now`, or None when Stripe would
    refuse every timestamp inside the period (it ended more than 35 days ago).

    `now` while the period runs; its last whole second (inside the summary
    window) once it has ended.
    """
    start, end = summary_window(period_start, period_end)
    last = end - timedelta(seconds=1) if end > start else period_start
    moment = max(start if end > start else period_start, min(now, last))
    if moment < now - STRIPE_PAST + PAST_MARGIN:
        return None
    return moment.replace(microsecond=0)


def sendable(event_at: datetime, now: datetime) -> bool:
    """Whether Stripe still accepts a timestamp (a row may wait long in the outbox)."""
    return event_at >= now - STRIPE_PAST + timedelta(minutes=5)


def backoff_s(attempts: int, jitter: float) -> float:
    """Seconds before the next try after `attempts` failures; `jitter` in [0, 1)."""
    base = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** max(0, attempts - 1))
    return base * (0.5 + jitter)


def dedupe_trusted(first_attempt_at: datetime | None, now: datetime) -> bool:
    """Whether a resend is still deduped by Stripe (or was never sent at all)."""
    return first_attempt_at is None or now - first_attempt_at < DEDUPE_TRUSTED
