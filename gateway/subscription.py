"""Whether a tenant's subscription status lets it be served: a pure rule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.clock import iso_utc
from gateway.config.models import SubscriptionConfig


@dataclass(frozen=True, slots=True)
class Standing:
    allowed: bool
    warning: str | None = None  # for X-Quota-Warning while in grace
    detail: str = ""  # why not, for the problem body


def standing(
    status: str, status_changed_at: datetime, now: datetime, config: SubscriptionConfig
) -> Standing:
    """Allowed, allowed in grace (with a warning), or refused (with the reason)."""
    if status in config.allow:
        return Standing(True)
    grace_s = config.grace.get(status)  # type: ignore[call-overload]
    if grace_s is None:
        return Standing(False, detail=f"the subscription is {status}")
    ends = status_changed_at + timedelta(seconds=grace_s)
    if now < ends:
        return Standing(True, warning=f"subscription {status}, grace ends {iso_utc(ends)}")
    return Standing(
        False, detail=f"the subscription is {status} and its grace period ended {iso_utc(ends)}"
    )
