"""Usage events from served traffic into the ledger: embedded, and through the worker."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.clock import EPOCH
from gateway.config import parse
from gateway.ledger import Ledger
from gateway.ledger.events import decode
from gateway.ledger.usage_ledger import UsageLedger
from gateway.metrics import WorkerMetrics
from gateway.quota import keyspace
from gateway.quota.periods import period_of
from gateway.server import Gateway
from gateway.usage.streams import UsageStreams
from gateway.usage.worker import Settings, Worker
from gateway.worker_process import run_reconcile
from tests.conftest import MakeGateway, PgLedger
from tests.servers import RedisServer
from tests.test_quota_gateway import SECRET, admin, call, quota_config
from tests.upstream import Upstream
from tests.waiting import eventually

SHARDS = 16
# (method, path, status): what `traffic` does and the answers it expects.
TRAFFIC = [
    ("GET", "/v1/things", 200),
    ("GET", "/v1/things", 200),
    ("GET", "/v1/respond/x?status=503", 503),  # charged, then refunded
    ("GET", "/v1/respond/x?status=503", 503),
    ("POST", "/v1/members", 200),
    ("POST", "/v1/members", 200),
    ("DELETE", "/v1/respond/7", 200),  # team_members -1 after success
    ("POST", "/v1/respond/complete?tokens=60", 200),
    ("GET", "/v1/things", 402),  # api_calls used up: no event
]
EXPECTED = {"api_calls": 6, "team_members": 1, "tokens": 60}
EXPECTED_EVENTS = {"charge": 8, "refund": 2, "gauge": 3, "response": 1}


async def traffic(gw: Gateway) -> None:
    for method, path, status in TRAFFIC:
        assert (await call(gw, "acme", method, path))[0] == status, (method, path)


async def ledger_totals(usage: UsageLedger) -> dict[str, int]:
    period = period_of("billing_cycle", datetime.now(UTC), None).start
    return {
        "api_calls": await usage.total("acme", "api_calls", period),
        "team_members": await usage.total("acme", "team_members", EPOCH),
        "tokens": await usage.total("acme", "tokens", period),
    }


async def event_kinds(ledger: Ledger) -> dict[str, int]:
    rows = await ledger.db.fetch("SELECT kind, count(*) AS n FROM usage_events GROUP BY kind")
    return {row["kind"]: int(row["n"]) for row in rows}


async def test_the_embedded_gateway_writes_its_usage_into_the_ledger(
    upstream: Upstream, tmp_path: Path, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "quota-admin")
    gw = await make_gateway(quota_config(upstream, tmp_path))
    await traffic(gw)

    async def recorded() -> bool:
        _, view = await admin(gw, "GET", "/admin/tenants/acme/usage")
        return all(view["meters"][m]["recorded"] == EXPECTED[m] for m in EXPECTED)

    await eventually(recorded)  # within a flush interval or so
    _, view = await admin(gw, "GET", "/admin/tenants/acme/usage")
    assert {m: view["meters"][m]["used"] for m in EXPECTED} == EXPECTED
    status, history = await admin(gw, "GET", "/admin/tenants/acme/usage/api_calls/hourly")
    assert status == 200 and sum(h["quantity"] for h in history["hours"]) == 6
    bad = await admin(gw, "GET", "/admin/tenants/acme/usage/api_calls/hourly?since=yesterday")
    assert bad[0] == 400
    await gw.stop()
    ledger = await Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert await ledger_totals(UsageLedger(ledger.db)) == EXPECTED
        assert await event_kinds(ledger) == EXPECTED_EVENTS
    finally:
        await ledger.close()


def worker_for(client: aioredis.Redis, ledger: Ledger, name: str, **settings: Any) -> Worker:
    streams = UsageStreams(client, SHARDS, name)
    return Worker(streams, UsageLedger(ledger.db), WorkerMetrics(CollectorRegistry()),
                  Settings(idle_sleep_s=0.01, **settings))  # fmt: skip


async def test_the_worker_moves_redis_usage_into_postgres_once(
    upstream: Upstream,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    pg_ledger: PgLedger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn, ledger = pg_ledger
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    config = quota_config(upstream, tmp_path, counters=redis_server.url, ledger=dsn)
    gw = await make_gateway(config)
    client = aioredis.Redis.from_url(redis_server.url)
    # A worker that dies after reading (and, for half of it, after writing) but
    # before acknowledging: its entries stay pending.
    dead = worker_for(client, ledger, "dead")
    await dead.streams.ensure_groups()
    await traffic(gw)
    stream = keyspace.shard_stream(keyspace.shard_of("acme", SHARDS))
    assert await client.xlen(stream) == sum(EXPECTED_EVENTS.values())
    shard = keyspace.shard_of("acme", SHARDS)
    taken = await dead.streams.read(shard, 1000)
    half = [decode(entry.raw) for entry in taken[: len(taken) // 2]]
    written_before_crash = await UsageLedger(ledger.db).write(half)
    assert written_before_crash.inserted == len(taken) // 2

    live = worker_for(client, ledger, "live", stale_ms=0)
    task = asyncio.create_task(live.run())
    usage = UsageLedger(ledger.db)
    try:
        await live.housekeeping()  # reclaims the dead consumer's entries
        await eventually(lambda: _equal(ledger_totals(usage), EXPECTED))
        assert await event_kinds(ledger) == EXPECTED_EVENTS
        assert live.metrics.written.duplicates._value.get() == len(taken) // 2
        assert time.time() - live.metrics.last_success._value.get() < 60
        await live.housekeeping()  # everything acknowledged: the stream is trimmed
        assert await client.xlen(stream) == 0
        # Reconciliation agrees, then sees a counter moved behind the ledger's back.
        parsed = parse(config, "test.yaml")
        assert await run_reconcile(parsed, fail_on_drift=True) == 0
        period = period_of("billing_cycle", datetime.now(UTC), None)
        await client.incrby(keyspace.counter_key("acme", SHARDS, "api_calls", period.key), 2)
        assert await run_reconcile(parsed, fail_on_drift=True) == 1
        printed = capsys.readouterr().out
        assert "acme" in printed and "+2" in printed and "1 drifting by 2" in printed
        partitions = await ledger.db.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'usage_events'::regclass"
        )
        assert partitions >= 2  # this month and the next, created ahead
    finally:
        live.stop()
        await task
        await client.aclose()


async def _equal(totals: Any, expected: dict[str, int]) -> bool:
    return bool(await totals == expected)


async def test_a_trickle_of_usage_is_written_in_batches_not_one_round_per_event(
    upstream: Upstream,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    pg_ledger: PgLedger,
) -> None:
    dsn, ledger = pg_ledger
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    config = quota_config(upstream, tmp_path, counters=redis_server.url, ledger=dsn)
    config["plans"]["starter"]["limits"]["api_calls"]["limit"] = 1000
    gw = await make_gateway(config)
    client = aioredis.Redis.from_url(redis_server.url)
    worker = worker_for(client, ledger, "w1", linger_s=0.6)
    task = asyncio.create_task(worker.run())
    usage = UsageLedger(ledger.db)
    try:
        for _ in range(8):  # one request every 50 ms: 0.4 s in all
            assert (await call(gw, "acme"))[0] == 200
            await asyncio.sleep(0.05)
        await eventually(lambda: _is_calls(ledger_totals(usage), 8))
        batches = next(iter(worker.metrics.batch.collect())).samples
        rounds = next(s.value for s in batches if s.name.endswith("_count"))
        # Without the linger each request would be a round (a read and an
        # acknowledgement per shard, a transaction); with it, one or two.
        assert rounds <= 3, rounds
    finally:
        worker.stop()
        await task
        await client.aclose()


async def _is_calls(totals: Any, calls: int) -> bool:
    return bool((await totals).get("api_calls") == calls)
