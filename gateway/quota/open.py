"""Choosing and opening the counter store a config names."""

from __future__ import annotations

from gateway.config.models import GatewayConfig
from gateway.quota.journal import EventJournal
from gateway.quota.memory import MemoryStore
from gateway.quota.queue import EventQueue
from gateway.quota.redis_client import redis_client
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import CounterStore


def needs_quota(config: GatewayConfig) -> bool:
    """Whether any route charges or any plan rate-limits."""
    return any(route.charge for route in config.routes) or any(
        plan.rate_limits for plan in config.plans.values()
    )


async def open_store(config: GatewayConfig, record: bool = True) -> CounterStore:
    """`memory://` or `redis://` from `storage.counters`; `record`: keep usage events,
    in a queue of their own where `storage.queue` names another Redis."""
    storage = config.storage
    if storage.counters.startswith("memory:"):
        return MemoryStore(record=record)
    queue = None
    if record and storage.separate_queue is not None:
        client = await redis_client(storage.separate_queue, storage.redis_cluster)
        spool_dir = config.usage.spool_dir
        journal = EventJournal(spool_dir) if spool_dir is not None else None
        queue = EventQueue(client, storage.shards, storage.timeout_ms / 1000, journal)
        if spool_dir is not None:
            queue.adopt(spool_dir)
    return await RedisStore.open(
        storage.counters, storage.shards, storage.timeout_ms, storage.redis_cluster, record,
        queue,
    )  # fmt: skip
