"""Quotas through a running gateway: 402, 429, warnings, settlement, failure policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.app_keys import LIVE, QUOTA
from gateway.auth.jwt import mint
from gateway.quota.engine import QuotaEngine
from gateway.quota.periods import periods_around
from gateway.quota.redis_store import RedisStore
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.servers import RedisServer
from tests.upstream import Upstream
from tests.waiting import eventually

SECRET = "quota-test-secret-" + "k" * 40


def quota_config(upstream: Upstream, tmp_path: Path, **storage: Any) -> dict[str, Any]:
    return gateway_config(
        upstream.url,
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}", **storage},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "QUOTA_JWT_SECRET"}},
        billing={"upgrade_url": "https://example.com/billing"},
        meters={
            "api_calls": {"type": "counter", "period": "billing_cycle"},
            "tokens": {"type": "counter", "from_response_header": "X-Usage-Tokens"},
            "team_members": {"type": "gauge"},
        },
        plans={
            "starter": {
                "limits": {
                    "api_calls": {"limit": 6, "warn_at": [0.5]},
                    "tokens": {"limit": 100},
                    "team_members": {"limit": 2},
                },
            },
            "soft": {"limits": {"api_calls": {"limit": 2, "enforcement": "soft"}}},
            "throttled": {"rate_limits": [{"name": "per_second", "rate": 2, "burst": 2}]},
        },
        tenants=[
            {"id": "acme", "plan": "starter"},
            {"id": "beta", "plan": "soft"},
            {"id": "gamma", "plan": "throttled"},
        ],
        routes=[
            {"name": "add-member", "match": {"methods": ["POST"], "path": "/v1/members"},
             "upstream": "app", "charge": {"api_calls": 1, "team_members": 1}},
            {"name": "remove-member", "match": {"methods": ["DELETE"], "path": "/v1/respond/{id}"},
             "upstream": "app", "charge": {"api_calls": 1, "team_members": -1}},
            {"name": "invite", "match": {"methods": ["POST"], "path": "/v1/respond/invite"},
             "upstream": "app", "charge": {"api_calls": 1, "team_members": 1},
             "charge_on": "not_server_error"},
            {"name": "completions", "match": {"methods": ["POST"], "path": "/v1/respond/complete"},
             "upstream": "app", "charge": {"api_calls": 1, "tokens": "response"}},
            {"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
             "charge": {"api_calls": 1}},
        ],
    )  # fmt: skip


@pytest.fixture
async def gateway(
    upstream: Upstream, tmp_path: Path, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> Gateway:
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "quota-admin")
    return await make_gateway(quota_config(upstream, tmp_path))


RedisGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def redis_gateway(
    upstream: Upstream,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
) -> RedisGateway:
    """A gateway whose counters live in the test's private Redis (timeout 50 ms)."""
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)

    async def make(**storage: Any) -> Gateway:
        return await make_gateway(
            quota_config(upstream, tmp_path, counters=redis_server.url, timeout_ms=50, **storage)
        )

    return make


def quota_engine(gw: Gateway) -> QuotaEngine:
    """`gw`'s quota engine: no API shows the writes it still has to make."""
    assert gw.app is not None
    return gw.app[QUOTA]


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def call(
    gw: Gateway, tenant: str, method: str = "GET", path: str = "/v1/things"
) -> tuple[int, Any, Any]:
    token = mint(SECRET, "HS256", ["org_id"], tenant, 600)
    async with aiohttp.ClientSession() as client:
        async with client.request(
            method, f"http://127.0.0.1:{gw.port}{path}",
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:  # fmt: skip
            return resp.status, resp.headers, await resp.json(content_type=None)


async def test_a_hard_quota_answers_402_past_the_limit(
    gateway: Gateway, upstream: Upstream
) -> None:
    answers = [await call(gateway, "acme") for _ in range(7)]
    assert [status for status, _, _ in answers] == [200] * 6 + [402]
    _, headers, _ = answers[0]
    assert headers["RateLimit-Policy"].startswith('"api_calls";q=6;w=')
    assert headers["RateLimit"].startswith('"api_calls";r=5;t=')
    assert "X-Quota-Warning" not in headers
    assert answers[2][1].getall("X-Quota-Warning") == ["api_calls 50%"]
    status, headers, body = answers[6]
    assert body["type"].endswith(":quota-exhausted")
    assert (body["meter"], body["limit"], body["used"]) == ("api_calls", 6, 6)
    assert body["upgrade_url"] == "https://example.com/billing"
    assert body["reset_at"].endswith("Z") and int(headers["Retry-After"]) > 0
    # DESIGN 6a: the refusal carries both fields, the refusing quota at r=0.
    assert headers["RateLimit-Policy"].startswith('"api_calls";q=6;w=')
    assert headers["RateLimit"] == f'"api_calls";r=0;t={headers["Retry-After"]}'
    assert len(upstream.seen) == 6  # the refused request never reached the upstream


async def test_failed_responses_are_refunded(gateway: Gateway, upstream: Upstream) -> None:
    for _ in range(4):
        status, _, _ = await call(gateway, "acme", path="/v1/respond/x?status=503")
        assert status == 503
    statuses = [(await call(gateway, "acme"))[0] for _ in range(7)]
    assert statuses == [200] * 6 + [402]  # the four 503s cost nothing


async def test_gauges_rise_before_and_fall_after_success(gateway: Gateway) -> None:
    assert (await call(gateway, "acme", "POST", "/v1/members"))[0] == 200
    assert (await call(gateway, "acme", "POST", "/v1/members"))[0] == 200
    status, headers, body = await call(gateway, "acme", "POST", "/v1/members")
    assert (status, body["meter"]) == (402, "team_members")
    assert "Retry-After" not in headers  # waiting frees no seat
    # A removal that fails upstream does not lower the gauge...
    assert (await call(gateway, "acme", "DELETE", "/v1/respond/7?status=404"))[0] == 404
    assert (await call(gateway, "acme", "POST", "/v1/members"))[0] == 402
    # ...one that succeeds does.
    assert (await call(gateway, "acme", "DELETE", "/v1/respond/7"))[0] == 200
    assert (await call(gateway, "acme", "POST", "/v1/members"))[0] == 200


async def test_response_quantities_pass_a_hard_limit_by_one_response_at_most(
    gateway: Gateway,
) -> None:
    path = "/v1/respond/complete?tokens=60"
    assert (await call(gateway, "acme", "POST", path))[0] == 200  # 60 of 100
    assert (await call(gateway, "acme", "POST", path))[0] == 200  # 120: charged, over by one
    status, _, body = await call(gateway, "acme", "POST", path)
    assert (status, body["meter"], body["used"]) == (402, "tokens", 120)


async def test_soft_quotas_allow_overage_with_a_warning(gateway: Gateway) -> None:
    answers = [await call(gateway, "beta") for _ in range(4)]
    assert [status for status, _, _ in answers] == [200] * 4
    assert answers[3][1].getall("X-Quota-Warning") == ["api_calls 200% (overage)"]
    assert "RateLimit-Policy" not in answers[0][1]  # soft quotas are not advertised


async def test_rate_limits_answer_429_with_retry_after(gateway: Gateway) -> None:
    answers = [await call(gateway, "gamma") for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    status, headers, body = answers[2]
    assert body["type"].endswith(":rate-limited") and headers["Retry-After"] == "1"
    assert headers["RateLimit-Policy"] == '"per_second";q=2;w=1'
    assert headers["RateLimit"] == '"per_second";r=0;t=1'


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
@pytest.mark.parametrize("failure", ["stopped", "paused"])
async def test_failure_policy_answers_within_the_timeout(
    redis_gateway: RedisGateway, redis_server: RedisServer, policy: str, failure: str
) -> None:
    gw = await redis_gateway(on_counter_store_error=policy)
    assert (await call(gw, "acme"))[0] == 200
    if failure == "paused":
        redis_server.pause()
    else:
        redis_server.stop()
    try:
        started = time.perf_counter()
        status, _, body = await call(gw, "acme")
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        if failure == "paused":
            redis_server.resume()
    print(f"\n{policy}, Redis {failure}: {status} after {elapsed_ms:.0f} ms (timeout 50 ms)")
    seen = (status, body, round(elapsed_ms))
    if policy == "fail_closed":
        assert status == 503 and body["type"].endswith(":counter-store-unavailable"), seen
    else:
        assert status == 200, seen
    # The timeout plus a generous margin: a slow CI machine must not fail this,
    # a gateway that waits for Redis (seconds, or forever) must.
    assert elapsed_ms < 50 + 950, seen


async def test_fail_open_charges_reach_the_store_once_it_is_back(
    upstream: Upstream,
    tmp_path: Path,
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
) -> None:
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)
    gw = await make_gateway(
        quota_config(
            upstream, tmp_path,
            counters=redis_server.url, timeout_ms=50, on_counter_store_error="fail_open",
        )
    )  # fmt: skip
    assert (await call(gw, "acme"))[0] == 200
    redis_server.stop()
    assert [(await call(gw, "acme"))[0] for _ in range(3)] == [200, 200, 200]
    redis_server.start()  # with its data (AOF)
    store = await RedisStore.open(redis_server.url, 16, 500)
    try:
        period = periods_around("billing_cycle", datetime.now(UTC))[1]
        await eventually(lambda: _is(store.level("acme", "api_calls", period), 4))
    finally:
        await store.close()
    # And the quota counts them: 4 used, 2 left of 6.
    assert [(await call(gw, "acme"))[0] for _ in range(3)] == [200, 200, 402]


async def admin(gw: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.request(
            method, f"http://127.0.0.1:{gw.admin_port}{path}", json=body,
            headers={"Authorization": "Bearer quota-admin"},
        ) as resp:  # fmt: skip
            return resp.status, await resp.json(content_type=None)


async def test_usage_view_gauges_and_resets(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(4):
        assert (await call(gateway, "acme"))[0] == 200
    status, view = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    assert status == 200
    assert (view["tenant"], view["plan"], view["status"]) == ("acme", "starter", "active")
    calls = view["meters"]["api_calls"]
    assert (calls["used"], calls["limit"], calls["remaining"], calls["state"]) == (
        4, 6, 2, "warning"
    )  # fmt: skip
    assert calls["period"] == view["period"]  # a billing_cycle counter
    assert view["meters"]["team_members"]["period"] is None
    # The tenant sees the same through the public listener.
    status, _, own = await call(gateway, "acme", path="/_gateway/usage")
    assert (status, own["meters"]["api_calls"]["used"]) == (200, 4)
    status, set_view = await admin(
        gateway, "PUT", "/admin/tenants/acme/gauges/team_members", {"value": 2}
    )
    assert (status, set_view["meters"]["team_members"]["state"]) == (200, "exhausted")
    assert (await call(gateway, "acme", "POST", "/v1/members"))[0] == 402
    status, reset = await admin(gateway, "POST", "/admin/tenants/acme/meters/api_calls/reset")
    assert (status, reset["meters"]["api_calls"]["used"]) == (200, 0)
    bad = await admin(gateway, "PUT", "/admin/tenants/acme/gauges/api_calls", {"value": 1})
    assert bad[0] == 422
    assert (await admin(gateway, "GET", "/admin/tenants/ghost/usage"))[0] == 404
    assert (await admin(gateway, "POST", "/admin/tenants/acme/meters/nope/reset"))[0] == 404


async def idempotent_post(
    gw: Gateway, key: str, body: bytes, path: str = "/v1/things"
) -> tuple[int, Any, Any]:
    token = mint(SECRET, "HS256", ["org_id"], "acme", 600)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"http://127.0.0.1:{gw.port}{path}", data=body,
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        ) as resp:  # fmt: skip
            return resp.status, resp.headers, await resp.json(content_type=None)


async def test_idempotency_key_replays_once_and_refuses_another_payload(
    gateway: Gateway, upstream: Upstream
) -> None:
    first = await idempotent_post(gateway, "order-1", b'{"amount": 10}')
    again = await idempotent_post(gateway, "order-1", b'{"amount": 10}')
    assert first[0] == again[0] == 200
    assert again[2] == first[2] and again[1]["Idempotent-Replayed"] == "true"
    assert [s.body for s in upstream.seen] == [b'{"amount": 10}']  # the upstream saw it once
    other = await idempotent_post(gateway, "order-1", b'{"amount": 99}')
    assert (other[0], other[2]["type"].rsplit(":", 1)[1]) == (422, "idempotency-key-reused")
    assert len(upstream.seen) == 1  # and never saw the other payload
    _, view = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    assert view["meters"]["api_calls"]["used"] == 1  # the replay was not charged


async def test_idempotency_key_in_flight_and_unstorable_answers(
    gateway: Gateway, upstream: Upstream
) -> None:
    # The gateway claims the key before it forwards, so once the upstream has the
    # request the key is in flight, for the delay: ample for the second request.
    slow_path = "/v1/respond/s?delay=2"
    slow = asyncio.create_task(idempotent_post(gateway, "k-slow", b"{}", slow_path))
    await eventually(lambda: slow_path in upstream.arrived)
    status, _, body = await idempotent_post(gateway, "k-slow", b"{}", slow_path)
    assert (status, body["type"].rsplit(":", 1)[1]) == (409, "idempotency-key-in-flight")
    await slow
    # A 5xx is not stored: the retry is forwarded (and charged) again.
    for _ in range(2):
        status, _, _ = await idempotent_post(gateway, "k-fail", b"{}", "/v1/respond/x?status=503")
        assert status == 503
    assert sum(1 for s in upstream.seen if s.raw_path.startswith("/v1/respond/x")) == 2


async def test_an_unexpected_failure_while_forwarding_settles_and_releases_the_key(
    gateway: Gateway, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the forward")

    assert gateway.app is not None
    monkeypatch.setattr(gateway.app[LIVE].runtime.forwarder, "forward", broken)
    assert (await idempotent_post(gateway, "k-bug", b"{}"))[0] == 500
    monkeypatch.undo()
    # Nothing was served: the charge is refunded and the key released, so the
    # retry is forwarded (not answered 409 for minutes) and charged once.
    assert (await idempotent_post(gateway, "k-bug", b"{}"))[0] == 200
    _, view = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    assert view["meters"]["api_calls"]["used"] == 1
    assert len(upstream.seen) == 1


async def test_a_request_refused_503_is_never_charged_even_if_its_check_runs_late(
    redis_gateway: RedisGateway, redis_server: RedisServer
) -> None:
    gw = await redis_gateway()
    assert (await call(gw, "acme"))[0] == 200
    redis_server.pause()  # the next check is sent, and stalls in Redis
    try:
        assert (await call(gw, "acme"))[0] == 503
    finally:
        redis_server.resume()  # the stalled check now runs and charges...
    store = await RedisStore.open(redis_server.url, 16, 500)
    try:
        period = periods_around("billing_cycle", datetime.now(UTC))[1]
        # ...and the void undoes it, or, if it reaches Redis first, stops it.
        await eventually(lambda: len(quota_engine(gw).pending) == 0)
        assert await store.level("acme", "api_calls", period) == 1
    finally:
        await store.close()


async def test_answered_requests_leave_no_memo_in_redis(
    redis_gateway: RedisGateway, redis_server: RedisServer
) -> None:
    # A memo only serves a call whose answer was lost: kept for every request for
    # MEMO_TTL_MS, they would hold Redis's memory in proportion to the traffic.
    gw = await redis_gateway()
    assert (await call(gw, "acme", "GET", "/v1/respond/x?status=500"))[0] == 500  # refunded
    statuses = [(await call(gw, "acme"))[0] for _ in range(7)]
    assert statuses == [200] * 6 + [402]
    assert (await call(gw, "beta"))[0] == 200  # its round deletes the memos before it
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        memos = [key async for key in client.scan_iter(match="q:*:m:*")]
    finally:
        await client.aclose()
    assert [key.decode().rsplit(":", 2)[1] for key in memos] == ["beta"]


async def test_a_plan_change_keeps_the_usage_and_applies_the_new_limits_at_once(
    gateway: Gateway,
) -> None:
    for _ in range(4):
        assert (await call(gateway, "acme"))[0] == 200  # 4 of starter's 6
    status, tenant = await admin(gateway, "PUT", "/admin/tenants/acme", {"plan": "soft"})
    assert (status, tenant["plan"]) == (200, "soft")
    status, headers, _ = await call(gateway, "acme")  # soft: 2, used 4 -> overage
    assert status == 200
    assert headers.getall("X-Quota-Warning") == ["api_calls 250% (overage)"]
    await admin(gateway, "PUT", "/admin/tenants/acme", {"plan": "starter"})
    statuses = [(await call(gateway, "acme"))[0] for _ in range(2)]
    assert statuses == [200, 402]  # 5 used, the 6th allowed, then starter's hard limit


async def test_a_failed_gauge_increase_is_refunded_whatever_charge_on_keeps(
    gateway: Gateway,
) -> None:
    for _ in range(3):  # "already a member": the counter charge is kept, the gauge is not
        assert (await call(gateway, "acme", "POST", "/v1/respond/invite?status=409"))[0] == 409
    _, view = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    assert (view["meters"]["team_members"]["used"], view["meters"]["api_calls"]["used"]) == (0, 3)


async def test_idempotency_keys_are_served_under_fail_open_with_the_store_down(
    redis_gateway: RedisGateway, redis_server: RedisServer
) -> None:
    gw = await redis_gateway(on_counter_store_error="fail_open")
    redis_server.stop()
    status, headers, _ = await idempotent_post(gw, "pay-1", b'{"amount": 5}')
    assert status == 200 and "Idempotent-Replayed" not in headers
