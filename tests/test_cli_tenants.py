"""`gateway migrate`, `gateway tenants ...` and `gateway token`, run as commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.auth.jwt import JWTVerifier
from gateway.auth.keys import StaticKeys
from gateway.config import load, parse
from gateway.ledger.schema import LATEST_VERSION
from gateway.server import Gateway
from tests.conftest import gateway_config
from tests.procs import write_config
from tests.servers import PostgresServer
from tests.upstream import Upstream

SECRET = "cli-test-secret-" + "q" * 40


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_JWT_SECRET": SECRET}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args[:1], *(["-c", str(path)] if args else []),
         *args[1:]],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def config(ledger: str, upstream_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return gateway_config(
        upstream_url,
        storage={"ledger": ledger},
        auth={
            "jwt": {
                "algorithms": ["HS256"],
                "secret_env": "GATEWAY_JWT_SECRET",
                "issuer": "https://issuer.test/",
                "audience": "api",
            },
            "api_keys": {"enabled": True},
        },  # fmt: skip
        plans={"starter": {}, "pro": {}},
        tenants=[{"id": "acme", "plan": "starter", "name": "Acme"}],
        routes=[{"name": "api", "match": {"path": "/**"}, "upstream": "app"}],
    )


def test_tenant_commands_on_postgres(postgres_server: PostgresServer, tmp_path: Path) -> None:
    path = write_config(tmp_path / "gateway.yaml", config(postgres_server.dsn))
    # Before `migrate`, a PostgreSQL ledger is refused with the fix in the message.
    refused = run(path, "tenants", "list")
    assert refused.returncode == 1
    assert "run `gateway migrate -c <config>` first" in refused.stderr
    migrated = run(path, "migrate")
    expected = f"ledger schema at version {LATEST_VERSION}\n"
    assert (migrated.returncode, migrated.stdout) == (0, expected)
    assert run(path, "migrate").returncode == 0  # idempotent

    created = run(path, "tenants", "put", "beta", "--plan", "pro", "--status", "trialing")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["created"] is True
    bad = run(path, "tenants", "put", "beta", "--plan", "gold")
    assert (bad.returncode, bad.stderr) == (
        1, "error: plan: unknown plan 'gold' (defined: pro, starter)\n"
    )  # fmt: skip
    key_out = run(path, "tenants", "create-key", "beta", "--name", "ci")
    assert key_out.returncode == 0
    key = json.loads(key_out.stdout)
    assert key["key"].startswith("gk_") and "not shown again" in key_out.stderr
    shown = json.loads(run(path, "tenants", "show", "beta").stdout)
    assert shown["status"] == "trialing"
    assert [k["prefix"] for k in shown["api_keys"]] == [key["prefix"]]
    assert "key" not in shown["api_keys"][0]
    assert run(path, "tenants", "revoke-key", key["prefix"]).returncode == 0
    assert run(path, "tenants", "revoke-key", key["prefix"]).returncode == 1
    assert json.loads(run(path, "tenants", "disable", "beta").stdout)["disabled"] is True
    listed = json.loads(run(path, "tenants", "list").stdout)
    assert [t["id"] for t in listed] == ["beta"]  # seeds are created by `serve`, not here
    assert run(path, "tenants", "show", "ghost").returncode == 1


async def test_token_command_mints_what_the_gateway_accepts(tmp_path: Path) -> None:
    path = write_config(tmp_path / "gateway.yaml", config(f"sqlite:///{tmp_path}/l.db"))
    out = run(path, "token", "--tenant", "acme", "--ttl", "120")
    assert out.returncode == 0, out.stderr
    cfg = load(path)
    assert cfg.auth.jwt is not None
    os.environ["GATEWAY_JWT_SECRET"] = SECRET
    try:
        verifier = JWTVerifier(cfg.auth.jwt, StaticKeys.from_config(cfg.auth.jwt))
        tenant, _ = await verifier.verify(out.stdout.strip())
    finally:
        del os.environ["GATEWAY_JWT_SECRET"]
    assert tenant == "acme"


async def test_seed_tenants_are_created_once_and_never_overwritten(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "admin-token")
    data = config(f"sqlite:///{tmp_path}/ledger.db", upstream.url)
    gateway = Gateway(parse(data, "t.yaml"), CollectorRegistry())
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{gateway.admin_port}/admin/tenants/acme"
            headers = {"Authorization": "Bearer admin-token"}
            async with client.put(url, json={"plan": "pro"}, headers=headers) as resp:
                assert resp.status == 200
    finally:
        await gateway.stop()
    restarted = Gateway(parse(data, "t.yaml"), CollectorRegistry())
    await restarted.start()
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{restarted.admin_port}/admin/tenants/acme"
            async with client.get(url, headers={"Authorization": "Bearer admin-token"}) as resp:
                tenant = await resp.json()
    finally:
        await restarted.stop()
    assert (tenant["plan"], tenant["name"]) == ("pro", "Acme")


async def test_cli_changes_reach_an_embedded_gateway_within_a_second(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_JWT_SECRET", SECRET)
    data = config(f"sqlite:///{tmp_path}/ledger.db", upstream.url)  # memory:// counters
    data["storage"]["cache_ttl_s"] = 3600
    path = write_config(tmp_path / "gateway.yaml", data)
    gateway = Gateway(parse(data, "t.yaml"), CollectorRegistry())
    await gateway.start()
    try:
        created = await asyncio.to_thread(run, path, "tenants", "create-key", "acme")
        key = json.loads(created.stdout)
        async with aiohttp.ClientSession() as client:

            async def status() -> int:
                url = f"http://127.0.0.1:{gateway.port}/v1/x"
                async with client.get(url, headers={"X-API-Key": key["key"]}) as resp:
                    return resp.status

            assert await status() == 200  # cached for an hour from now on
            revoked = await asyncio.to_thread(run, path, "tenants", "revoke-key", key["prefix"])
            assert revoked.returncode == 0
            started = time.perf_counter()
            while await status() != 401:
                assert time.perf_counter() - started < 2, "revocation not seen"
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
    finally:
        await gateway.stop()
    print(f"\nCLI revocation seen by the running gateway after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
