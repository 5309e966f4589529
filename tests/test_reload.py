"""Reloading the config file: SIGHUP and POST /admin/reload, in process and in `gateway serve`."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.app_keys import LIVE, WATCHING
from gateway.auth.jwt import mint
from gateway.config import load
from gateway.ledger import Tenant
from gateway.reload import restart_only
from gateway.server import Gateway
from tests.conftest import gateway_config
from tests.procs import GatewayProcess, write_config
from tests.upstream import Upstream, start_upstream
from tests.waiting import eventually

SECRET = "reload-test-secret-" + "k" * 40
ADMIN = "reload-admin"
ENV = {"RELOAD_JWT_SECRET": SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN}


def config(
    upstream: Upstream, tmp_path: Path, *, limit: int = 100, rate: int = 1000, **extra: Any
) -> dict[str, Any]:
    """One metered route, plan `starter` with a monthly quota and a rate limit, tenant acme."""
    data = gateway_config(
        upstream.url,
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "RELOAD_JWT_SECRET"}},
        meters={"api_calls": {"type": "counter", "period": "month"}},
        plans={
            "starter": {
                "limits": {"api_calls": {"limit": limit}},
                "rate_limits": [{"name": "per_minute", "rate": rate, "per_s": 60}],
            }
        },
        tenants=[{"id": "acme", "plan": "starter"}],
        routes=[
            {
                "name": "api",
                "match": {"path": "/v1/**"},
                "upstream": "app",
                "charge": {"api_calls": 1},
            },
        ],  # fmt: skip
    )
    data.update(extra)
    return data


@pytest.fixture
async def started(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    """An in-process gateway started from a file, as `gateway serve -c FILE` is."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = write_config(tmp_path / "gateway.yaml", config(upstream, tmp_path))
    gateway = Gateway(load(path), CollectorRegistry(), config_path=str(path))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def config_file(gateway: Gateway) -> Path:
    assert gateway.config_path is not None
    return Path(gateway.config_path)


async def call(port: int, tenant: str = "acme", path: str = "/v1/things") -> int:
    token = mint(SECRET, "HS256", ["org_id"], tenant, 600)
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            await resp.read()
            return resp.status


async def reload(admin_port: int, token: str | None = ADMIN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"http://127.0.0.1:{admin_port}/admin/reload", headers=headers
        ) as resp:
            return resp.status, await resp.json(content_type=None)


def reloads(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("gateway_config_reloads_total", {"result": result})
    return value or 0.0


async def test_a_lower_quota_and_rate_limit_take_effect_for_the_next_request(
    started: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    assert [await call(started.port) for _ in range(3)] == [200] * 3
    write_config(config_file(started), config(upstream, tmp_path, limit=4))
    status, summary = await reload(started.admin_port)
    assert status == 200
    assert summary == {
        "status": "reloaded", "file": str(config_file(started)),
        "routes": 1, "upstreams": 1, "plans": 1, "meters": 1, "tenants": 1,
    }  # fmt: skip
    # 3 used of 4: one more, then the hard quota refuses.
    assert [await call(started.port) for _ in range(2)] == [200, 402]
    # The rate limit lowered from 1000 to 2 a minute: the third request at most is served
    # (the second too, unless what the earlier ones spent is still owed, as GCRA keeps it).
    write_config(config_file(started), config(upstream, tmp_path, limit=100, rate=2))
    assert (await reload(started.admin_port))[0] == 200
    assert [await call(started.port) for _ in range(3)] in ([200, 200, 429], [200, 429, 429])
    assert reloads(started.registry, "success") == 2
    assert reloads(started.registry, "failure") == 0
    last = started.registry.get_sample_value("gateway_config_last_reload_success_timestamp_seconds")
    assert last is not None and last > 0


async def test_a_request_in_flight_finishes_on_the_old_config_and_its_pool_is_closed_after(
    started: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    assert started.app is not None
    other = await start_upstream()
    try:
        before = started.app[LIVE].runtime
        old_pool = before.upstreams["app"].client
        slow = asyncio.create_task(call(started.port, path="/v1/respond/slow?delay=1"))
        await eventually(lambda: bool(upstream.arrived))
        # The route now goes to another upstream: `app` is replaced, its pool retired.
        data = config(upstream, tmp_path)
        data["upstreams"]["app"]["url"] = other.url
        write_config(config_file(started), data)
        assert (await reload(started.admin_port))[0] == 200
        assert not slow.done()
        assert old_pool.open_connections == 1  # still serving the request in flight
        assert await call(started.port) == 200
        assert [s.raw_path for s in other.seen] == ["/v1/things"]
        assert await slow == 200  # answered by the old upstream, not cut
        assert [s.raw_path for s in upstream.seen] == ["/v1/respond/slow?delay=1"]
        await eventually(lambda: old_pool.open_connections == 0)
        assert before.active == 0
    finally:
        await other.close()


async def test_reloads_under_steady_load_fail_no_request(
    started: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    assert started.app is not None
    other = await start_upstream()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        token = mint(SECRET, "HS256", ["org_id"], "acme", 600)
        async with aiohttp.ClientSession() as session:  # keep-alive, as a real client
            while not stop.is_set():
                async with session.get(
                    f"http://127.0.0.1:{started.port}/v1/respond/x?delay=0.005",
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    await resp.read()
                    statuses.append(resp.status)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    pools = [started.app[LIVE].runtime.upstreams["app"].client]
    try:
        for i in range(10):
            served = len(statuses)
            await eventually(lambda: len(statuses) > served + 4)  # noqa: B023 - awaited here
            # Every other reload moves `app` to the other upstream: its pool is retired.
            data = config(upstream, tmp_path, limit=10_000 + i)
            data["upstreams"]["app"]["url"] = (other if i % 2 == 0 else upstream).url
            write_config(config_file(started), data)
            assert (await reload(started.admin_port))[0] == 200
            pools.append(started.app[LIVE].runtime.upstreams["app"].client)
        await eventually(lambda: len(statuses) > 40)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        await other.close()
    assert statuses.count(200) == len(statuses)
    await eventually(lambda: all(pool.open_connections == 0 for pool in pools[:-1]))
    print(f"{len(statuses)} requests from 4 clients across 10 reloads: all 200")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("routes: [\n  - name: api\n    match: {path: '/v1/**'\n", "invalid YAML"),
        ("limit", "plans.starter.limits.api_calls.limit: expected an integer"),
        ("port", "server.port: cannot change on reload; restart the gateway"),
        ("shards", "storage.shards: cannot change on reload; restart the gateway"),
        ("ca_file", "upstreams.app.ca_file: cannot be used: "),
    ],
)
async def test_a_bad_file_keeps_the_running_config_logs_once_and_counts(
    started: Gateway,
    upstream: Upstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
    expected: str,
) -> None:
    path = config_file(started)
    data = config(upstream, tmp_path, limit=1)
    if change == "limit":
        data["plans"]["starter"]["limits"]["api_calls"]["limit"] = "lots"
    elif change == "port":
        data["server"]["port"] = 1
    elif change == "shards":
        data["storage"]["shards"] = 4
    elif change == "ca_file":
        (tmp_path / "ca.pem").write_text("not a certificate\n")
        data["upstreams"]["app"].update(url="https://localhost:1", ca_file="ca.pem")
    if change == "limit":  # the schema refuses it too: written without the schema check
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    elif change in ("port", "shards", "ca_file"):
        write_config(path, data)
    else:
        path.write_text(change)
    caplog.set_level(logging.INFO, "gateway.reload")
    status, problem = await reload(started.admin_port)
    assert status == 422
    assert problem["type"].endswith(":config-invalid")
    assert problem["errors"] == [line for line in problem["errors"] if line.startswith(f"{path}: ")]
    assert expected in problem["detail"]
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert str(path) in errors[0].getMessage() and expected in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line, no traceback
    # The running config (limit 100) still holds: a new one of 1 would refuse the second.
    assert [await call(started.port) for _ in range(2)] == [200, 200]
    assert (reloads(started.registry, "failure"), reloads(started.registry, "success")) == (1, 0)


async def test_an_embedded_gateway_forecasts_against_the_reloaded_plans(
    started: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    """No `gateway worker` runs beside an embedded gateway: its own watch forecasts
    exhaustion, against the plans of the config in force, not those it started with."""
    assert started.app is not None
    watch = started.app[WATCHING].watch
    acme = Tenant("acme", plan="starter", status="active", status_changed_at=datetime.now(UTC))
    assert watch.policies.meter_limit(acme, "api_calls").limit == 100
    write_config(config_file(started), config(upstream, tmp_path, limit=5000))
    status, _ = await reload(started.admin_port)
    assert status == 200
    assert watch.policies.meter_limit(acme, "api_calls").limit == 5000
    assert watch.config.plans["starter"].limits["api_calls"].limit == 5000


async def test_new_seed_tenants_are_created_and_auth_settings_change(
    started: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    assert await call(started.port, tenant="newco") == 403  # unknown (and cached as such)
    data = config(upstream, tmp_path)
    data["tenants"].append({"id": "newco", "plan": "starter"})
    write_config(config_file(started), data)
    assert (await reload(started.admin_port))[0] == 200
    assert await call(started.port, tenant="newco") == 200
    # An issuer is now required: the tokens minted without one are refused.
    data["auth"]["jwt"]["issuer"] = "https://id.example.com"
    write_config(config_file(started), data)
    assert (await reload(started.admin_port))[0] == 200
    assert await call(started.port) == 401


async def test_quotas_cannot_be_turned_on_by_a_reload_of_a_gateway_without_them(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN)
    ledger = {"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"}
    path = write_config(tmp_path / "plain.yaml", gateway_config(upstream.url, storage=ledger))
    gateway = Gateway(load(path), CollectorRegistry(), config_path=str(path))
    await gateway.start()
    try:
        monkeypatch.setenv("RELOAD_JWT_SECRET", SECRET)
        write_config(path, config(upstream, tmp_path))
        status, problem = await reload(gateway.admin_port)
        assert status == 422
        assert problem["errors"] == [
            f"{path}: auth.jwt: tenants need the ledger, opened only at start; restart the gateway",
            f"{path}: routes[0].charge: quotas need the counter store, opened only at start; "
            "restart the gateway",
        ]
    finally:
        await gateway.stop()


async def test_the_reload_endpoint_needs_the_admin_token(started: Gateway) -> None:
    assert (await reload(started.admin_port, token=None))[0] == 401
    assert (await reload(started.admin_port, token="wrong"))[0] == 401
    assert reloads(started.registry, "success") + reloads(started.registry, "failure") == 0


def test_what_needs_a_restart_is_named_by_its_path(upstream: Upstream, tmp_path: Path) -> None:
    from gateway.config import parse

    base = config(upstream, tmp_path)
    old = parse(base, "g.yaml")
    changed = config(upstream, tmp_path, limit=1)
    changed["server"] = {**base["server"], "max_body_bytes": 10, "trusted_proxies": ["10.0.0.0/8"]}
    assert restart_only(old, parse(changed, "g.yaml")) == []
    for section, key, value in [
        ("server", "host", "0.0.0.0"),
        ("server", "workers", 1),  # the default, but set: equal, so not a change
        ("admin", "token_env", "OTHER_TOKEN"),
        ("storage", "counters", "redis://127.0.0.1:1"),
        ("logging", "access_log", False),
        ("usage", "flush_interval_ms", 10),
        ("metrics", "tenant_label", True),
    ]:
        data = config(upstream, tmp_path)
        data[section] = {**data.get(section, {}), key: value}
        issues = restart_only(old, parse(data, "g.yaml"))
        expected = (
            []
            if key == "workers"
            else [(f"{section}.{key}", "cannot change on reload; restart the gateway")]
        )
        assert issues == expected, (section, key)
    data = config(upstream, tmp_path)
    data["server"] = {**data["server"], "limits": {"max_connections": 5}}
    assert [at for at, _ in restart_only(old, parse(data, "g.yaml"))] == [
        "server.limits.max_connections"
    ]


@pytest.mark.slow
async def test_sighup_reloads_a_running_gateway_serve(upstream: Upstream, tmp_path: Path) -> None:
    path = write_config(tmp_path / "gateway.yaml", config(upstream, tmp_path, limit=3))
    proc = GatewayProcess(path, env=ENV).start()
    try:
        assert [await call(proc.port) for _ in range(2)] == [200, 200]
        write_config(path, config(upstream, tmp_path, limit=2))
        signalled = time.perf_counter()
        proc.signal(signal.SIGHUP)
        await eventually(lambda: any("config reloaded" in line for line in proc.log_lines))
        reloaded_ms = (time.perf_counter() - signalled) * 1000
        assert await call(proc.port) == 402  # the third request: the old limit let it through
        # A broken file: the lowered limit stays, one line says why, the failure is counted.
        path.write_text("plans: [")
        proc.signal(signal.SIGHUP)
        await eventually(lambda: any("config not reloaded" in line for line in proc.log_lines))
        assert await call(proc.port) == 402
        failed = [line for line in proc.log_lines if "config not reloaded" in line]
        assert len(failed) == 1 and "invalid YAML" in failed[0] and str(path) in failed[0]
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{proc.admin_port}/metrics") as resp:
                metrics = await resp.text()
        assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics
        assert 'gateway_config_reloads_total{result="failure"} 1.0' in metrics
        assert proc.stop() == 0
        print(f"SIGHUP to the reload logged by gateway serve: {reloaded_ms:.0f} ms")
    finally:
        if proc.proc is not None:
            proc.kill()
