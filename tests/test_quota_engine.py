"""The quota engine's own lifetime (nothing it starts outlives it), its pending writes and
its compiled plans."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.models import GatewayConfig
from gateway.ledger.events import EventContext
from gateway.ledger.records import Credit, LimitOverride, Tenant
from gateway.metrics import QuotaMetrics
from gateway.quota import keyspace
from gateway.quota.engine import QuotaEngine, fresh_id
from gateway.quota.memory import MemoryStore
from gateway.quota.pending import PendingCharges
from gateway.quota.plan import ChargePlan
from gateway.quota.policy import RouteCharges
from gateway.quota.store import StoreLost
from tests.conftest import gateway_config, whole


def engine_config() -> GatewayConfig:
    return GatewayConfig.model_validate(
        gateway_config(
            "http://127.0.0.1:1",
            meters={"api_calls": {"type": "counter"}},
            plans={"starter": {"limits": {"api_calls": {"limit": 10}}}},
            routes=[
                {
                    "name": "api",
                    "match": {"path": "/**"},
                    "upstream": "app",
                    "charge": {"api_calls": 1},
                }
            ],
        )  # fmt: skip
    )


def engine_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("quota-"))


async def test_a_store_lost_after_close_starts_no_restore_that_outlives_the_engine() -> None:
    config = engine_config()
    restored: list[Sequence[int]] = []

    async def restorer(shards: Sequence[int]) -> None:
        restored.append(shards)

    engine = QuotaEngine(config, MemoryStore(), restorer)  # never restored: every shard lost
    await engine.close()
    # A request still in flight when the app stops meets the lost store.
    tenant = Tenant("acme", "starter", "active", datetime.now(UTC))
    request = engine.request(
        engine.policies_for(config),
        tenant,
        RouteCharges.compile(config.routes[0], config.meters),
        EventContext("api"),
    )
    assert request is not None
    with pytest.raises(StoreLost):
        await engine.check(request)
    engine.void(request)
    assert engine_tasks() == []
    assert restored == []


async def test_a_write_dropped_past_the_stores_memory_is_counted() -> None:
    now = [1000.0]
    registry = CollectorRegistry()
    metrics = QuotaMetrics(registry)
    pending = PendingCharges(clock=lambda: now[0], on_dropped=metrics.pending_dropped.inc)
    pending.add("op-1", "acme", [("api_calls", None, 1)], EventContext("api"))
    now[0] += keyspace.MEMO_TTL_MS / 1000 + 1  # the store no longer knows op-1
    await pending.flush(await whole(MemoryStore()))
    assert len(pending) == 0
    assert registry.get_sample_value("gateway_quota_pending_dropped_total") == 1.0


async def test_an_unexpected_restore_failure_is_retried_not_left_to_die(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dropped database raised an error the restore loop did not expect: the task
    # died with it (a traceback after the suite), and the shard stayed lost for good.
    monkeypatch.setattr("gateway.quota.engine.RETRY_PENDING_S", 0.01)
    store = MemoryStore()
    calls: list[Sequence[int]] = []

    async def restorer(shards: Sequence[int]) -> None:
        calls.append(shards)
        if len(calls) == 1:
            raise RuntimeError("database dropped")
        for shard in shards:
            await store.restore(shard, [])

    engine = QuotaEngine(engine_config(), store, restorer)
    try:
        await engine.prepare()
        assert len(calls) == 2 and await store.lost() == []
    finally:
        await engine.close()
    assert engine_tasks() == []


def test_a_plan_is_compiled_once_and_again_when_the_tenant_or_the_period_changes() -> None:
    config = engine_config()
    now = [datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)]
    engine = QuotaEngine(config, MemoryStore(), clock=lambda: now[0])
    policies = engine.policies_for(config)
    route = RouteCharges.compile(config.routes[0], config.meters)
    tenant = Tenant("acme", "starter", "active", now[0])

    def plan_of(who: Tenant) -> ChargePlan:
        request = engine.request(policies, who, route, EventContext("api"))
        assert request is not None and request.plan is not None
        return request.plan

    first = plan_of(tenant)
    assert plan_of(tenant) is first  # the same tenant in the same period
    # The directory loads a new Tenant when it changes: its override applies at once.
    override = replace(tenant, overrides={"api_calls": LimitOverride(50)})
    changed = plan_of(override)
    assert changed is not first and changed.meters[0].limit.limit == 50
    # A credit of the current period, on the tenant loaded with it.
    month = first.meters[0].periods[1]
    credit = Credit("api_calls", month.start, month.end, 5)
    assert plan_of(replace(tenant, credits=(credit,))).meters[0].credits == (0, 5, 0)
    # The month rolls over: the next request gets the next month's periods.
    now[0] += timedelta(seconds=1)
    rolled = plan_of(tenant)
    assert rolled is not first and rolled.meters[0].periods[1] == first.meters[0].periods[2]


def test_request_ids_are_fresh_in_every_process() -> None:
    ids = {fresh_id() for _ in range(1000)}  # across several draws from the OS
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()  # with ids of the parent's last draw still waiting in the list
    if pid == 0:
        os.write(write, fresh_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child != fresh_id()


def test_compiled_plans_are_bounded_oldest_out() -> None:
    base = engine_config()
    config = base.model_copy(
        update={"storage": base.storage.model_copy(update={"cache_entries": 2})}
    )
    engine = QuotaEngine(config, MemoryStore())
    policies = engine.policies_for(config)
    route = RouteCharges.compile(config.routes[0], config.meters)
    tenants = [Tenant(t, "starter", "active", datetime.now(UTC)) for t in ("a", "b", "c")]

    def plan_of(who: Tenant) -> ChargePlan | None:
        request = engine.request(policies, who, route, EventContext("api"))
        return request.plan if request is not None else None

    first = [plan_of(t) for t in tenants]
    assert plan_of(tenants[2]) is first[2] and plan_of(tenants[1]) is first[1]
    recompiled = plan_of(tenants[0])  # "a" went out when "c" came in
    assert recompiled is not None and recompiled is not first[0]
    assert plan_of(tenants[2]) is first[2]  # "b" made room this time
    assert plan_of(tenants[1]) is not first[1]
