"""The usage console with many tenants: how long a page of the tenants table takes.

Seeds N tenants (100,000 by default) into a private PostgreSQL ledger, with this
month's usage for a tenth of them, in front of a private Redis, starts one
gateway process in this one, logs in, and times each page kind R times
(median, p95, in ms): the first page, a page deep in the list, a plan filter,
a text search, a tenant's page, and the state filter (which reads the counters
of every tenant with usage). Usage: python -m bench.console [--tenants N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from datetime import UTC, datetime

import aiohttp
from prometheus_client import CollectorRegistry

from gateway.config.loader import parse
from gateway.ledger import Ledger
from gateway.server import Gateway
from tests.servers import PostgresServer, RedisServer
from tests.upstream import start_upstream

TOKEN = "console-bench-admin-token-" + "b" * 20


async def seed(dsn: str, tenants: int) -> None:
    ledger = await Ledger.open(dsn)
    try:
        await ledger.migrate()
        now = datetime.now(UTC)
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        rows = [
            (f"t{i:06d}", f"Tenant {i}", "pro" if i % 3 else "free", "active", now, None,
             f"cus_{i:06d}", None, False, None, now, now)
            for i in range(tenants)
        ]  # fmt: skip
        usage = [(f"t{i:06d}", "api_calls", month, i % 1200, 1) for i in range(0, tenants, 10)]
        async with ledger.db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO tenants (id, name, plan, status, status_changed_at, "
                "billing_anchor, stripe_customer, stripe_subscription, disabled, overrides, "
                "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                "$11, $12)",
                rows,
            )
            await tx.executemany(
                "INSERT INTO usage_totals (tenant_id, meter, period_start, quantity, events) "
                "VALUES ($1, $2, $3, $4, $5)",
                usage,
            )
        # As autovacuum would soon after such a load: the planner's row counts.
        await ledger.db.execute("ANALYZE")
    finally:
        await ledger.close()


async def timed(client: aiohttp.ClientSession, url: str, rounds: int) -> tuple[float, float]:
    took = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with client.get(url) as r:
            await r.read()
            assert r.status == 200, (url, r.status)
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.95))]


async def main(tenants: int, rounds: int) -> None:
    os.environ["GATEWAY_ADMIN_TOKEN"] = TOKEN
    redis, postgres = RedisServer().start(), PostgresServer().start()
    upstream = await start_upstream()
    try:
        started = time.perf_counter()
        await seed(postgres.dsn, tenants)
        print(f"seeded {tenants:,} tenants in {time.perf_counter() - started:.1f} s")
        config = parse(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0},
                "storage": {"counters": redis.url, "ledger": postgres.dsn},
                "auth": {"api_keys": {"enabled": True}},
                "logging": {"access_log": False},
                "upstreams": {"app": {"url": upstream.url}},
                "meters": {"api_calls": {"type": "counter", "period": "month"}},
                "plans": {
                    "free": {"limits": {"api_calls": {"limit": 100, "warn_at": [0.8]}}},
                    "pro": {"limits": {"api_calls": {"limit": 1000, "warn_at": [0.8]}}},
                },
                "routes": [
                    {
                        "name": "api",
                        "match": {"path": "/**"},
                        "upstream": "app",
                        "charge": {"api_calls": 1},
                    }
                ],
            },  # fmt: skip
            "bench.yaml",
        )
        gateway = Gateway(config, CollectorRegistry())
        await gateway.start()
        try:
            base = f"http://127.0.0.1:{gateway.admin_port}/console"
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as client:
                async with client.post(f"{base}/login", data={"token": TOKEN}) as r:
                    assert r.status == 200, r.status
                pages = {
                    "first page": f"{base}/tenants",
                    f"page {tenants // 100:,} of {tenants // 50:,}": (
                        f"{base}/tenants?page={tenants // 100}"
                    ),
                    "plan filter": f"{base}/tenants?plan=free&page=10",
                    "text search": f"{base}/tenants?q=t0999",
                    "sorted by customer, descending": f"{base}/tenants?sort=stripe_customer&desc=1",
                    "a tenant's page": f"{base}/tenants/t000010",
                    "state filter (exhausted)": f"{base}/tenants?state=exhausted",
                }
                print(f"{'page':<34} {'median ms':>10} {'p95 ms':>8}")
                for name, url in pages.items():
                    median, p95 = await timed(client, url, rounds)
                    print(f"{name:<34} {median:>10.1f} {p95:>8.1f}")
        finally:
            await gateway.stop()
    finally:
        await upstream.close()
        redis.close()
        postgres.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.tenants, args.rounds))
