"""`memory://`: the counter store inside one process (the embedded default)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from gateway.clock import to_us
from gateway.ledger.events import EventContext, UsageEvent, adjustment_kind
from gateway.quota import keyspace
from gateway.quota.gcra import released
from gateway.quota.journal import EventJournal
from gateway.quota.periods import Period
from gateway.quota.store import (
    Adjustment,
    ChargeRequest,
    ChargeResult,
    Level,
    StoreLost,
    StoreState,
    StoreUnavailable,
    choose_period,
    evaluate,
)

# One shard: the hash tags only matter to Redis, the layout stays the same.
_SHARDS = 1


def _meter_key(tenant: str, meter: str, period: Period | None) -> str:
    if period is None:
        return keyspace.gauge_key(tenant, _SHARDS, meter)
    return keyspace.counter_key(tenant, _SHARDS, meter, period.key)


class MemoryStore:
    """Counters in a dict. Nothing awaits between reading and writing, so each
    check-and-charge is atomic within the event loop, as the Lua script is in Redis."""

    def __init__(
        self,
        clock_us: Callable[[], int] | None = None,
        record: bool = True,
        journal: EventJournal | None = None,
    ) -> None:
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self._record = record
        # The in-process usage queue: appended in the same step as the charge,
        # drained into the ledger by the recorder (gateway/usage/recorder.py).
        self.events: list[UsageEvent] = []
        # Where each event also goes at once, so a killed process loses none of them.
        self.journal = journal
        # A new process starts with nothing: whole only once restored from the ledger.
        self._whole = False
        self._values: dict[str, int] = {}
        # request id -> (expiry in us, its first answer, or "applied"/"void" markers)
        self._memo: dict[str, tuple[int, ChargeResult | str]] = {}
        self._records: dict[str, tuple[int, str]] = {}  # Idempotency-Key records, expiry in us

    @property
    def shards(self) -> int:
        return _SHARDS

    async def lost(self) -> list[int]:
        return [] if self._whole else [0]

    async def restore(self, shard: int, levels: Sequence[Level]) -> None:
        for tenant, meter, period, value in levels:
            self._values[_meter_key(tenant, meter, period)] = value
        self._whole = True

    def _check_whole(self) -> None:
        if not self._whole:
            raise StoreLost(0)

    async def check_and_charge(self, request: ChargeRequest) -> ChargeResult:
        self._check_whole()
        now_us = self._clock_us()
        memo_key = keyspace.memo_key(request.tenant, _SHARDS, request.request_id)
        remembered = self._memo.get(memo_key)
        if remembered is not None and remembered[0] > now_us:
            first = remembered[1]
            if isinstance(first, str):
                raise StoreUnavailable(
                    f"request {request.request_id} was already settled otherwise"
                )
            return ChargeResult(first.decision, first.now_us, first.periods, True)
        chosen = tuple(choose_period(m.periods, now_us) if m.periods else 0 for m in request.meters)
        meter_keys = [
            _meter_key(request.tenant, m.limit.meter, m.periods[i] if m.periods else None)
            for m, i in zip(request.meters, chosen, strict=True)
        ]
        rate_keys = [
            keyspace.rate_key(request.tenant, _SHARDS, limit.name, scope)
            for limit, scope in request.rate_limits
        ]
        state = StoreState(
            now_us,
            chosen,
            tuple(self._values.get(k, 0) for k in meter_keys),
            tuple(self._values.get(k, 0) for k in rate_keys),
        )
        result = evaluate(request, state)
        decision = result.decision
        if decision.allowed:
            for meter, key, i in zip(request.meters, meter_keys, chosen, strict=True):
                if meter.cost > 0:
                    self._values[key] = decision.used_after[meter.limit.meter]
                    period = meter.periods[i] if meter.periods else None
                    kind = "charge" if period else "gauge"
                    self._event(request.tenant, request.context, request.request_id,
                                meter.limit.meter, meter.cost, now_us, period, kind)  # fmt: skip
            for (limit, _), key in zip(request.rate_limits, rate_keys, strict=True):
                self._values[key] = decision.tats_after[limit.name]
        self._memo[memo_key] = (now_us + keyspace.MEMO_TTL_MS * 1000, result)
        self._expire_memos(now_us)
        return result

    def _expire_memos(self, now_us: int) -> None:
        # Oldest first: the dict is in insertion order, which is expiry order.
        while self._memo:
            first = next(iter(self._memo))
            if self._memo[first][0] > now_us:
                break
            del self._memo[first]

    def forget(self, tenant: str, operation_id: str) -> None:
        self._memo.pop(keyspace.memo_key(tenant, _SHARDS, operation_id), None)

    async def void(self, request: ChargeRequest) -> None:
        self._check_whole()
        now_us = self._clock_us()
        memo_key = keyspace.memo_key(request.tenant, _SHARDS, request.request_id)
        remembered = self._memo.get(memo_key)
        first = remembered[1] if remembered is not None and remembered[0] > now_us else None
        if isinstance(first, ChargeResult) and first.decision.allowed:
            self._undo(request, first, now_us)
        if not isinstance(first, str):
            # Refused or not run yet, the id is settled all the same: nothing may
            # charge under it later, a spooled charge (apply_once) included.
            self._memo[memo_key] = (now_us + keyspace.MEMO_TTL_MS * 1000, "void")

    def _undo(self, request: ChargeRequest, first: ChargeResult, now_us: int) -> None:
        """Take back what `first`, the voided request's answer, charged."""
        for meter in request.meters:
            if meter.cost > 0:
                period = first.periods.get(meter.limit.meter)
                key = _meter_key(request.tenant, meter.limit.meter, period)
                self._values[key] = self._values.get(key, 0) - meter.cost
                self._event(request.tenant, request.context, request.request_id,
                            meter.limit.meter, -meter.cost, now_us, period, "void",
                            suffix=":void")  # fmt: skip
        for limit, scope in request.rate_limits:
            key = keyspace.rate_key(request.tenant, _SHARDS, limit.name, scope)
            if key in self._values:
                charged = first.decision.tats_after[limit.name]
                self._values[key] = released(limit, self._values[key], charged, now_us)

    async def apply_once(
        self,
        tenant: str,
        operation_id: str,
        adjustments: Sequence[Adjustment],
        context: EventContext | None = None,
    ) -> bool:
        self._check_whole()
        now_us = self._clock_us()
        memo_key = keyspace.memo_key(tenant, _SHARDS, operation_id)
        remembered = self._memo.get(memo_key)
        if remembered is not None and remembered[0] > now_us:
            first = remembered[1]
            # A check that ran and was refused charged nothing: apply then.
            if not (isinstance(first, ChargeResult) and not first.decision.allowed):
                return False
        for meter, period, delta in adjustments:
            key = _meter_key(tenant, meter, period)
            self._values[key] = self._values.get(key, 0) + delta
            if context is not None and delta:
                kind = adjustment_kind(period is None, delta, operation_id)
                self._event(tenant, context, operation_id, meter, delta, now_us, period, kind)
        self._memo[memo_key] = (now_us + keyspace.MEMO_TTL_MS * 1000, "applied")
        return True

    def _event(
        self,
        tenant: str,
        context: EventContext,
        operation_id: str,
        meter: str,
        quantity: int,
        now_us: int,
        period: Period | None,
        kind: str,
        suffix: str = "",
    ) -> None:
        if not self._record:
            return
        event = UsageEvent(
            f"{operation_id}:{meter}{suffix}", tenant, meter, quantity, now_us,
            to_us(period.start) if period else 0, kind, context.route, context.method,
            context.status, context.request_id,
        )  # fmt: skip
        self.events.append(event)
        if self.journal is not None:
            self.journal.append((event.encode(),))

    async def level(self, tenant: str, meter: str, period: Period | None) -> int:
        return self._values.get(_meter_key(tenant, meter, period), 0)

    async def set_level(
        self,
        tenant: str,
        meter: str,
        period: Period | None,
        value: int,
        context: EventContext | None = None,
    ) -> None:
        self._check_whole()
        key = _meter_key(tenant, meter, period)
        previous = self._values.get(key, 0)
        self._values[key] = value
        if context is not None and value != previous:
            kind = "gauge" if period is None else "reset"
            self._event(tenant, context, uuid.uuid4().hex, meter, value - previous,
                        self._clock_us(), period, kind)  # fmt: skip

    async def idempotency_begin(
        self, tenant: str, key_hash: str, fingerprint: str, in_flight_ms: int
    ) -> str | None:
        key = keyspace.idempotency_key(tenant, _SHARDS, key_hash)
        now_us = self._clock_us()
        held = self._records.get(key)
        if held is not None and held[0] > now_us:
            return held[1]
        self._records[key] = (now_us + in_flight_ms * 1000, f"P|{fingerprint}")
        return None

    async def idempotency_finish(
        self, tenant: str, key_hash: str, record: str | None, ttl_ms: int
    ) -> None:
        key = keyspace.idempotency_key(tenant, _SHARDS, key_hash)
        if record is None:
            self._records.pop(key, None)
        else:
            self._records[key] = (self._clock_us() + ttl_ms * 1000, record)

    async def close(self) -> None:
        return None
