"""The counter store contract: one atomic check-and-charge per request.

Both stores (memory, Redis) read the request's state, check every bucket and
charge all of them or none, by their own clock, and remember the answer per
request id so that a call retried after a timeout never charges twice. The
decision itself is always computed by `rules.decide`, from the state the
store read, so the stores cannot disagree about what a request is told.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.clock import to_us
from gateway.ledger.events import EventContext, UsageEvent
from gateway.quota.journal import EventJournal
from gateway.quota.periods import Period
from gateway.quota.plan import ChargePlan, RateLimits
from gateway.quota.plan import MeterCharge as MeterCharge  # part of the contract, with the plan
from gateway.quota.rules import Decision

Adjustment = tuple[str, Period | None, int]  # (meter, its period or None for a gauge, delta)


Level = tuple[str, str, Period | None, int]  # (tenant, meter, period or None, value)


class StoreUnavailable(Exception):
    """The counter store failed or was too slow; the failure policy decides."""


class StoreLost(StoreUnavailable):
    """A shard's counters are gone (Redis lost its data, or the process restarted):
    nothing is checked or charged there until `restore` rebuilt them from the ledger."""

    def __init__(self, shard: int) -> None:
        super().__init__(f"shard {shard} of the counter store lost its data; restoring it")
        self.shard = shard


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    tenant: str
    request_id: str
    meters: tuple[MeterCharge, ...] = ()
    rate_limits: RateLimits = ()
    context: EventContext = EventContext()  # carried by the usage events of its charges
    # The compiled form of (tenant, meters, rate_limits), from `ChargePlan.request`;
    # None: the store compiles one for this request alone (see `plan_of`).
    plan: ChargePlan | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ChargeResult:
    decision: Decision
    now_us: int  # the store's clock
    periods: dict[str, Period]  # the period charged, per counter meter (read only: shared)
    replayed: bool = False  # the answer to an earlier call with this request id


@dataclass(frozen=True, slots=True)
class StoreState:
    """What a store read for a request: the input of `evaluate`."""

    now_us: int
    chosen: tuple[int, ...]  # per meter, the index of its period (0 for gauges)
    used: tuple[int, ...]  # per meter, before charging
    tats: tuple[int, ...]  # per rate limit, before charging


def choose_period(periods: Sequence[Period], now_us: int) -> int:
    """The index of the period containing the store's `now_us` (the middle one if none)."""
    for i, period in enumerate(periods):
        if to_us(period.start) <= now_us < to_us(period.end):
            return i
    return len(periods) // 2


def plan_of(request: ChargeRequest) -> ChargePlan:
    """The request's compiled plan."""
    if request.plan is not None:
        return request.plan
    return ChargePlan(request.tenant, request.meters, request.rate_limits)


def evaluate(request: ChargeRequest, state: StoreState) -> ChargeResult:
    """The decision for `request` given the state a store read."""
    decision, periods = plan_of(request).decide(state.now_us, state.chosen, state.used, state.tats)
    return ChargeResult(decision, state.now_us, periods)


class Counters(Protocol):
    """Counters, gauges and rate-limit state: checked, charged and adjusted."""

    async def check_and_charge(self, request: ChargeRequest) -> ChargeResult:
        """Check every bucket; charge all of them or none (see module docstring), and
        record a usage event per charge in the same step."""
        ...

    async def void(self, request: ChargeRequest) -> None:
        """The caller gave up on `request` (it timed out and was refused): make sure it
        charges nothing, whether its check_and_charge ran already or runs later."""
        ...

    async def apply_once(
        self,
        tenant: str,
        operation_id: str,
        adjustments: Sequence[Adjustment],
        context: EventContext | None = None,
    ) -> bool:
        """Apply (meter, period, delta) adjustments unless `operation_id` already ran,
        recording a usage event per adjustment (none when `context` is None).

        Every write after the check goes through here: a call that timed out
        may still run on the store, and retrying it must not count twice. An
        operation id that a check_and_charge used counts as already run.
        """
        ...

    def forget(self, tenant: str, operation_id: str) -> None:
        """The caller has the answer of `operation_id`'s call and makes no other call under
        it: the memo kept for a retry whose answer was lost may go (Redis: with the
        store's next round). Never after a call that failed or timed out, whose memo a
        void or a spooled retry still needs; a memo not forgotten expires by itself."""
        ...

    async def level(self, tenant: str, meter: str, period: Period | None) -> int:
        """A counter's usage in `period`, or (period None) a gauge's level."""
        ...

    async def set_level(
        self,
        tenant: str,
        meter: str,
        period: Period | None,
        value: int,
        context: EventContext | None = None,
    ) -> None:
        """Set a gauge's level, or a counter's usage in `period` (admin: gauges, resets),
        recording the change as a usage event (none when `context` is None)."""
        ...


class IdempotencyRecords(Protocol):
    """`Idempotency-Key` records, kept beside the tenant's counters."""

    async def idempotency_begin(
        self, tenant: str, key_hash: str, fingerprint: str, in_flight_ms: int
    ) -> str | None:
        """Claim an Idempotency-Key. None: claimed, go ahead; otherwise the stored
        record ("P|<fingerprint>" while in flight, "D|<fingerprint>|<response>" once done)."""
        ...

    async def idempotency_finish(
        self, tenant: str, key_hash: str, record: str | None, ttl_ms: int
    ) -> None:
        """Store the final record, or (None) release the claim so a retry goes through."""
        ...


class ShardLifecycle(Protocol):
    """Which shards are whole, their rebuild from the ledger, and closing."""

    @property
    def shards(self) -> int:
        """How many shards tenants map to (`keys.shard_of`)."""
        ...

    async def lost(self) -> list[int]:
        """The shards whose counters are not known to be whole (never restored)."""
        ...

    async def restore(self, shard: int, levels: Sequence[Level]) -> None:
        """Set the shard's counters and gauges to `levels` (from the ledger), then mark
        it whole; until then its checks and writes raise StoreLost."""
        ...

    async def close(self) -> None: ...


class CounterStore(Counters, IdempotencyRecords, ShardLifecycle, Protocol):
    """A counter store in all its roles (the memory store, the Redis store)."""


@dataclass(frozen=True, slots=True)
class UsageSink:
    """Where an opened store's usage events wait until the ledger has them.

    `local` (the memory store): events this process writes into the ledger
    itself, also in `journal` on disk. `unrecorded` (a queue on another Redis):
    the events a restore must count that the ledger may not have yet.
    """

    local: list[UsageEvent] | None = None
    journal: EventJournal | None = None
    unrecorded: Callable[[Sequence[int]], Awaitable[list[str]]] | None = None


@dataclass(frozen=True, slots=True)
class OpenedStore:
    """A counter store and the sink of its usage events, wired by `quota.open`."""

    store: CounterStore
    sink: UsageSink
