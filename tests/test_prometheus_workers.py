"""A real Prometheus (Debian's `prometheus`) scraping a `workers: 2` gateway under
traffic: PromQL through its HTTP API counts exactly the requests sent."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.servers import PostgresServer, RedisServer, free_port, wait_port
from tests.upstream import Upstream
from tests.workers_rig import Rig, running_rig, send

REQUESTS = 600


class Prometheus:
    """A prometheus server in its own directory, scraping one target every 500 ms."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "500ms", "scrape_timeout": "500ms"},
            "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [target]}]}],
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.data = directory / "tsdb"
        self.log = directory / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (the test command installs it)"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=log,
            )  # fmt: skip
        wait_port(self.port, 30, self.proc)
        # It listens before its storage is open; queries answer 503 until then.
        deadline = time.monotonic() + 30
        while not self._ready():
            assert time.monotonic() < deadline, f"not ready:\n{self.log.read_text()}"
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                return True
        except OSError:  # HTTPError (503) included
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query"
        async with (
            aiohttp.ClientSession() as client,
            client.get(url, params={"query": promql}) as resp,
        ):
            body = await resp.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, promql: str) -> float | None:
        """The single value of an instant query (None while it has no result)."""
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
async def rig(
    upstream: Upstream,
    redis_server: RedisServer,
    shared_postgres_server: PostgresServer,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    async with running_rig(upstream, redis_server.url, shared_postgres_server, tmp_path) as rig:
        yield rig


@pytest.fixture
def prometheus(rig: Rig, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, f"127.0.0.1:{rig.gateway.admin_port}").start()
    yield server
    server.stop()


async def test_promql_counts_exactly_the_requests_sent(rig: Rig, prometheus: Prometheus) -> None:
    async def scraped() -> float | None:
        return await prometheus.value('up{job="gateway"}')

    deadline = time.monotonic() + 30
    while await scraped() != 1.0:
        assert time.monotonic() < deadline, f"never scraped:\n{prometheus.log.read_text()}"
        await asyncio.sleep(0.2)
    # Sent while Prometheus scrapes every 500 ms: the sum moves under its eyes.
    assert await send(rig.gateway.port, REQUESTS, concurrency=16) == REQUESTS
    promql = 'sum(gateway_requests_total{job="gateway"})'
    deadline = time.monotonic() + 30
    seen = await prometheus.value(promql)
    while seen != REQUESTS and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        seen = await prometheus.value(promql)
    print(f"\n{REQUESTS} requests over 2 processes: {promql} = {seen}")
    assert seen == REQUESTS
    # Both processes' series, not one of them.
    per_process = await prometheus.query('process_cpu_seconds_total{job="gateway"}')
    assert sorted(r["metric"]["worker"] for r in per_process) == ["0", "1"]
