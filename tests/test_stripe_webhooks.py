"""Stripe webhooks on the public listener: signatures, replays, order, and their effect."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import stripe

from gateway.auth.jwt import mint
from gateway.invalidation import CHANNEL
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.fake_stripe import API_KEY, FakeStripe
from tests.procs import GatewayProcess, write_config
from tests.servers import PostgresServer, RedisServer
from tests.upstream import Upstream

SECRET = "webhook-test-jwt-secret-" + "w" * 40
WHSEC = "whsec_test_" + "s" * 32
OLD_WHSEC = "whsec_old_" + "o" * 32
HOOK = "/_gateway/stripe/webhook"
ADMIN = "webhook-test-admin-token"
PROPAGATION_BOUND_S = 1.0


def config(upstream: Upstream, fake_url: str, **storage: Any) -> dict[str, Any]:
    return gateway_config(
        upstream.url,
        storage=storage or {"ledger": "sqlite:///:memory:"},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "WEBHOOK_JWT_SECRET"}},
        plans={"starter": {}, "pro": {}},
        subscription={"allow": ["active", "trialing"], "grace": {"past_due": "3d"}},
        tenants=[{"id": "acme", "plan": "starter", "stripe_customer": "cus_acme"}],
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app"}],
        stripe={"api_base": fake_url, "prices": {"price_starter": "starter", "price_pro": "pro"},
                "tenant_metadata_key": "tenant_id"},
    )  # fmt: skip


def subscription_event(
    event_id: str, created: int, status: str, *, customer: str = "cus_acme",
    price: str = "price_starter", kind: str = "customer.subscription.updated",
    subscription: str = "sub_1", metadata: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "id": event_id, "object": "event", "type": kind, "created": created,
        "api_version": "2026-10-28.endive", "livemode": False,
        "data": {"object": {
            "id": subscription, "object": "subscription", "customer": customer,
            "status": status, "metadata": metadata or {},
            "items": {"object": "list", "data": [{
                "id": "si_1", "object": "subscription_item", "price": {"id": price},
                "current_period_start": 1_767_225_600, "current_period_end": 1_769_904_000,
            }]},
        }},
    }  # fmt: skip


def invoice_event(
    event_id: str, created: int, kind: str, subscription: str | None, customer: str = "cus_acme"
) -> dict[str, Any]:
    """An invoice event as the pinned API version shapes it (no parent: a one-off invoice)."""
    parent = None
    if subscription is not None:
        details = {"subscription": subscription, "metadata": {}}
        parent = {"type": "subscription_details", "subscription_details": details}
    return {
        "id": event_id, "object": "event", "type": kind, "created": created,
        "api_version": "2026-10-28.endive", "livemode": False,
        "data": {"object": {"id": f"in_{event_id}", "object": "invoice", "customer": customer,
                            "parent": parent}},
    }  # fmt: skip


def signed(event: dict[str, Any], secret: str = WHSEC, at: int | None = None) -> tuple[str, str]:
    body = json.dumps(event)
    return body, stripe.WebhookSignature.generate_signature_header(body, secret, at)


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = await FakeStripe().start()
    yield server
    await server.close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_JWT_SECRET", SECRET)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", f"{WHSEC},{OLD_WHSEC}")
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN)


async def post(port: int, body: str, signature: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{port}{HOOK}"
        async with client.post(url, data=body.encode(), headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def call(port: int, tenant: str = "acme") -> tuple[int, dict[str, str]]:
    token = mint(SECRET, "HS256", ["org_id"], tenant, 600)
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{port}/v1/things"
        async with client.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            return resp.status, dict(resp.headers)


async def tenant(gateway: Gateway, tenant_id: str = "acme") -> Any:
    """The tenant as the admin API shows it."""
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gateway.admin_port}/admin/tenants/{tenant_id}"
        async with client.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


@pytest.mark.usefixtures("env")
async def test_signatures_replays_and_order(
    upstream: Upstream, fake: FakeStripe, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, fake.url))
    now = int(time.time())
    event = subscription_event("evt_1", now, "past_due", price="price_pro")
    body, good = signed(event)
    # Bad signature, stale signature, no signature, another secret: 400, nothing changes.
    _, stale = signed(event, at=now - 600)
    for signature in (good.replace("v1=", "v1=00"), stale, None, signed(event, "whsec_x")[1]):
        status, answer = await post(gw.port, body, signature)
        assert status == 400, answer
        assert answer["type"].endswith("stripe-webhook")
    assert (await tenant(gw))["status"] == "active"
    # The rotated-out secret still verifies (both are configured).
    status, answer = await post(gw.port, body, signed(event, OLD_WHSEC)[1])
    assert (status, answer["result"]) == (200, "applied"), answer
    stored = await tenant(gw)
    assert (stored["status"], stored["plan"], stored["stripe_subscription"]) == (
        "past_due", "pro", "sub_1",
    )  # fmt: skip
    assert stored["billing_anchor"] == "2026-01-01T00:00:00Z"
    # A replay changes nothing, even after the state moved on.
    later = subscription_event("evt_2", now + 10, "active")
    assert (await post(gw.port, *signed(later)))[1]["result"] == "applied"
    assert (await post(gw.port, body, good))[1]["result"] == "duplicate"
    # An older event arriving late changes nothing.
    older = subscription_event("evt_0", now - 100, "canceled")
    assert (await post(gw.port, *signed(older)))[1]["result"] == "stale"
    stored = await tenant(gw)
    assert (stored["status"], stored["plan"]) == ("active", "starter")
    # Invoices: a failed payment starts the grace period, a paid one ends it.
    failed = invoice_event("evt_3", now + 20, "invoice.payment_failed", "sub_1")
    assert (await post(gw.port, *signed(failed)))[1]["result"] == "applied"
    status, headers = await call(gw.port)
    assert status == 200 and "grace ends" in headers["X-Quota-Warning"]
    paid = {**failed, "id": "evt_4", "type": "invoice.paid", "created": now + 30}
    assert (await post(gw.port, *signed(paid)))[1]["result"] == "applied"
    assert (await tenant(gw))["status"] == "active"
    # Another subscription of the customer ending does not cancel the tenant.
    other = subscription_event("evt_5", now + 40, "canceled", subscription="sub_old",
                               kind="customer.subscription.deleted")  # fmt: skip
    assert (await post(gw.port, *signed(other)))[1]["result"] == "ignored"
    assert (await tenant(gw))["status"] == "active"
    # Other event types are acknowledged and recorded, not applied.
    noise = {**failed, "id": "evt_6", "type": "charge.succeeded"}
    assert (await post(gw.port, *signed(noise)))[1]["result"] == "ignored"


@pytest.mark.usefixtures("env")
async def test_only_the_tenants_own_subscription_and_its_invoices_move_it(
    upstream: Upstream, fake: FakeStripe, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, fake.url))
    now = int(time.time())
    moments = iter(range(now, now + 100))

    async def result(event: dict[str, Any]) -> str:
        status, answer = await post(gw.port, *signed(event))
        assert status == 200, answer
        return str(answer["result"])

    async def state() -> tuple[str, str, str]:
        stored = await tenant(gw)
        return stored["status"], stored["plan"], stored["stripe_subscription"]

    def sub(status: str, subscription: str, kind: str = "customer.subscription.updated",
            price: str = "price_starter") -> dict[str, Any]:  # fmt: skip
        moment = next(moments)
        return subscription_event(f"evt_s{moment}", moment, status, kind=kind, price=price,
                                  subscription=subscription)  # fmt: skip

    def invoice(kind: str, subscription: str | None) -> dict[str, Any]:
        moment = next(moments)
        return invoice_event(f"evt_i{moment}", moment, kind, subscription)

    failed, paid = "invoice.payment_failed", "invoice.paid"
    assert await result(sub("active", "sub_1", "customer.subscription.created")) == "applied"
    # An add-on subscription's changes leave the tenant's status, plan and subscription.
    assert await result(sub("past_due", "sub_addon", price="price_pro")) == "ignored"
    assert await state() == ("active", "starter", "sub_1")
    # A failed one-off invoice, or one of the add-on, gates nothing.
    assert await result(invoice(failed, None)) == "ignored"
    assert await result(invoice(failed, "sub_addon")) == "ignored"
    assert await state() == ("active", "starter", "sub_1")
    assert await result(invoice(failed, "sub_1")) == "applied"
    assert (await state())[0] == "past_due"
    # Nor does paying them end the grace period: only the subscription's own invoice.
    assert await result(invoice(paid, None)) == "ignored"
    assert await result(invoice(paid, "sub_addon")) == "ignored"
    assert (await state())[0] == "past_due"
    assert await result(invoice(paid, "sub_1")) == "applied"
    assert (await state())[0] == "active"
    # Once the tenant's subscription has ended, a new one takes its place.
    assert await result(sub("canceled", "sub_1", "customer.subscription.deleted")) == "applied"
    assert await result(sub("canceled", "sub_addon", "customer.subscription.deleted")) == (
        "ignored"
    )
    assert await state() == ("canceled", "starter", "sub_1")
    assert await result(sub("active", "sub_2", "customer.subscription.created", "price_pro")) == (
        "applied"
    )
    assert await state() == ("active", "pro", "sub_2")


@pytest.mark.usefixtures("env")
async def test_a_change_not_announced_is_answered_503_and_announced_on_the_retry(
    upstream: Upstream, fake: FakeStripe, make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    data = config(upstream, fake.url, counters=redis_server.url, ledger="sqlite:///:memory:")
    gw = await make_gateway(data)
    event = subscription_event("evt_p", int(time.time()), "past_due")
    redis_server.stop()  # the bus is down: the other processes cannot be told
    status, answer = await post(gw.port, *signed(event))
    assert status == 503, answer
    assert (await tenant(gw))["status"] == "past_due"  # applied all the same
    redis_server.start()
    listener = aioredis.Redis.from_url(redis_server.url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(CHANNEL)
        status, answer = await post(gw.port, *signed(event))  # Stripe's retry
        assert (status, answer["result"]) == (200, "duplicate"), answer
        deadline = time.monotonic() + 10
        message = None
        while message is None:  # a skipped subscribe confirmation reads as None too
            assert time.monotonic() < deadline, "the retry was not announced"
            message = await pubsub.get_message(timeout=1)
        assert message["data"] == b"tenant:acme"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()


@pytest.mark.usefixtures("env")
async def test_a_new_customer_naming_a_tenant_creates_it_and_others_are_counted(
    upstream: Upstream, fake: FakeStripe, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(config(upstream, fake.url))
    now = int(time.time())
    fake.add_customer("cus_new", {"tenant_id": "newco"})
    created = subscription_event("evt_10", now, "trialing", customer="cus_new",
                                 kind="customer.subscription.created")  # fmt: skip
    status, answer = await post(gw.port, *signed(created))
    assert (status, answer["result"], answer["tenant"]) == (200, "applied", "newco")
    stored = await tenant(gw, "newco")
    assert (stored["status"], stored["plan"], stored["stripe_customer"]) == (
        "trialing", "starter", "cus_new",
    )  # fmt: skip
    assert (await call(gw.port, "newco"))[0] == 200
    fake.add_customer("cus_anon")
    anonymous = subscription_event("evt_11", now, "active", customer="cus_anon")
    status, answer = await post(gw.port, *signed(anonymous))
    assert (status, answer["result"]) == (200, "unmapped")
    metrics = gw.registry.get_sample_value(
        "gateway_stripe_webhooks_total", {"type": "customer.subscription.updated",
                                          "result": "unmapped"}
    )  # fmt: skip
    assert metrics == 1


async def test_status_changes_reach_a_two_process_gateway_within_a_second(
    upstream: Upstream, fake: FakeStripe, redis_server: RedisServer,
    postgres_server: PostgresServer, tmp_path: Path,
) -> None:  # fmt: skip
    data = config(upstream, fake.url, counters=redis_server.url, ledger=postgres_server.dsn,
                  cache_ttl_s=3600)  # fmt: skip
    path = write_config(tmp_path / "gateway.yaml", data)
    env = {"WEBHOOK_JWT_SECRET": SECRET, "STRIPE_WEBHOOK_SECRET": WHSEC,
           "STRIPE_API_KEY": API_KEY}  # fmt: skip
    migrated = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "migrate", "-c", str(path)],
        capture_output=True, text=True, env={**os.environ, **env},
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    first, second = await asyncio.gather(
        asyncio.to_thread(GatewayProcess(path, env).start),
        asyncio.to_thread(GatewayProcess(path, env).start),
    )
    figures = {}
    try:
        for gw in (first, second):
            assert (await call(gw.port))[0] == 200  # cached for an hour from now on
        now = int(time.time())
        started = time.perf_counter()
        status, _ = await post(first.port, *signed(subscription_event("evt_a", now, "past_due")))
        assert status == 200

        async def warned(port: int) -> bool:
            status, headers = await call(port)
            return status == 200 and "subscription past_due" in headers.get("X-Quota-Warning", "")

        while not all([await warned(first.port), await warned(second.port)]):
            assert time.perf_counter() - started < 2 * PROPAGATION_BOUND_S
            await asyncio.sleep(0.01)
        figures["past_due"] = time.perf_counter() - started
        # A bad signature and a late older event change nothing.
        bad_body, good_sig = signed(subscription_event("evt_b", now + 1, "canceled"))
        assert (await post(second.port, bad_body, good_sig.replace("v1=", "v1=ff")))[0] == 400
        late = subscription_event("evt_c", now - 50, "active")
        assert (await post(second.port, *signed(late)))[1]["result"] == "stale"
        assert await warned(first.port) and await warned(second.port)
        started = time.perf_counter()
        canceled = subscription_event("evt_d", now + 2, "canceled",
                                      kind="customer.subscription.deleted")  # fmt: skip
        assert (await post(second.port, *signed(canceled)))[0] == 200
        while [(await call(gw.port))[0] for gw in (first, second)] != [402, 402]:
            assert time.perf_counter() - started < 2 * PROPAGATION_BOUND_S
            await asyncio.sleep(0.01)
        figures["canceled"] = time.perf_counter() - started
        # Replaying the past_due event changes nothing.
        assert (await post(first.port, *signed(subscription_event("evt_a", now, "past_due"))))[1][
            "result"
        ] == "duplicate"
        assert [(await call(gw.port))[0] for gw in (first, second)] == [402, 402]
    finally:
        codes = first.stop(), second.stop()
    print("\nwebhook to both processes: " + ", ".join(
        f"{name} {seconds * 1000:.0f} ms" for name, seconds in figures.items()
    ))  # fmt: skip
    assert codes == (0, 0)
    assert all(seconds < PROPAGATION_BOUND_S for seconds in figures.values()), figures


@pytest.mark.usefixtures("env")
async def test_the_embedded_gateway_reports_its_own_usage(
    upstream: Upstream, fake: FakeStripe, make_gateway: MakeGateway, tmp_path: Path
) -> None:
    data = config(upstream, fake.url, ledger=f"sqlite:///{tmp_path / 'ledger.db'}")
    data["meters"] = {"api_calls": {"type": "counter"}}
    data["routes"][0]["charge"] = {"api_calls": 1}
    data["stripe"].update({"meter_events": {"api_calls": "calls"}, "report_interval_s": 0.1})
    data["usage"] = {"flush_interval_ms": 20}
    fake.add_customer("cus_acme")
    fake.add_meter("calls")
    gw = await make_gateway(data)
    statuses = [(await call(gw.port))[0] for _ in range(20)]
    assert statuses == [200] * 20
    deadline = time.monotonic() + 10
    while fake.totals() != {("cus_acme", "calls"): 20}:
        assert time.monotonic() < deadline, fake.totals()
        await asyncio.sleep(0.05)


async def test_stripe_sync_applies_every_current_subscription(
    upstream: Upstream, fake: FakeStripe, tmp_path: Path
) -> None:
    ledger_file = tmp_path / "ledger.db"
    path = write_config(tmp_path / "gateway.yaml",
                        config(upstream, fake.url, ledger=f"sqlite:///{ledger_file}"))  # fmt: skip
    env = {**os.environ, "STRIPE_API_KEY": API_KEY, "STRIPE_WEBHOOK_SECRET": WHSEC}
    fake.add_customer("cus_new", {"tenant_id": "newco"})
    for sub_id, customer, status, created in (
        ("sub_old", "cus_acme", "canceled", 100), ("sub_1", "cus_acme", "past_due", 200),
        ("sub_2", "cus_new", "active", 300),
    ):  # fmt: skip
        fake.subscriptions[sub_id] = {
            **subscription_event("x", 0, status, customer=customer, subscription=sub_id)["data"][
                "object"
            ],
            "created": created,
        }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(path)],
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip

    assert run("migrate").returncode == 0
    put = ["tenants", "-c", str(path), "put", "acme", "--plan", "starter",
           "--stripe-customer", "cus_acme"]  # fmt: skip
    seeded = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", *put], env=env, timeout=60
    )
    assert seeded.returncode == 0
    synced = await asyncio.to_thread(run, "stripe", "sync")
    assert synced.returncode == 0, synced.stderr
    assert "2 applied" in synced.stdout, synced.stdout
    shown = await asyncio.to_thread(subprocess.run,
        [sys.executable, "-m", "gateway", "tenants", "-c", str(path), "list"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    tenants = {t["id"]: t for t in json.loads(shown.stdout)}
    assert (tenants["acme"]["status"], tenants["acme"]["stripe_subscription"]) == (
        "past_due", "sub_1",
    )  # fmt: skip
    assert (tenants["newco"]["status"], tenants["newco"]["plan"]) == ("active", "starter")


async def test_two_seed_tenants_with_one_customer_are_refused_by_name(
    upstream: Upstream, make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.services import StartupError

    monkeypatch.setenv("WEBHOOK_JWT_SECRET", SECRET)
    data = config(upstream, "http://127.0.0.1:9")
    del data["stripe"]
    data["tenants"].append({"id": "copy", "plan": "starter", "stripe_customer": "cus_acme"})
    with pytest.raises(StartupError) as refused:
        await make_gateway(data)
    assert str(refused.value) == (
        "tenants[1].stripe_customer: cus_acme already belongs to tenant acme"
    )
