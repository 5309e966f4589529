"""Shared fixtures: a real upstream, in-process gateways, private servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from gateway.config import parse
from gateway.ledger import Ledger
from gateway.quota.store import CounterStore
from gateway.server import Gateway
from tests.fault_matrix import MATRIX, table
from tests.jwt_helpers import RSA, JWKSServer
from tests.schema_check import assert_schema_accepts
from tests.servers import PostgresServer, RedisCluster, RedisServer
from tests.upstream import Upstream, start_upstream

MakeGateway = Callable[..., Awaitable[Gateway]]
StoreT = TypeVar("StoreT", bound=CounterStore)


async def whole(store: StoreT) -> StoreT:
    """`store` with every shard marked whole (restored, from an empty ledger)."""
    for shard in await store.lost():
        await store.restore(shard, [])
    return store


def gateway_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """A minimal config on free ports in front of `upstream_url`; `sections` override."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_delay_s": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstreams": {"app": {"url": upstream_url, "connect_timeout_s": 2, "timeout_s": 5}},
        "routes": [{"name": "all", "match": {"path": "/**"}, "upstream": "app", "auth": "none"}],
    }
    data.update(sections)
    return data


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    await up.close()


@pytest.fixture
async def make_gateway() -> AsyncIterator[MakeGateway]:
    """Start in-process gateways from config dicts; all are stopped afterwards."""
    started: list[Gateway] = []

    async def make(data: dict[str, Any]) -> Gateway:
        assert_schema_accepts(data)
        gateway = Gateway(parse(data, "test.yaml"), CollectorRegistry())
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop()


@pytest.fixture
async def jwks() -> AsyncIterator[JWKSServer]:
    """A JWKS endpoint on port 0 serving `RSA`'s public key (see tests.jwt_helpers)."""
    server = await JWKSServer([RSA.jwk]).start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def shared_redis_server() -> Iterator[RedisServer]:
    """One private Redis for the session's contract tests; flush it, never stop it."""
    server = RedisServer(appendonly=False).start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def shared_redis_cluster() -> Iterator[RedisCluster]:
    """One private three-node Redis Cluster for the session; flush it, never stop it."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def shared_postgres_server() -> Iterator[PostgresServer]:
    """One private server for the whole session: give each test its own database, never stop it."""
    server = PostgresServer().start()
    yield server
    server.close()


@asynccontextmanager
async def fresh_database(server: PostgresServer) -> AsyncIterator[str]:
    """A new empty database on `server`, dropped afterwards; yields its DSN."""
    name = f"ledger_{uuid4().hex}"
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield server.dsn.rsplit("/", 1)[0] + "/" + name
        finally:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server: PostgresServer = request.getfixturevalue("shared_postgres_server")
    async with fresh_database(server) as dsn:
        yield dsn


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    ledger = await Ledger.open(ledger_url)
    await ledger.migrate()
    yield ledger
    await ledger.close()


PgLedger = tuple[str, Ledger]


@pytest.fixture
async def pg_ledger(shared_postgres_server: PostgresServer) -> AsyncIterator[PgLedger]:
    async with fresh_database(shared_postgres_server) as dsn:
        ledger = await Ledger.open(dsn)
        await ledger.migrate()
        yield dsn, ledger
        await ledger.close()


def _figures(stdout: str) -> str:
    """What a test printed, without the access log of the gateways it ran in-process."""
    return "\n".join(line for line in stdout.strip().splitlines() if "gateway.access" not in line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures passed tests printed (fault bounds, throughput), without their logs:
    the summary stays short, and the measured ranges stay visible in every run."""
    lines = [
        (report.nodeid, text)
        for report in terminalreporter.stats.get("passed", [])
        if report.when == "call" and (text := _figures(report.capstdout))
    ]
    if lines:
        terminalreporter.section("figures")
        for nodeid, text in lines:
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {text}")
    if MATRIX:
        terminalreporter.section("fault matrix")
        for line in table(MATRIX):
            terminalreporter.write_line(line)
