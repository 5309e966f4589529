"""Rate limits by GCRA (the generic cell rate algorithm), in integer microseconds.

A limit of `rate` requests per `per_s` seconds with a `burst` spaces requests
by an emission interval T = per_s / rate and lets up to `burst` arrive at
once. The whole state is one number, the theoretical arrival time (TAT): a
request of cost n is allowed when max(TAT, now) + n*T - now <= burst*T.
Integers keep the memory store and the Lua script bit-for-bit equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.clock import US_PER_S


@dataclass(frozen=True, slots=True)
class RateLimit:
    name: str
    rate: int
    per_s: float
    burst: int

    @property
    def interval_us(self) -> int:
        """T: microseconds between requests at the sustained rate (at least 1)."""
        return max(1, round(self.per_s * US_PER_S / self.rate))

    @property
    def window_s(self) -> int:
        """The policy window advertised in `RateLimit-Policy` (w=): the time a full
        burst takes to refill, ceil(burst * per_s / rate) (DESIGN 6a), so that a client
        pacing by q per w never sends faster than the limit allows."""
        # Rounded to the microsecond first, so that 20 * 0.1 / 2 is 1, not 2.
        return max(1, -(-round(self.burst * self.per_s * US_PER_S / self.rate) // US_PER_S))


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    tat_us: int  # the state to store when allowed (unchanged when refused)
    remaining: int  # requests that could still arrive at once
    retry_after_us: int  # 0 when allowed
    reset_us: int  # until the bucket is empty again


def gcra(limit: RateLimit, tat_us: int, now_us: int, cost: int = 1) -> GcraResult:
    """Check, and when allowed charge, `cost` requests at `now_us`."""
    interval = limit.interval_us
    capacity = limit.burst * interval
    base = max(tat_us, now_us)
    new_tat = base + cost * interval
    used = new_tat - now_us
    if used > capacity:
        # Refused: nothing is charged, so refused traffic never locks a tenant out.
        retry = used - capacity
        return GcraResult(
            False, tat_us, _remaining(base - now_us, capacity, interval), retry, base - now_us
        )
    return GcraResult(True, new_tat, _remaining(used, capacity, interval), 0, used)


def _remaining(used_us: int, capacity_us: int, interval_us: int) -> int:
    return max(0, (capacity_us - used_us) // interval_us)


def released(limit: RateLimit, tat_us: int, charged_tat_us: int, now_us: int, cost: int = 1) -> int:
    """The TAT once a voided charge of `cost`, which set the TAT to `charged_tat_us`, is undone."""
    if charged_tat_us <= now_us:
        # Its slot has drained: a later request may have started from now rather
        # than from it, and moving the TAT back would hand that request a free slot.
        return tat_us
    return tat_us - cost * limit.interval_us
