"""Cold tenant lookups: what a process starting with empty caches asks the ledger.

A private PostgreSQL holds `--tenants` × `--rounds` tenants; each round looks
up `--tenants` of them, none seen before, through a new `Directory`,
`--concurrency` lookups at a time (as requests of as many connections would),
and prints lookups per second and CPU microseconds per lookup of this process
and of PostgreSQL (the postmaster and its backends):

    python -m bench.lookups [--tenants N] [--concurrency C] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from bench.measure import cpu_s
from gateway.directory import Directory
from gateway.ledger.records import Tenant
from gateway.ledger.store import Ledger
from gateway.lifecycle import run_loop
from tests.servers import PostgresServer

SEED_CONCURRENCY = 50


async def _round(ledger: Ledger, ids: list[str], concurrency: int, postgres: int) -> str:
    directory = Directory(ledger, ttl_s=3600)
    todo = iter(ids)

    async def worker() -> None:
        for tenant_id in todo:
            if await directory.tenant(tenant_id) is None:
                raise RuntimeError(f"tenant {tenant_id} not found")

    own, theirs, wall = time.process_time(), cpu_s(postgres), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    own, theirs = time.process_time() - own, cpu_s(postgres) - theirs
    wall = time.perf_counter() - wall
    await directory.close()
    n = len(ids)
    return (
        f"{n:,} cold lookups, {concurrency} at a time: {n / wall:,.0f}/s, "
        f"{own * 1e6 / n:,.0f} µs of this process's CPU and {theirs * 1e6 / n:,.0f} µs of "
        "PostgreSQL's per lookup"
    )


async def _main(tenants: int, concurrency: int, rounds: int) -> None:
    server = PostgresServer().start()
    try:
        ledger = await Ledger.open(server.dsn)
        await ledger.migrate()
        now = datetime.now(UTC)
        ids = [f"tenant-{i:07d}" for i in range(tenants * rounds)]
        for start in range(0, len(ids), SEED_CONCURRENCY):
            await asyncio.gather(
                *(
                    ledger.create_tenant_if_missing(Tenant(tenant_id, "pro", "active", now))
                    for tenant_id in ids[start : start + SEED_CONCURRENCY]
                )
            )
        assert server.proc is not None, "started"
        for r in range(rounds):
            chunk = ids[r * tenants : (r + 1) * tenants]
            print(await _round(ledger, chunk, concurrency, server.proc.pid))
        await ledger.close()
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=5000, help="looked up per round")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run_loop(_main(args.tenants, args.concurrency, args.rounds))


if __name__ == "__main__":
    main()
