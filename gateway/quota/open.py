"""Choosing, opening and wiring the counter store a config names."""

from __future__ import annotations

from pathlib import Path

from gateway.config.models import GatewayConfig
from gateway.metrics import StoreMetrics
from gateway.quota.journal import EventJournal
from gateway.quota.memory import MemoryStore
from gateway.quota.queue import EventQueue
from gateway.quota.redis_client import redis_client
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import OpenedStore, UsageSink


def needs_quota(config: GatewayConfig) -> bool:
    """Whether any route charges or any plan rate-limits."""
    return any(route.charge for route in config.routes) or any(
        plan.rate_limits for plan in config.plans.values()
    )


async def open_store(
    config: GatewayConfig,
    record: bool = True,
    journal_dir: Path | None = None,
    metrics: StoreMetrics | None = None,
) -> OpenedStore:
    """`memory://` or `redis://` from `storage.counters`, with its usage sink.

    `record`: keep usage events (False: there is no ledger to write them to, nor to
    restore from). The memory store journals them under `journal_dir`; the Redis
    store appends them to its shards' streams, or to a queue of their own where
    `storage.queue` names another Redis.
    """
    storage = config.storage
    if storage.embedded:
        journal = EventJournal(journal_dir) if record and journal_dir is not None else None
        memory = MemoryStore(record=record, journal=journal)
        if not record:
            await memory.restore(0, [])  # no ledger: nothing to restore from
        return OpenedStore(
            memory, UsageSink(local=memory.events if record else None, journal=journal)
        )
    queue = None
    if record and storage.separate_queue is not None:
        client = await redis_client(storage.separate_queue, storage.redis_cluster)
        spool_dir = config.usage.spool_dir
        queue_journal = EventJournal(spool_dir) if spool_dir is not None else None
        timeout_s = storage.timeout_ms / 1000
        queue = EventQueue(client, storage.shards, timeout_s, queue_journal, metrics)
        if spool_dir is not None:
            queue.adopt(spool_dir)
    store = await RedisStore.open(
        storage.counters, storage.shards, storage.timeout_ms, storage.redis_cluster, record,
        queue, metrics,
    )  # fmt: skip
    return OpenedStore(store, UsageSink(unrecorded=queue.unrecorded if queue is not None else None))
