"""Usage billed exactly: clients -> `gateway serve` -> Redis -> `gateway worker` -> Postgres
-> Stripe (the strict fake), in both reporting modes, with and without faults.

For every customer, what Stripe holds equals the ledger and the 2xx the
clients saw. With a fifth of Stripe's answers failing or hanging and the
worker SIGKILLed three times (once between a send and its mark), no
identifier is ever sent with two different quantities. `gateway stripe
reconcile` agrees, and disagrees once an event goes missing at Stripe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.auth.jwt import mint
from tests.conftest import gateway_config
from tests.fake_stripe import API_KEY, FakeStripe, MeterEvent
from tests.procs import GatewayProcess, WorkerProcess, write_config
from tests.servers import PostgresServer, RedisServer
from tests.upstream import Upstream

pytestmark = pytest.mark.fault

SECRET = "stripe-e2e-jwt-secret-" + "e" * 40
TENANTS = [f"tenant-{i:02d}" for i in range(50)]
REQUESTS = 3000
CONCURRENCY = 16
SETTLE_S = 90


class Stack:
    def __init__(self, upstream: Upstream, fake: FakeStripe, tmp_path: Path, mode: str) -> None:
        self.redis = RedisServer().start()
        self.postgres = PostgresServer().start()
        self.fake = fake
        data = gateway_config(
            upstream.url,
            storage={"counters": self.redis.url, "ledger": self.postgres.dsn},
            auth={"jwt": {"algorithms": ["HS256"], "secret_env": "E2E_JWT_SECRET"}},
            meters={"api_calls": {"type": "counter"}},
            plans={"big": {"limits": {"api_calls": {"limit": "unlimited"}}}},
            tenants=[{"id": t, "plan": "big", "stripe_customer": f"cus_{t}"} for t in TENANTS],
            routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                     "charge": {"api_calls": 1}}],
            usage={"worker_port": 0},
            stripe={"api_base": fake.url, "mode": mode, "meter_events": {"api_calls": "calls"},
                    "report_interval_s": 0.2, "timeout_s": 1.0},
        )  # fmt: skip
        self.config = write_config(tmp_path / "gateway.yaml", data)
        self.env = {"E2E_JWT_SECRET": SECRET, "STRIPE_API_KEY": API_KEY,
                    "STRIPE_WEBHOOK_SECRET": "whsec_e2e"}  # fmt: skip
        self.gateways: list[GatewayProcess] = []
        self.worker: WorkerProcess | None = None
        for tenant in TENANTS:
            fake.add_customer(f"cus_{tenant}")
        fake.add_meter("calls")

    async def start(self) -> None:
        assert (await self.cli("migrate"))[0] == 0
        # Both start at once (they seed the same tenants concurrently); every one that
        # started is kept for `close`, even when the other did not.
        processes = [GatewayProcess(self.config, self.env) for _ in range(2)]
        self.gateways = processes
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        await self.start_worker()

    async def start_worker(self) -> None:
        worker = WorkerProcess(self.config, "worker-1", self.env)
        self.worker = await asyncio.to_thread(worker.start)

    async def cli(self, *args: str) -> tuple[int, str]:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", *args, "-c", str(self.config)],
            capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def close(self) -> None:
        for process in [*self.gateways, self.worker]:
            if process is not None and process.proc is not None:
                process.kill()
        self.redis.close()
        self.postgres.close()

    async def ledger(self) -> dict[str, int]:
        conn = await asyncpg.connect(self.postgres.dsn)
        try:
            rows = await conn.fetch(
                "SELECT tenant_id, sum(quantity) AS q FROM usage_totals GROUP BY tenant_id"
            )
        finally:
            await conn.close()
        return {row["tenant_id"]: int(row["q"]) for row in rows}

    def stripe(self) -> dict[str, int]:
        return {cus.removeprefix("cus_"): q for (cus, _), q in self.fake.totals().items()}


async def traffic(ports: list[int]) -> dict[str, int]:
    """REQUESTS requests over every tenant and gateway; the 2xx per tenant."""
    ok = dict.fromkeys(TENANTS, 0)
    tokens = {t: mint(SECRET, "HS256", ["org_id"], t, 3600) for t in TENANTS}
    slots = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as client:

        async def one(n: int) -> None:
            tenant, port = TENANTS[n % len(TENANTS)], ports[n % len(ports)]
            async with slots:
                url = f"http://127.0.0.1:{port}/v1/things"
                headers = {"Authorization": f"Bearer {tokens[tenant]}"}
                async with client.get(url, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        ok[tenant] += 1

        await asyncio.gather(*(one(n) for n in range(REQUESTS)))
    return ok


async def settled(stack: Stack, served: dict[str, int]) -> float:
    started = time.monotonic()
    while True:
        ledger, held = await stack.ledger(), stack.stripe()
        if ledger == served and held == served:
            return time.monotonic() - started
        if time.monotonic() - started > SETTLE_S:
            worker_log = "".join(stack.worker.log_lines[-30:]) if stack.worker else ""
            missing = {t: (served[t], ledger.get(t), held.get(t)) for t in TENANTS
                       if not served[t] == ledger.get(t) == held.get(t)}  # fmt: skip
            raise AssertionError(f"not settled (2xx, ledger, stripe): {missing}\n{worker_log}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def fake() -> Any:
    server = await FakeStripe(session_ttl_s=5).start()
    yield server
    await server.close()


async def run(
    upstream: Upstream, fake: FakeStripe, tmp_path: Path, mode: str, faults: bool
) -> None:
    stack = Stack(upstream, fake, tmp_path, mode)
    kills: list[str] = []
    try:
        await stack.start()
        if faults:
            fake.failures.rate = 0.2
            fake.failures.hang_s = 1.5

            def kill_between_send_and_mark(event: MeterEvent) -> None:
                # Recorded by Stripe, not yet answered: the worker dies before its mark.
                if stack.worker is not None and stack.worker.proc is not None and not kills:
                    os.kill(stack.worker.pid, signal.SIGKILL)
                    kills.append(f"between the send of {event.identifier} and its mark")

            fake.on_commit = kill_between_send_and_mark
        load = asyncio.create_task(traffic([g.port for g in stack.gateways]))
        if faults:
            deadline = time.monotonic() + 20
            while not kills:
                assert time.monotonic() < deadline, "the worker never sent anything"
                await asyncio.sleep(0.02)
            fake.on_commit = None
            for pause_s in (0.0, 1.0, 1.5):
                await asyncio.sleep(pause_s)
                assert stack.worker is not None
                if pause_s:
                    kills.append("at random")
                stack.worker.kill()
                await stack.start_worker()
        served = await load
        took = await settled(stack, served)
        conflicts = fake.conflicting_identifiers()
        print(f"\nStripe {mode}{' with faults' if faults else ''}: {sum(served.values())} served "
              f"to {len(TENANTS)} tenants = ledger = Stripe, {took:.1f}s after the load; "
              f"{len(fake.events)} meter events; injected {fake.failures.injected}; "
              f"worker SIGKILLed: {kills}")  # fmt: skip
        assert conflicts == []
        if faults:
            assert len(kills) == 3 and kills[0].startswith("between"), kills
        code, out = await stack.cli("stripe", "reconcile")
        assert code == 0, out
        fake.failures.rate = 0.0
        fake.remove_event(next(iter(fake.events)))
        code, out = await stack.cli("stripe", "reconcile")
        assert code == 1 and "1 differ" in out, out
    finally:
        stack.close()


@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_stripe_holds_exactly_what_was_served(
    upstream: Upstream, fake: FakeStripe, tmp_path: Path, mode: str
) -> None:
    await run(upstream, fake, tmp_path, mode, faults=False)


@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_exact_with_failing_stripe_and_a_killed_worker(
    upstream: Upstream, fake: FakeStripe, tmp_path: Path, mode: str
) -> None:
    await run(upstream, fake, tmp_path, mode, faults=True)
