"""CPU per request of the quota hot path, in process: `admit` and `Metering`.

The benchmark config of `bench.stack` (JWT HS256, tenants in the ledger, a
monthly quota and a rate limit in Redis, usage events), against a private
redis-server whose CPU is not counted. `concurrency` requests are in flight at
once, as wrk's connections are, so calls coalesce into pipelines as they do
under load. Prints CPU microseconds per request of each part measured, with the quota and
counter-store metrics on (as `gateway serve` has them) or, for what they cost,
off:

    python -m bench.metering [--requests N] [--concurrency C] [--rounds R] [--no-metrics]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench.stack import SECRET, SHARDS, TENANT_CLAIM, TOKEN_TTL_S, gateway_config
from gateway.auth.jwt import mint
from gateway.config import parse
from gateway.config.models import GatewayConfig
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.lifecycle import run_loop
from gateway.metrics import QuotaMetrics, StoreMetrics
from gateway.pipeline.admission import admit
from gateway.quota.engine import QuotaEngine
from gateway.quota.metering import Metering
from gateway.quota.policy import RouteCharges
from gateway.quota.redis_store import RedisStore
from gateway.services import Auth, Services
from tests.servers import RedisServer

TENANTS = [f"tenant-{i:05d}" for i in range(1000)]


def _config(redis_url: str, ledger_url: str) -> GatewayConfig:
    data = gateway_config(1, redis_url, ledger_url, TENANTS)
    return parse(data, "bench")


async def _timed(requests: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """CPU microseconds per call of `one`, `concurrency` calls in flight at once."""
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            await one(i)

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) * 1e6 / requests


async def _main(requests: int, concurrency: int, rounds: int, metrics: bool) -> None:
    redis = RedisServer(appendonly=False).start()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-metering-"))
    os.environ["BENCH_JWT_SECRET"] = SECRET
    try:
        config = _config(redis.url, f"sqlite:///{tmp / 'ledger.db'}")
        services = await Services.open(config)
        auth = await Auth.open(config.auth, services.directory)
        registry = CollectorRegistry()
        store = await RedisStore.open(
            redis.url, SHARDS, config.storage.timeout_ms,
            metrics=StoreMetrics(registry) if metrics else None,
        )  # fmt: skip
        for shard in await store.lost():
            await store.restore(shard, [])
        engine = QuotaEngine(config, store, metrics=QuotaMetrics(registry) if metrics else None)
        route = RouteCharges.compile(config.routes[0], config.meters)
        policies = engine.policies_for(config)
        headers = [
            {"Authorization": "Bearer " + mint(SECRET, "HS256", [TENANT_CLAIM], t, TOKEN_TTL_S)}
            for t in TENANTS
        ]
        tenants: list[Tenant] = []
        for h in headers:  # warm the caches, as a running gateway has them
            tenants.append((await admit(h, auth.authenticator, services, config)).tenant)

        async def admission(i: int) -> None:
            await admit(headers[i % len(headers)], auth.authenticator, services, config)

        async def metering(i: int) -> None:
            context = EventContext("api", "GET", f"rid-{i}")
            meter = Metering(engine, policies, tenants[i % len(tenants)], route, context)
            await meter.check()
            await meter.finish(200, {})

        async def both(i: int) -> None:
            admitted = await admit(headers[i % len(headers)], auth.authenticator, services, config)
            context = EventContext("api", "GET", f"rid-{i}")
            meter = Metering(engine, policies, admitted.tenant, route, context)
            await meter.check()
            await meter.finish(200, {})

        parts = {"admit": admission, "metering": metering, "admit+metering": both}
        figures: dict[str, list[float]] = {name: [] for name in parts}
        await _timed(requests // 4, concurrency, both)  # warm up
        for _ in range(rounds):
            for name, one in parts.items():
                figures[name].append(await _timed(requests, concurrency, one))
        for name, values in figures.items():
            print(
                f"{name:>16}: {statistics.median(values):7.1f} us/request CPU "
                f"(min {min(values):.1f}, max {max(values):.1f}, {rounds} rounds)"
            )
        await engine.close()
        await auth.close()
        await services.close()
    finally:
        redis.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-metrics", action="store_true", help="without the quota metrics")
    args = parser.parse_args()
    run_loop(_main(args.requests, args.concurrency, args.rounds, not args.no_metrics))


if __name__ == "__main__":
    main()
