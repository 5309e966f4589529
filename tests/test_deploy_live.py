"""The deployment files against running processes: the compose services' own commands,
environment and config run natively, and the metrics the alerts and dashboard name."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.jwt import mint
from tests.conftest import gateway_config
from tests.deploy_files import (
    DEPLOY,
    SYNTHETIC,
    alert_exprs,
    compose,
    dashboard_exprs,
    env_example,
    healthcheck_argv,
    interpolate,
    metric_names,
    native_argv,
)
from tests.fake_stripe import API_KEY, FakeStripe
from tests.procs import GatewayProcess, WorkerProcess, write_config
from tests.servers import PostgresServer, RedisServer, free_port
from tests.upstream import Upstream
from tests.waiting import eventually

pytestmark = pytest.mark.slow

CONFIG_IN_IMAGE = "/etc/gateway/gateway.yaml"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("_sum", "_count")}  # fmt: skip


def _exported(exposition: str) -> set[str]:
    """The series names a scrape holds, with the suffixes of each family's type."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


async def _scrape(http: aiohttp.ClientSession, port: int) -> str:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_the_alerts_and_the_dashboard_name_only_metrics_a_gateway_and_worker_export(
    upstream: Upstream, tmp_path: Path
) -> None:
    redis, postgres = RedisServer().start(), PostgresServer().start()
    fake = await FakeStripe().start()
    fake.add_meter("calls")
    secret = "live-scrape-secret-" + "s" * 30
    metrics_port = free_port()
    data = gateway_config(
        upstream.url,
        # Under a supervisor: its own metrics and every process's, merged, in one scrape.
        server={"host": "127.0.0.1", "port": 0, "workers": 2, "drain_delay_s": 0},
        storage={"counters": redis.url, "ledger": postgres.dsn},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "LIVE_JWT_SECRET"}},
        meters={"api_calls": {"type": "counter"}},
        plans={"p": {"limits": {"api_calls": {"limit": 1000}}}},
        tenants=[{"id": "acme", "plan": "p", "stripe_customer": "cus_acme"}],
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                 "charge": {"api_calls": 1}}],
        metrics={"port": metrics_port, "host": "127.0.0.1", "tenant_label": True},
        usage={"worker_port": 0, "spool_dir": str(tmp_path / "spool")},
        stripe={"api_base": fake.url, "meter_events": {"api_calls": "calls"},
                "report_interval_s": 0.2},
        notifications={"webhooks": [{"url": f"{upstream.url}/hooks",
                                     "secret_env": "LIVE_WEBHOOK_SECRET"}]},
    )  # fmt: skip
    fake.add_customer("cus_acme")
    config = write_config(tmp_path / "gateway.yaml", data)
    env = {"LIVE_JWT_SECRET": secret, "STRIPE_API_KEY": API_KEY, "STRIPE_WEBHOOK_SECRET": "whsec_x",
           "LIVE_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"w" * 32).decode()}  # fmt: skip
    migrate = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "migrate", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    gateway = worker = None
    try:
        gateway = await asyncio.to_thread(GatewayProcess(config, env).start)
        worker = await asyncio.to_thread(WorkerProcess(config, "worker-1", env).start)
        token = mint(secret, "HS256", ["org_id"], "acme", 600)
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                url = f"http://127.0.0.1:{gateway.port}/v1/things"
                async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 200
            exported = _exported(await _scrape(http, metrics_port))
            exported |= _exported(await _scrape(http, worker.port))
    finally:
        for process in (gateway, worker):
            if process is not None:
                process.stop()
        await fake.close()
        redis.close()
        postgres.close()
    exprs = {**alert_exprs(), **dashboard_exprs()}
    used = {name for expr in exprs.values() for name in metric_names(expr)}
    assert len(used) >= 30
    missing = {
        f"{name} (in {', '.join(where for where, e in exprs.items() if name in metric_names(e))})"
        for name in used - exported - SYNTHETIC
    }
    assert not missing, sorted(missing)
    # The check can fail: a name that is not exported is found.
    assert "gateway_requests" + "_count" not in exported


class _Services:
    """Compose services run natively: their own argv and environment, this machine's ports."""

    def __init__(self, tmp_path: Path, config: Path, ports: dict[int, int]) -> None:
        self.tmp_path, self.config, self.ports = tmp_path, config, ports
        self.env = env_example()
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def _local(self, text: str) -> str:
        text = text.replace(CONFIG_IN_IMAGE, str(self.config)).replace("0.0.0.0", "127.0.0.1")
        for inside, here in self.ports.items():
            text = text.replace(f":{inside}/", f":{here}/")
            text = str(here) if text == str(inside) else text
        return text

    def argv_env(self, name: str) -> tuple[list[str], dict[str, str]]:
        service = compose()["services"][name]
        argv = [self._local(arg) for arg in native_argv(service)]
        own = {k: self._local(interpolate(str(v), self.env)) for k, v in
               service.get("environment", {}).items()}  # fmt: skip
        return argv, {**os.environ, **own}

    def run(self, name: str) -> subprocess.CompletedProcess[str]:
        argv, env = self.argv_env(name)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    def start(self, name: str) -> None:
        argv, env = self.argv_env(name)
        log = (self.tmp_path / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()

    async def healthy(self, name: str) -> None:
        """The image's HEALTHCHECK, run for this service until it passes."""
        _, env = self.argv_env(name)

        def passes() -> bool:
            assert self.running[name].poll() is None, (self.tmp_path / f"{name}.log").read_text()
            done = subprocess.run(healthcheck_argv(), env=env, capture_output=True, timeout=10)
            return done.returncode == 0

        await eventually(lambda: asyncio.to_thread(passes), timeout_s=30)

    def stop(self) -> dict[str, int]:
        codes = {}
        for name, proc in self.running.items():
            proc.terminate()
            try:
                codes[name] = proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(10)
        return codes


@pytest.fixture
def compose_redis() -> Iterator[RedisServer]:
    """A private Redis with the compose service's own flags."""
    command = compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    server = RedisServer(extra=tuple(command[1:])).start()
    yield server
    server.close()


def _native_config(tmp_path: Path, redis: RedisServer, postgres: PostgresServer) -> tuple[
    Path, dict[int, int]
]:  # fmt: skip
    """deploy/gateway.compose.yaml with the services' addresses and ports of this machine."""
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "gateway.compose.yaml").read_text())
    upstream_port = int(compose()["services"]["upstream"]["command"][-1])
    ports = {
        port: free_port()
        for port in (data["server"]["port"], data["admin"]["port"], data["metrics"]["port"],
                     data["usage"]["worker_port"], upstream_port)
    }  # fmt: skip
    assert data["storage"]["counters"] == "redis://redis:6379/0"
    assert data["storage"]["ledger"].endswith("@postgres:5432/gateway")
    data["storage"].update(counters=redis.url, ledger=postgres.dsn)
    assert data["upstreams"]["app"]["url"] == f"http://upstream:{upstream_port}"
    data["upstreams"]["app"]["url"] = f"http://127.0.0.1:{ports[upstream_port]}"
    for section in ("server", "admin", "metrics"):
        data[section].update(host="127.0.0.1", port=ports[data[section]["port"]])
    data["usage"].update(worker_port=ports[data["usage"]["worker_port"]],
                         spool_dir=str(tmp_path / "spool"))  # fmt: skip
    return write_config(tmp_path / "gateway.yaml", data), ports


async def test_the_compose_services_run_natively_and_meter_traffic_into_the_ledger(
    tmp_path: Path, compose_redis: RedisServer, postgres_server: PostgresServer
) -> None:
    config, ports = _native_config(tmp_path, compose_redis, postgres_server)
    services = _Services(tmp_path, config, ports)
    try:
        services.start("upstream")
        await services.healthy("upstream")
        migrate = await asyncio.to_thread(services.run, "migrate")
        assert migrate.returncode == 0, migrate.stderr
        services.start("gateway")
        services.start("worker")
        await services.healthy("gateway")
        await services.healthy("worker")
        argv, env = services.argv_env("gateway")
        token = await asyncio.to_thread(
            subprocess.run, [*argv[:3], "token", "-c", str(config), "--tenant", "acme"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        public = f"http://127.0.0.1:{ports[8080]}"
        auth = {"Authorization": f"Bearer {token.stdout.strip()}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            for _ in range(15):  # within the starter plan's burst of 20
                async with http.get(f"{public}/v1/projects") as resp:
                    assert resp.status == 200
            async with http.post(f"{public}/v1/members", json={"email": "ada@example.com"}) as resp:
                assert resp.status == 201, await resp.text()
            metrics = f"http://127.0.0.1:{ports[9100]}"
            async with http.get(f"{metrics}/metrics") as resp:
                assert 'gateway_requests_total{method="GET",route="api",status="200"} 15.0' in (
                    await resp.text()
                )
            async with http.get(f"{metrics}/admin/tenants") as resp:
                assert resp.status == 404  # the admin API is not on the scraped port

        async def totals() -> dict[str, int]:
            conn = await asyncpg.connect(postgres_server.dsn)
            try:
                rows = await conn.fetch(
                    "SELECT meter, sum(quantity) AS q FROM usage_totals"
                    " WHERE tenant_id = 'acme' GROUP BY meter"
                )
            finally:
                await conn.close()
            return {row["meter"]: int(row["q"]) for row in rows}

        async def written() -> bool:
            return await totals() == {"api_calls": 16, "team_members": 1}

        await eventually(written, timeout_s=30)
    finally:
        codes = services.stop()
    assert codes == {"upstream": codes["upstream"], "gateway": 0, "worker": 0}, codes
