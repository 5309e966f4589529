"""Exactness: four gateway processes on one Redis, a flood of concurrent requests.

Exactly the quota is forwarded, everything else is refused, and the Redis
counter holds exactly the quota; with a rate limit on the same route, neither
bucket is charged when the other refuses.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from gateway.auth.jwt import mint
from gateway.quota.periods import periods_around
from gateway.quota.redis_store import RedisStore
from tests.conftest import gateway_config
from tests.procs import GatewayProcess, write_config
from tests.servers import RedisCluster, RedisServer
from tests.upstream import Upstream

SECRET = "exactness-secret-" + "e" * 40
PROCESSES = 4
QUOTA = 1000
REQUESTS = 5000


def config(upstream: Upstream, redis_url: str, tmp_path: Path, plans: dict[str, Any]) -> Any:
    return gateway_config(
        upstream.url,
        storage={"counters": redis_url, "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
                 "timeout_ms": 2000},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "EXACT_JWT_SECRET"}},
        meters={"api_calls": {"type": "counter"}},
        plans=plans,
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                 "charge": {"api_calls": 1}}],
    )  # fmt: skip


async def flood(
    ports: list[int], count: int, tenants: tuple[str, ...] = ("acme",), concurrency: int = 200
) -> dict[str, dict[int, int]]:
    """`count` requests spread over the gateways and tenants: statuses per tenant."""
    headers = {
        tenant: {"Authorization": f"Bearer {mint(SECRET, 'HS256', ['org_id'], tenant, 600)}"}
        for tenant in tenants
    }
    statuses: dict[str, dict[int, int]] = {tenant: {} for tenant in tenants}
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one(i: int) -> None:
            tenant = tenants[i % len(tenants)]
            async with semaphore:
                url = f"http://127.0.0.1:{ports[i % len(ports)]}/v1/things"
                async with client.get(url, headers=headers[tenant]) as resp:
                    await resp.read()
                    seen = statuses[tenant]
                    seen[resp.status] = seen.get(resp.status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return statuses


async def counter(redis_url: str, tenant: str = "acme") -> int:
    store = await RedisStore.open(redis_url, 16, 2000)
    try:
        period = periods_around("billing_cycle", datetime.now(UTC))[1]
        return await store.level(tenant, "api_calls", period)
    finally:
        await store.close()


async def run(
    upstream: Upstream, redis_server: RedisServer, tmp_path: Path, plans: dict[str, Any]
) -> tuple[dict[int, int], int, float]:
    statuses, elapsed = await serve_flood(upstream, redis_server.url, tmp_path, plans, ("acme",))
    return statuses["acme"], await counter(redis_server.url), elapsed


async def serve_flood(
    upstream: Upstream,
    redis_url: str,
    tmp_path: Path,
    plans: dict[str, Any],
    tenants: tuple[str, ...],
) -> tuple[dict[str, dict[int, int]], float]:
    """Start the gateway processes on `redis_url`, flood them, stop them."""
    data = config(upstream, redis_url, tmp_path, plans)
    data["tenants"] = [{"id": tenant, "plan": "starter"} for tenant in tenants]
    path = write_config(tmp_path / "gateway.yaml", data)
    env = {"EXACT_JWT_SECRET": SECRET}
    # SQLite migrates itself; one process first so the others find the schema.
    first = await asyncio.to_thread(lambda: GatewayProcess(path, env).start())
    rest = await asyncio.gather(
        *(
            asyncio.to_thread(lambda: GatewayProcess(path, env).start())
            for _ in range(PROCESSES - 1)
        )
    )
    gateways = [first, *rest]
    try:
        started = time.perf_counter()
        statuses = await flood([g.port for g in gateways], REQUESTS, tenants)
        elapsed = time.perf_counter() - started
    finally:
        for g in gateways:
            g.stop()
    return statuses, elapsed


async def test_exactly_the_quota_is_served(
    upstream: Upstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    plans = {"starter": {"limits": {"api_calls": {"limit": QUOTA}}}}
    statuses, charged, elapsed = await run(upstream, redis_server, tmp_path, plans)
    print(f"\n{PROCESSES} processes, {REQUESTS} requests in {elapsed:.1f}s: {statuses}, "
          f"Redis counter {charged}")  # fmt: skip
    assert statuses == {200: QUOTA, 402: REQUESTS - QUOTA}
    assert len(upstream.seen) == QUOTA
    assert charged == QUOTA


async def test_a_rate_limit_and_a_quota_never_charge_for_each_other(
    upstream: Upstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The rate limit refuses most of the flood; the quota must count only the
    # requests that were served, and the rate limit only those.
    plans = {
        "starter": {
            "limits": {"api_calls": {"limit": QUOTA}},
            "rate_limits": [{"name": "per_second", "rate": 100, "per_s": 1, "burst": 300}],
        }
    }
    statuses, charged, elapsed = await run(upstream, redis_server, tmp_path, plans)
    print(f"\nwith a rate limit, {REQUESTS} requests in {elapsed:.1f}s: {statuses}, "
          f"Redis counter {charged}")  # fmt: skip
    served = statuses.get(200, 0)
    assert set(statuses) <= {200, 402, 429}
    assert served == len(upstream.seen) == charged
    assert served <= QUOTA
    assert statuses.get(429, 0) > 0


async def test_quota_refusals_do_not_spend_the_rate_limit(
    upstream: Upstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Only the 50 served requests may spend the burst of 300; were the
    # quota-refused ones charged to the rate limit too, 429s would appear.
    plans = {
        "starter": {
            "limits": {"api_calls": {"limit": 50}},
            "rate_limits": [{"name": "per_second", "rate": 1, "per_s": 60, "burst": 300}],
        }
    }
    statuses, charged, _ = await run(upstream, redis_server, tmp_path, plans)
    assert statuses == {200: 50, 402: REQUESTS - 50}
    assert charged == 50


async def test_exactness_holds_on_a_redis_cluster(
    upstream: Upstream, shared_redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    # Five tenants whose shards live on different nodes, one quota each.
    for node in shared_redis_cluster.nodes:
        client = aioredis.Redis.from_url(node.url)
        await client.flushall()
        await client.aclose()
    tenants = tuple(f"tenant-{i}" for i in range(5))
    quota = 400
    plans = {"starter": {"limits": {"api_calls": {"limit": quota}}}}
    statuses, elapsed = await serve_flood(
        upstream, shared_redis_cluster.url, tmp_path, plans, tenants
    )
    charged = {t: await counter(shared_redis_cluster.url, t) for t in tenants}
    nodes_used = 0
    for node in shared_redis_cluster.nodes:
        client = aioredis.Redis.from_url(node.url)
        nodes_used += bool(await client.dbsize())
        await client.aclose()
    print(f"\nRedis Cluster, {PROCESSES} processes, {REQUESTS} requests in {elapsed:.1f}s: "
          f"{statuses}, counters {charged}, keys on {nodes_used} of 3 nodes")  # fmt: skip
    per_tenant = REQUESTS // len(tenants)
    assert statuses == {t: {200: quota, 402: per_tenant - quota} for t in tenants}
    assert charged == dict.fromkeys(tenants, quota)
    assert len(upstream.seen) == quota * len(tenants)
    assert nodes_used >= 2
