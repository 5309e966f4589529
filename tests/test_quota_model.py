"""The memory store, the Redis store and a plain model never disagree.

Hypothesis drives all three with random charges, refunds, gauge changes and
clock moves (a move to the next period). The model is written out here, not
taken from `rules.decide`, so that it checks the rules instead of repeating them.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.quota.memory import MemoryStore
from gateway.quota.periods import Period
from gateway.quota.redis_store import RedisStore
from gateway.quota.rules import MeterLimit
from gateway.quota.store import ChargeRequest, CounterStore, MeterCharge
from tests.conftest import whole
from tests.servers import RedisServer

METERS = {
    "calls": MeterLimit("calls", "counter", 5, hard=True),
    "overage": MeterLimit("overage", "counter", 3, hard=False),
    "members": MeterLimit("members", "gauge", 3, hard=True),
}


async def whole_redis(url: str) -> RedisStore:
    return await whole(await RedisStore.open(url, 16, 5000))


def stateful_test(server: RedisServer) -> type[RuleBasedStateMachine]:
    class Stores(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self._flush())
            self.stores: list[CounterStore] = [
                self.loop.run_until_complete(whole(MemoryStore())),
                self.loop.run_until_complete(whole_redis(server.url)),
            ]
            self.period_index = 0
            self.base = datetime.now(UTC)  # fixed: a period's key must not drift
            self.model: dict[tuple[str, int], int] = {}  # (meter, period or -1) -> level

        async def _flush(self) -> None:
            client = aioredis.Redis.from_url(server.url)
            await client.flushall()
            await client.aclose()

        def _periods(self) -> tuple[Period, ...]:
            # Every window contains the real now; the index makes each period
            # a different counter, which is what a move of the clock does.
            start = self.base - timedelta(days=1, seconds=self.period_index)
            current = Period(start, self.base + timedelta(days=1))
            return (current, current, current)

        def _slot(self, meter: str) -> tuple[str, int]:
            return (meter, -1 if METERS[meter].kind == "gauge" else self.period_index)

        def _run(self, coro_for: object) -> list[object]:
            async def both() -> list[object]:
                return [await coro_for(store) for store in self.stores]  # type: ignore[operator]

            return self.loop.run_until_complete(both())

        @rule(meter=st.sampled_from(sorted(METERS)), cost=st.integers(1, 3))
        def charge(self, meter: str, cost: int) -> None:
            limit = METERS[meter]
            periods = self._periods() if limit.kind == "counter" else ()
            request = ChargeRequest(
                "acme", uuid.uuid4().hex, (MeterCharge(limit, cost=cost, periods=periods),)
            )
            results = self._run(lambda store: store.check_and_charge(request))
            level = self.model.get(self._slot(meter), 0)
            allowed = not limit.hard or level + cost <= limit.limit
            if allowed:
                self.model[self._slot(meter)] = level + cost
            for result in results:
                decision = result.decision  # type: ignore[attr-defined]
                assert decision.allowed == allowed, (meter, cost, level)
                if allowed:
                    assert decision.used_after == {meter: level + cost}

        @rule(meter=st.sampled_from(sorted(METERS)), delta=st.integers(-3, 3))
        def adjust(self, meter: str, delta: int) -> None:
            period = self._periods()[1] if METERS[meter].kind == "counter" else None
            operation = uuid.uuid4().hex
            applied = self._run(
                lambda store: store.apply_once("acme", operation, [(meter, period, delta)])
            )
            assert applied == [True, True]
            self.model[self._slot(meter)] = self.model.get(self._slot(meter), 0) + delta

        @rule(value=st.integers(0, 4))
        def set_gauge(self, value: int) -> None:
            self._run(lambda store: store.set_level("acme", "members", None, value))
            self.model[self._slot("members")] = value

        @rule()
        def next_period(self) -> None:
            self.period_index += 1

        @invariant()
        def levels_agree(self) -> None:
            for meter, limit in METERS.items():
                period = self._periods()[1] if limit.kind == "counter" else None
                levels = self._run(lambda store, m=meter, p=period: store.level("acme", m, p))
                assert levels == [self.model.get(self._slot(meter), 0)] * 2, meter

        def teardown(self) -> None:
            for store in self.stores:
                self.loop.run_until_complete(store.close())
            self.loop.close()

    return Stores


def test_stores_and_model_agree(shared_redis_server: RedisServer) -> None:
    machine = stateful_test(shared_redis_server)
    machine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
