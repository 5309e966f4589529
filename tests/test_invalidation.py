"""A change made through one gateway process reaches another within a second.

Two `gateway serve` processes share a private Redis and a private PostgreSQL.
Their caches keep entries for an hour, so only the invalidation message can
make the second process see a change in time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth.jwt import mint
from tests.conftest import gateway_config
from tests.procs import GatewayProcess, write_config
from tests.servers import PostgresServer, RedisServer
from tests.upstream import Upstream

SECRET = "invalidation-test-secret-" + "z" * 40
ADMIN = "admin-token-for-invalidation"
PROPAGATION_BOUND_S = 1.0


async def _until(check: Callable[[], Awaitable[bool]], bound_s: float) -> float:
    """Seconds until `check()` holds; fails past twice the bound (then prints it)."""
    started = time.perf_counter()
    while time.perf_counter() - started < bound_s * 2:
        if await check():
            return time.perf_counter() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {bound_s * 2:.1f}s")


async def test_admin_changes_reach_another_process_within_a_second(
    upstream: Upstream,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    config = gateway_config(
        upstream.url,
        storage={
            "counters": redis_server.url,
            "ledger": postgres_server.dsn,
            "cache_ttl_s": 3600,
        },
        auth={
            "jwt": {"algorithms": ["HS256"], "secret_env": "GATEWAY_JWT_SECRET"},
            "api_keys": {"enabled": True},
        },
        plans={"starter": {}, "pro": {"upgrade_url": "https://example.com/pro"}},
        tenants=[{"id": "acme", "plan": "starter"}],
        routes=[{"name": "api", "match": {"path": "/**"}, "upstream": "app"}],
    )
    path = write_config(tmp_path / "gateway.yaml", config)
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN}
    migrated = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "migrate", "-c", str(path)],
        capture_output=True, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    first, second = GatewayProcess(path, env).start(), GatewayProcess(path, env).start()
    token = mint(SECRET, "HS256", ["org_id"], "acme", 600)
    figures = {}
    try:
        async with aiohttp.ClientSession() as client:

            async def on_second(headers: dict[str, str]) -> tuple[int, Any]:
                url = f"http://127.0.0.1:{second.port}/v1/things"
                async with client.get(url, headers=headers) as resp:
                    return resp.status, await resp.json(content_type=None)

            async def admin_on_first(method: str, path: str, body: Any = None) -> Any:
                url = f"http://127.0.0.1:{first.admin_port}{path}"
                headers = {"Authorization": f"Bearer {ADMIN}"}
                async with client.request(method, url, json=body, headers=headers) as resp:
                    assert resp.status in (200, 201), await resp.text()
                    return await resp.json()

            bearer = {"Authorization": f"Bearer {token}"}
            assert (await on_second(bearer))[0] == 200  # now cached for an hour

            await admin_on_first("PUT", "/admin/tenants/acme", {"status": "canceled"})

            async def refused() -> bool:
                return (await on_second(bearer))[0] == 402

            figures["status"] = await _until(refused, PROPAGATION_BOUND_S)

            await admin_on_first("PUT", "/admin/tenants/acme", {"plan": "pro"})

            async def on_pro() -> bool:
                status, body = await on_second(bearer)
                return status == 402 and body["plan"] == "pro"

            figures["plan"] = await _until(on_pro, PROPAGATION_BOUND_S)

            await admin_on_first("PUT", "/admin/tenants/acme", {"status": "active"})

            async def served() -> bool:
                return (await on_second(bearer))[0] == 200

            figures["reactivation"] = await _until(served, PROPAGATION_BOUND_S)

            created = await admin_on_first("POST", "/admin/tenants/acme/api-keys")
            with_key = {"X-API-Key": created["key"]}
            assert (await on_second(with_key))[0] == 200
            await admin_on_first("DELETE", f"/admin/api-keys/{created['prefix']}")

            async def key_refused() -> bool:
                return (await on_second(with_key))[0] == 401

            figures["key revocation"] = await _until(key_refused, PROPAGATION_BOUND_S)
    finally:
        codes = first.stop(), second.stop()
    print("\npropagation to the second process: " + ", ".join(
        f"{name} {seconds * 1000:.0f} ms" for name, seconds in figures.items()
    ))  # fmt: skip
    assert codes == (0, 0)
    assert all(seconds < PROPAGATION_BOUND_S for seconds in figures.values()), figures
