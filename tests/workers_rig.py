"""A `server.workers` gateway in a real process tree: a supervisor, its processes, a
private Redis and PostgreSQL, and a `gateway worker` writing the usage into the ledger."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.jwt import mint
from tests.conftest import fresh_database, gateway_config
from tests.procs import GatewayProcess, WorkerProcess, write_config
from tests.servers import PostgresServer
from tests.upstream import Upstream

SECRET = "workers-secret-" + "w" * 40
ENV = {"WORKERS_JWT_SECRET": SECRET, "GATEWAY_ADMIN_TOKEN": "workers-admin-token"}
TOKEN = mint(SECRET, "HS256", ["org_id"], "acme", 3600)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def workers_config(upstream: Upstream, redis_url: str, dsn: str, **server: Any) -> Any:
    """Two processes (unless `server` says otherwise), one unlimited tenant, a charged route."""
    return gateway_config(
        upstream.url,
        server={"host": "127.0.0.1", "port": 0, "workers": 2, "drain_delay_s": 0, **server},
        storage={"counters": redis_url, "ledger": dsn, "timeout_ms": 2000},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "WORKERS_JWT_SECRET"}},
        meters={"api_calls": {"type": "counter"}},
        plans={"big": {"limits": {"api_calls": {"limit": "unlimited"}}}},
        tenants=[{"id": "acme", "plan": "big"}],
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                 "charge": {"api_calls": 1}}],
        usage={"worker_port": 0},
    )  # fmt: skip


class Rig:
    """The supervisor (`gateway`), the usage worker, and what they share."""

    def __init__(self, config: Path, dsn: str) -> None:
        self.config = config
        self.dsn = dsn
        self.gateway = GatewayProcess(config, ENV)
        self.worker = WorkerProcess(config, "worker-1", ENV)

    async def start(self) -> Rig:
        migrate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "migrate", "-c", str(self.config),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await migrate.wait() == 0
        await asyncio.to_thread(self.gateway.start, 60)
        await asyncio.to_thread(self.worker.start)
        return self

    def close(self) -> None:
        self.gateway.stop()  # SIGTERM: the supervisor removes its processes' sockets
        if self.worker.proc is not None:
            self.worker.kill()

    def children(self) -> list[int]:
        """The supervisor's processes now."""
        return children(self.gateway.pid)

    async def ledger_total(self) -> int:
        conn = await asyncpg.connect(self.dsn)
        try:
            return int(await conn.fetchval("SELECT coalesce(sum(quantity), 0) FROM usage_totals"))
        finally:
            await conn.close()

    async def ledger_reaches(self, expected: int, timeout_s: float = 30) -> int:
        """The ledger's total once it equals `expected` (or the last seen past the deadline)."""
        deadline = time.monotonic() + timeout_s
        total = await self.ledger_total()
        while total != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            total = await self.ledger_total()
        return total

    async def metrics(self) -> str:
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{self.gateway.admin_port}/metrics") as resp,
        ):
            assert resp.status == 200
            return await resp.text()


@asynccontextmanager
async def running_rig(
    upstream: Upstream, redis_url: str, postgres: PostgresServer, directory: Path, **server: Any
) -> AsyncIterator[Rig]:
    """A started rig on a database of its own; everything killed afterwards."""
    async with fresh_database(postgres) as dsn:
        data = workers_config(upstream, redis_url, dsn, **server)
        rig = Rig(write_config(directory / "gateway.yaml", data), dsn)
        try:
            yield await rig.start()
        finally:
            rig.close()


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie nobody reaps counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def admin_socket(pid: int) -> str:
    """The private admin socket a supervised process was started with."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return args[args.index("--admin-socket") + 1]


async def process_metrics(pid: int) -> str:
    """One supervised process's own /metrics, read on its private socket."""
    connector = aiohttp.UnixConnector(path=admin_socket(pid))
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.get("http://process/metrics") as resp,
    ):
        return await resp.text()


def requests_total(exposition: str) -> int:
    """The sum of `gateway_requests_total` over its labels."""
    for family in text_string_to_metric_families(exposition):
        if family.name == "gateway_requests":
            return int(sum(s.value for s in family.samples if s.name == "gateway_requests_total"))
    return 0


def sample(exposition: str, name: str) -> float | None:
    """The value of an unlabelled sample."""
    for family in text_string_to_metric_families(exposition):
        for one in family.samples:
            if one.name == name and not one.labels:
                return float(one.value)
    return None


async def send(port: int, count: int, concurrency: int = 8, path: str = "/v1/things") -> int:
    """`count` requests, each on a new connection (the kernel spreads connections over
    the processes, not requests); how many were answered 200."""
    ok = 0
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one() -> None:
            nonlocal ok
            async with (
                semaphore,
                client.get(f"http://127.0.0.1:{port}{path}", headers=AUTH) as resp,
            ):
                await resp.read()
                ok += resp.status == 200

        await asyncio.gather(*(one() for _ in range(count)))
    return ok
