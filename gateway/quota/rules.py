"""The quota decision for one request: a pure function of state, costs and `now`.

Every meter and rate limit of the request is checked first and charged only
if all of them allow it: a request refused by one bucket charges none, and a
refused request charges nothing at all. Stores (memory, the Redis script)
implement exactly these rules; this module is their specification.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from gateway.clock import US_PER_S
from gateway.config.types import UNLIMITED
from gateway.quota.gcra import RateLimit, gcra
from gateway.quota.periods import Period

MeterKind = Literal["counter", "gauge"]
State = Literal["ok", "warning", "exhausted", "overage"]


@dataclass(frozen=True, slots=True)
class MeterLimit:
    """One meter's limit in a tenant's plan."""

    meter: str
    kind: MeterKind
    limit: int  # UNLIMITED (-1) for none
    hard: bool = True
    warn_at: tuple[float, ...] = ()

    @property
    def unlimited(self) -> bool:
        return self.limit == UNLIMITED


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 402 quota, 429 rate limit
    name: str  # the meter or the rate limit
    limit: int
    used: int
    retry_after_s: int
    reset_at: datetime | None = None  # the period's end, for quotas


@dataclass(frozen=True, slots=True)
class Decision:
    refusal: Refusal | None
    used_after: dict[str, int] = field(default_factory=dict)  # meter -> usage after charging
    tats_after: dict[str, int] = field(default_factory=dict)  # rate limit -> new TAT (us)
    warnings: tuple[str, ...] = ()
    policy: str = ""  # RateLimit-Policy
    ratelimit: str = ""  # RateLimit

    @property
    def allowed(self) -> bool:
        return self.refusal is None


def credited(limit: MeterLimit, credit: int) -> MeterLimit:
    """`limit` raised by a credit; an unlimited meter stays unlimited."""
    if limit.unlimited or not credit:
        return limit
    return replace(limit, limit=limit.limit + credit)


def _reached(used: int, threshold: float, limit: int) -> bool:
    # In basis points and integers, so that every store agrees at the boundary.
    return used * 10_000 >= round(threshold * 10_000) * limit


def meter_state(limit: MeterLimit, used: int) -> State:
    """The usage view's state of a meter at `used`."""
    if limit.unlimited:
        return "ok"
    if limit.hard and used >= limit.limit:
        return "exhausted"
    if not limit.hard and used > limit.limit:
        return "overage"
    if any(_reached(used, t, limit.limit) for t in limit.warn_at):
        return "warning"
    return "ok"


def warning(limit: MeterLimit, before: int, after: int) -> str | None:
    """`X-Quota-Warning` for a charge that leaves usage past a threshold or in overage."""
    if limit.unlimited or limit.limit == 0 or after <= before:
        return None
    percent = after * 100 // limit.limit
    if after > limit.limit:
        return f"{limit.meter} {percent}% (overage)"
    if any(_reached(after, t, limit.limit) for t in limit.warn_at):
        return f"{limit.meter} {percent}%"
    return None


def warned_meter(text: str) -> tuple[str, str]:
    """The meter an `X-Quota-Warning` (from `warning`) is about, and `overage` or `warned`."""
    meter, _, rest = text.partition(" ")
    return meter, "overage" if rest.endswith("(overage)") else "warned"


def _seconds(us: int) -> int:
    return max(0, -(-us // US_PER_S))


def decide(
    limits: Sequence[MeterLimit],
    periods: Mapping[str, Period],
    used: Mapping[str, int],
    costs: Mapping[str, int],
    rate_limits: Sequence[RateLimit],
    tats: Mapping[str, int],
    now: datetime,
    now_us: int,
    *,
    needs_remaining: frozenset[str] = frozenset(),
    rate_cost: int = 1,
) -> Decision:
    """Check every bucket, then charge all of them or none.

    `costs` are the positive charges checked before forwarding (negative gauge
    deltas are applied after the response, not here); `needs_remaining` names
    meters charged from the response, which only need something left now.
    `periods` gives each counter meter's current period.
    """
    by_meter = {limit.meter: limit for limit in limits}
    used_after = dict(used)
    refusal: Refusal | None = None
    for meter in sorted({*costs, *needs_remaining}):
        limit = by_meter.get(meter)
        cost = costs.get(meter, 0)
        current = used.get(meter, 0)
        used_after[meter] = current + cost
        if limit is None or limit.unlimited or not limit.hard or refusal is not None:
            continue
        over = current + cost > limit.limit if cost > 0 else current >= limit.limit
        if over:
            period = periods.get(meter)
            refusal = Refusal(
                402, meter, limit.limit, current,
                period.seconds_left(now) if period else 0, period.end if period else None,
            )  # fmt: skip
    new_tats: dict[str, int] = {}
    limited: Refusal | None = None
    for rate_limit in rate_limits:
        result = gcra(rate_limit, tats.get(rate_limit.name, 0), now_us, rate_cost)
        if result.allowed:
            new_tats[rate_limit.name] = result.tat_us
        elif limited is None or _seconds(result.retry_after_us) > limited.retry_after_s:
            limited = Refusal(
                429, rate_limit.name, rate_limit.rate, rate_limit.burst - result.remaining,
                _seconds(result.retry_after_us),
            )  # fmt: skip
    # A used-up quota wins over a rate limit: waiting a second would not help.
    refusal = refusal or limited
    if refusal is not None:
        # Nothing was charged: the field shows what remains, the refusing policy at 0.
        return Decision(
            refusal,
            policy=policy_field(limits, periods, rate_limits),
            ratelimit=ratelimit_field(
                limits, periods, used, rate_limits, tats, now, now_us, refusal
            ),
        )
    warnings = tuple(
        w
        for limit in limits
        if (w := warning(limit, used.get(limit.meter, 0), used_after.get(limit.meter, 0)))
    )
    return Decision(
        None,
        used_after=used_after,
        tats_after=new_tats,
        warnings=warnings,
        policy=policy_field(limits, periods, rate_limits),
        ratelimit=ratelimit_field(limits, periods, used_after, rate_limits, new_tats, now, now_us),
    )


def advertised(
    limits: Sequence[MeterLimit], periods: Mapping[str, Period]
) -> list[tuple[MeterLimit, Period]]:
    """Hard, limited counters with a period: the quotas the RateLimit fields describe."""
    return [
        (limit, period)
        for limit in limits
        if limit.hard and not limit.unlimited and limit.kind == "counter"
        and (period := periods.get(limit.meter)) is not None
    ]  # fmt: skip


def policy_field(
    limits: Sequence[MeterLimit], periods: Mapping[str, Period], rate_limits: Sequence[RateLimit]
) -> str:
    """`RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): hard quotas and rate limits."""
    items = [
        f'"{limit.meter}";q={limit.limit};w={int((p.end - p.start).total_seconds())}'
        for limit, p in advertised(limits, periods)
    ]
    items += [f'"{r.name}";q={r.burst};w={r.window_s}' for r in rate_limits]
    return ", ".join(items)


def ratelimit_field(
    limits: Sequence[MeterLimit],
    periods: Mapping[str, Period],
    used: Mapping[str, int],
    rate_limits: Sequence[RateLimit],
    tats: Mapping[str, int],
    now: datetime,
    now_us: int,
    refused: Refusal | None = None,
) -> str:
    """`RateLimit`: what remains of each advertised policy, and when it resets; the
    policy that `refused` the request at r=0 until it may pass (DESIGN 6a)."""
    quota = refused.name if refused is not None and refused.status == 402 else None
    items = []
    for limit, p in advertised(limits, periods):
        left = 0 if limit.meter == quota else max(0, limit.limit - used.get(limit.meter, 0))
        items.append(f'"{limit.meter}";r={left};t={p.seconds_left(now)}')
    for rate_limit in rate_limits:
        if refused is not None and refused.status == 429 and rate_limit.name == refused.name:
            items.append(f'"{rate_limit.name}";r=0;t={refused.retry_after_s}')
            continue
        probe = gcra(rate_limit, tats.get(rate_limit.name, now_us), now_us, 0)
        items.append(f'"{rate_limit.name}";r={probe.remaining};t={_seconds(probe.reset_us)}')
    return ", ".join(items)
