"""What a charge tells about its tenant: a threshold crossed, a quota used up, overage begun.

Decided from the counter store's atomic answer: usage only grows by charges,
and each charge sees the usage before and after it, so exactly one charge
sees a given threshold crossed in a period. A refund can bring usage back
below it and a later charge cross it again; the signal's id, made from what it
is about, lets the ledger keep only the first (see `store.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.clock import from_us, iso_utc, to_us
from gateway.quota.periods import Period
from gateway.quota.plan import MeterCharge
from gateway.quota.rules import credited
from gateway.quota.store import ChargeRequest, ChargeResult

THRESHOLD_CROSSED = "quota.threshold_crossed"
EXHAUSTED = "quota.exhausted"
OVERAGE_STARTED = "quota.overage_started"
EXHAUSTION_FORECAST = "quota.exhaustion_forecast"
ANOMALY = "usage.anomaly"


@dataclass(frozen=True, slots=True)
class Signal:
    """Something the SaaS team wants to hear about one tenant, once."""

    type: str
    tenant: str
    meter: str  # "" for a signal about the tenant itself (its subscription)
    period: Period | None  # None for a gauge, which has no period
    used: int
    limit: int | None  # None where no limit is involved (an anomaly)
    at_us: int  # the counter store's clock when the charge was made
    threshold: float | None = None  # for THRESHOLD_CROSSED: the `warn_at` fraction
    details: tuple[tuple[str, object], ...] = ()  # more of `data`, by type

    @property
    def key(self) -> str:
        """What makes two signals the same one."""
        start = to_us(self.period.start) if self.period is not None else 0
        points = round(self.threshold * 10_000) if self.threshold is not None else ""
        return f"{self.type}\x1f{self.tenant}\x1f{self.meter}\x1f{start}\x1f{points}"

    @property
    def id(self) -> str:
        """Stable across processes and retries: the `webhook-id` of its notifications."""
        return "sig_" + hashlib.blake2b(self.key.encode(), digest_size=12).hexdigest()

    def payload(self) -> str:
        """The notification body, in the Standard Webhooks shape `{type, timestamp, data}`."""
        data: dict[str, object] = {"tenant": self.tenant}
        if self.meter:  # not for a tenant's own signals (its subscription)
            data["meter"] = self.meter
            data["used"] = self.used
            data["period_start"] = iso_utc(self.period.start) if self.period else None
            data["period_end"] = iso_utc(self.period.end) if self.period else None
        if self.limit is not None:
            data["limit"] = self.limit
        if self.threshold is not None:
            data["threshold"] = self.threshold
        data.update(self.details)
        return json.dumps(
            {"type": self.type, "timestamp": iso_utc(from_us(self.at_us)), "data": data},
            separators=(",", ":"),
        )


def _reached(used: int, threshold: float, limit: int) -> bool:
    # As rules._reached: basis points and integers, the same boundary as the warning header.
    return used * 10_000 >= round(threshold * 10_000) * limit


def crossings(request: ChargeRequest, result: ChargeResult) -> Iterator[Signal]:
    """The signals an allowed charge gives rise to (usually none)."""
    used_after = result.decision.used_after
    for meter in request.meters:
        if meter.cost <= 0 or meter.limit.unlimited:
            continue
        name = meter.limit.meter
        after = used_after.get(name)
        if after is None:
            continue
        period = result.periods.get(name)
        limit = _credited_limit(meter, period)
        if limit <= 0:
            continue
        before = after - meter.cost
        yield from _crossed(request.tenant, meter, period, limit, before, after, result.now_us)


def _credited_limit(meter: MeterCharge, period: Period | None) -> int:
    if not meter.credits or period is None or period not in meter.periods:
        return meter.limit.limit
    return credited(meter.limit, meter.credits[meter.periods.index(period)]).limit


def _crossed(
    tenant: str,
    meter: MeterCharge,
    period: Period | None,
    limit: int,
    before: int,
    after: int,
    now_us: int,
) -> Iterator[Signal]:
    spec = meter.limit
    for threshold in spec.warn_at:
        if _reached(after, threshold, limit) and not _reached(before, threshold, limit):
            yield Signal(
                THRESHOLD_CROSSED, tenant, spec.meter, period, after, limit, now_us, threshold
            )
    if spec.hard and before < limit <= after:
        yield Signal(EXHAUSTED, tenant, spec.meter, period, after, limit, now_us)
    if not spec.hard and before <= limit < after:
        yield Signal(OVERAGE_STARTED, tenant, spec.meter, period, after, limit, now_us)
