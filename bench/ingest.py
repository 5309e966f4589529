"""Usage worker ingest: events per second from the Redis shard streams into PostgreSQL.

Starts a private Redis and a private PostgreSQL, appends N events spread over
tenants and the 16 shard streams (as the gateway's script does), then runs
one `Worker` until every event is in the ledger, and prints events per second
(median of the rounds). A second pass over the same events measures the
duplicate path (a full redelivery). Usage: python -m bench.ingest [--events N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.clock import to_us
from gateway.ledger import Ledger
from gateway.ledger.events import UsageEvent
from gateway.ledger.usage_ledger import UsageLedger
from gateway.metrics import WorkerMetrics
from gateway.quota import keyspace
from gateway.usage.streams import UsageStreams
from gateway.usage.worker import Settings, Worker
from tests.servers import PostgresServer, RedisServer

SHARDS = 16
TENANTS = 1000


async def fill(client: aioredis.Redis, count: int) -> None:
    """Append `count` events, 10,000 per pipeline."""
    now_us = to_us(datetime.now(UTC))
    period_us = to_us(datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    for start in range(0, count, 10_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + 10_000)):
            tenant = f"tenant-{i % TENANTS}"
            event = UsageEvent(
                f"{uuid.uuid4().hex}:api_calls", tenant, "api_calls", 1, now_us + i,
                period_us, "charge", "api", "GET", 0, uuid.uuid4().hex,
            )  # fmt: skip
            pipe.xadd(
                keyspace.shard_stream(keyspace.shard_of(tenant, SHARDS)), {"e": event.encode()}
            )
        await pipe.execute()


def worker(client: aioredis.Redis, ledger: Ledger, group: str) -> Worker:
    """A worker of its own consumer group, which therefore reads every entry."""
    streams = UsageStreams(client, SHARDS, "bench", group=group)
    settings = Settings(housekeeping_s=3600)
    return Worker(streams, UsageLedger(ledger.db), WorkerMetrics(CollectorRegistry()), settings)


async def drain(worker: Worker, expected: int) -> float:
    """Seconds until the running worker has handled `expected` entries."""
    started = time.perf_counter()
    task = asyncio.create_task(worker.run())
    metrics = worker.metrics
    while (
        metrics.written.inserted._value.get() + metrics.written.duplicates._value.get() < expected
    ):
        if task.done():
            raise RuntimeError("the worker stopped early") from task.exception()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    worker.stop()
    await task
    return elapsed


async def one_round(redis_url: str, dsn: str, count: int, group: str) -> tuple[float, float]:
    client = aioredis.Redis.from_url(redis_url)
    ledger = await Ledger.open(dsn)
    try:
        await client.flushall()
        await ledger.db.execute("TRUNCATE usage_events, usage_totals, usage_hourly")
        await fill(client, count)
        fresh_worker, again_worker = (
            worker(client, ledger, group),
            worker(client, ledger, group + "-again"),
        )
        # Both groups exist before the first worker runs: its housekeeping (due at
        # its start) trims only what every group has read, so the second reads it all.
        for each in (fresh_worker, again_worker):
            await each.streams.ensure_groups()
        fresh = await drain(fresh_worker, count)
        total = await ledger.db.fetchval("SELECT sum(quantity) FROM usage_totals")
        assert int(total) == count, (total, count)
        # The same entries again, as after a crash before XACK: all duplicates.
        duplicate = await drain(again_worker, count)
        assert int(await ledger.db.fetchval("SELECT sum(quantity) FROM usage_totals")) == count
        return count / fresh, count / duplicate
    finally:
        await client.aclose()
        await ledger.close()


async def main(count: int, rounds: int) -> None:
    redis_server = RedisServer(appendonly=False).start()
    postgres = PostgresServer().start()
    try:
        ledger = await Ledger.open(postgres.dsn)
        await ledger.migrate()
        await ledger.close()
        results = [
            await one_round(redis_server.url, postgres.dsn, count, f"g{i}") for i in range(rounds)
        ]
    finally:
        redis_server.close()
        postgres.close()
        PostgresServer.remove_template()
    fresh = statistics.median(r[0] for r in results)
    dup = statistics.median(r[1] for r in results)
    print(f"worker ingest, {count:,} events over {SHARDS} shards and {TENANTS} tenants, "
          f"median of {rounds}:")  # fmt: skip
    print(f"  new events:        {fresh:>9,.0f} events/s")
    print(f"  redelivered (dup): {dup:>9,.0f} events/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
