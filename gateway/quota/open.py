"""Choosing and opening the counter store a config names."""

from __future__ import annotations

from gateway.config.models import GatewayConfig, StorageConfig
from gateway.quota.memory import MemoryStore
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import CounterStore


def needs_quota(config: GatewayConfig) -> bool:
    """Whether any route charges or any plan rate-limits."""
    return any(route.charge for route in config.routes) or any(
        plan.rate_limits for plan in config.plans.values()
    )


async def open_store(storage: StorageConfig, record: bool = True) -> CounterStore:
    """`memory://` or `redis://` from `storage.counters`; `record`: keep usage events."""
    if storage.counters.startswith("memory:"):
        return MemoryStore(record=record)
    return await RedisStore.open(
        storage.counters, storage.shards, storage.timeout_ms, storage.redis_cluster, record
    )
