"""A counter store that lost its data is rebuilt from the ledger: no fresh quota."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.auth.jwt import mint
from gateway.ledger.usage_ledger import UsageLedger
from tests.conftest import MakeGateway, PgLedger
from tests.servers import RedisServer
from tests.test_quota_gateway import SECRET, admin, call, quota_config
from tests.test_usage_recording import ledger_totals, worker_for
from tests.upstream import Upstream
from tests.waiting import eventually


async def burst(port: int, count: int, concurrency: int = 50) -> dict[int, int]:
    token = mint(SECRET, "HS256", ["org_id"], "acme", 600)
    statuses: dict[int, int] = {}
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as client:

        async def one() -> None:
            async with semaphore:
                async with client.get(
                    f"http://127.0.0.1:{port}/v1/things",
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


async def until_refused(port: int, deadline_s: float = 20.0) -> dict[int, int]:
    """Bursts of 100 until one is refused with 402: the counters' restore takes
    its own time (answered 503 meanwhile), so one burst may end before it."""
    statuses: dict[int, int] = {}
    stop = time.monotonic() + deadline_s
    while 402 not in statuses and time.monotonic() < stop:
        for status, count in (await burst(port, 100)).items():
            statuses[status] = statuses.get(status, 0) + count
    return statuses


async def test_redis_losing_its_data_hands_out_no_fresh_quota(
    upstream: Upstream,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    pg_ledger: PgLedger,
) -> None:
    dsn, ledger = pg_ledger
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    config = quota_config(
        upstream, tmp_path, counters=redis_server.url, ledger=dsn, timeout_ms=2000
    )
    config["plans"]["starter"]["limits"]["api_calls"]["limit"] = 1000
    gw = await make_gateway(config)
    client = aioredis.Redis.from_url(redis_server.url)
    worker = worker_for(client, ledger, "w1")
    task = asyncio.create_task(worker.run())
    try:
        assert await burst(gw.port, 900) == {200: 900}
        usage = UsageLedger(ledger.db)

        async def ingested() -> bool:
            return (await ledger_totals(usage))["api_calls"] == 900

        await eventually(ingested)
        await client.flushall()  # Redis loses everything: counters, streams, epochs
        started = time.perf_counter()
        statuses = await until_refused(gw.port)
        elapsed = time.perf_counter() - started
        print(f"\nafter FLUSHALL at 900 of 1000: {statuses} in {elapsed:.2f}s")
        assert statuses.get(200) == 100
        assert 402 in statuses
        assert set(statuses) <= {200, 402, 503}  # 503: the moment the restore took
        await eventually(lambda: _is(ledger_totals(usage), 1000))
    finally:
        worker.stop()
        await task
        await client.aclose()


async def test_with_the_queue_on_another_redis_a_restore_counts_what_it_still_holds(
    upstream: Upstream,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    shared_redis_server: RedisServer,
    pg_ledger: PgLedger,
) -> None:
    dsn, ledger = pg_ledger
    queue_url = shared_redis_server.url[:-1] + "3"
    queue = aioredis.Redis.from_url(queue_url)
    await queue.flushdb()
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    config = quota_config(upstream, tmp_path, counters=redis_server.url, queue=queue_url,
                          ledger=dsn, timeout_ms=2000)  # fmt: skip
    config["plans"]["starter"]["limits"]["api_calls"]["limit"] = 1000
    gw = await make_gateway(config)
    counters = aioredis.Redis.from_url(redis_server.url)
    usage = UsageLedger(ledger.db)
    try:
        worker = worker_for(queue, ledger, "w1")
        task = asyncio.create_task(worker.run())
        assert await burst(gw.port, 900) == {200: 900}
        await eventually(lambda: _is(ledger_totals(usage), 900))
        worker.stop()
        await task
        # 50 more that only the queue holds when the counters go.
        assert await burst(gw.port, 50) == {200: 50}
        assert await counters.keys("q:*:usage") == []  # the events are not on this Redis
        await counters.flushall()
        statuses = await until_refused(gw.port)
        print(f"\nafter FLUSHALL of the counters at 950 of 1000 (50 only in the queue): "
              f"{statuses}")  # fmt: skip
        assert statuses.get(200) == 50
        assert 402 in statuses
        assert set(statuses) <= {200, 402, 503}
        worker = worker_for(queue, ledger, "w1")
        task = asyncio.create_task(worker.run())
        await eventually(lambda: _is(ledger_totals(usage), 1000))
        worker.stop()
        await task
    finally:
        await counters.aclose()
        await queue.aclose()


async def _is(totals: object, api_calls: int) -> bool:
    assert asyncio.iscoroutine(totals)
    return bool((await totals)["api_calls"] == api_calls)


async def test_a_restarted_embedded_gateway_keeps_the_usage(
    upstream: Upstream, tmp_path: Path, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    config = quota_config(upstream, tmp_path)  # memory:// counters, SQLite ledger
    first = await make_gateway(config)
    assert [(await call(first, "acme"))[0] for _ in range(4)] == [200] * 4
    await first.stop()  # drains the usage queue into SQLite
    second = await make_gateway(config)
    assert [(await call(second, "acme"))[0] for _ in range(3)] == [200, 200, 402]


async def test_admin_resets_and_gauge_levels_survive_a_restore(
    upstream: Upstream, tmp_path: Path, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "quota-admin")
    config = quota_config(upstream, tmp_path)
    first = await make_gateway(config)
    assert [(await call(first, "acme"))[0] for _ in range(5)] == [200] * 5
    assert (await admin(first, "POST", "/admin/tenants/acme/meters/api_calls/reset"))[0] == 200
    assert (await admin(first, "PUT", "/admin/tenants/acme/gauges/team_members", {"value": 2}))[
        0
    ] == 200
    await first.stop()
    second = await make_gateway(config)  # restored from the ledger, reset included
    _, view = await admin(second, "GET", "/admin/tenants/acme/usage")
    assert view["meters"]["api_calls"]["used"] == view["meters"]["api_calls"]["recorded"] == 0
    assert view["meters"]["team_members"]["used"] == 2
    assert (await call(second, "acme", "POST", "/v1/members"))[0] == 402  # 2 of 2 members
