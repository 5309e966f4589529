"""Tenant signals: decided from a charge's answer, written once to the ledger, delivered
as signed webhooks exactly once per tenant, meter, threshold and period."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from gateway.auth.jwt import mint
from gateway.clock import to_us
from gateway.config.models import NotificationsConfig, WebhookConfig
from gateway.ledger.store import Ledger
from gateway.quota.periods import Period
from gateway.quota.plan import MeterCharge
from gateway.quota.rules import Decision, MeterLimit
from gateway.quota.store import ChargeRequest, ChargeResult
from gateway.services import StartupError
from gateway.signals.crossings import (
    EXHAUSTED,
    OVERAGE_STARTED,
    THRESHOLD_CROSSED,
    Signal,
    crossings,
)
from gateway.signals.notifier import endpoints, retry_delay_s
from gateway.signals.store import SignalStore
from tests.conftest import gateway_config
from tests.procs import GatewayProcess, WorkerProcess, write_config
from tests.servers import PostgresServer, RedisServer
from tests.test_auth_gateway import ADMIN_TOKEN, admin
from tests.upstream import Upstream
from tests.waiting import eventually

SECRET = "whsec_" + "c2lnbmFscy10ZXN0LXNlY3JldC0xMjM0NTY3ODkw"  # base64 of 30 bytes
JAN = Period(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))
NOW_US = to_us(datetime(2026, 1, 15, tzinfo=UTC))


def charge(
    limit: MeterLimit, before: int, cost: int, credit: int = 0
) -> tuple[ChargeRequest, ChargeResult]:
    meter = MeterCharge(limit, cost, periods=(JAN,), credits=(credit,) if credit else ())
    request = ChargeRequest("acme", "r1", (meter,))
    decision = Decision(None, used_after={limit.meter: before + cost})
    return request, ChargeResult(decision, NOW_US, {limit.meter: JAN})


def kinds(limit: MeterLimit, before: int, cost: int, credit: int = 0) -> list[tuple[str, Any]]:
    return [(s.type, s.threshold) for s in crossings(*charge(limit, before, cost, credit))]


HARD = MeterLimit("calls", "counter", 100, True, (0.5, 0.8))
SOFT = MeterLimit("calls", "counter", 100, False, (0.8,))


@pytest.mark.parametrize(
    ("limit", "before", "cost", "credit", "expected"),
    [
        (HARD, 10, 1, 0, []),
        (HARD, 49, 1, 0, [(THRESHOLD_CROSSED, 0.5)]),
        (HARD, 50, 1, 0, []),  # already past 50%: the charge that crossed it said so
        (HARD, 40, 45, 0, [(THRESHOLD_CROSSED, 0.5), (THRESHOLD_CROSSED, 0.8)]),
        (HARD, 99, 1, 0, [(EXHAUSTED, None)]),
        (HARD, 79, 21, 0, [(THRESHOLD_CROSSED, 0.8), (EXHAUSTED, None)]),
        (HARD, 99, 1, 100, [(THRESHOLD_CROSSED, 0.5)]),  # credited to 200: 100 is half
        (SOFT, 100, 1, 0, [(OVERAGE_STARTED, None)]),
        (SOFT, 101, 5, 0, []),
        (SOFT, 99, 1, 0, []),  # at the limit, not over it
        (MeterLimit("calls", "counter", -1, True, (0.8,)), 10**9, 1, 0, []),  # unlimited
        (MeterLimit("calls", "counter", 0, True, (0.8,)), 0, 1, 0, []),
        (HARD, 79, 0, 0, []),  # a meter this route does not charge
    ],
)
def test_crossings_from_the_charge_answer(
    limit: MeterLimit, before: int, cost: int, credit: int, expected: list[tuple[str, Any]]
) -> None:
    assert kinds(limit, before, cost, credit) == expected


def test_a_signal_id_names_what_it_is_about() -> None:
    a = Signal(THRESHOLD_CROSSED, "acme", "calls", JAN, 80, 100, NOW_US, 0.8)
    assert a.id == Signal(THRESHOLD_CROSSED, "acme", "calls", JAN, 85, 100, NOW_US + 5, 0.8).id
    feb = Period(JAN.end, datetime(2026, 3, 1, tzinfo=UTC))
    others = [
        Signal(THRESHOLD_CROSSED, "acme", "calls", feb, 80, 100, NOW_US, 0.8),
        Signal(THRESHOLD_CROSSED, "acme", "calls", JAN, 80, 100, NOW_US, 0.5),
        Signal(THRESHOLD_CROSSED, "other", "calls", JAN, 80, 100, NOW_US, 0.8),
        Signal(EXHAUSTED, "acme", "calls", JAN, 100, 100, NOW_US),
    ]
    assert len({a.id, *(s.id for s in others)}) == 5


def test_a_missing_or_malformed_secret_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    config = NotificationsConfig(
        webhooks=[WebhookConfig(url="http://127.0.0.1:1/hook", secret_env="HOOK_SECRET")]
    )
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    with pytest.raises(StartupError, match=r"notifications.webhooks\[0\].secret_env: .*not set"):
        endpoints(config)
    monkeypatch.setenv("HOOK_SECRET", "whsec_")
    with pytest.raises(StartupError, match="not a Standard Webhooks secret"):
        endpoints(config)


def test_retries_back_off_up_to_the_stated_interval() -> None:
    assert 0.5 <= retry_delay_s(1, 60) <= 1
    assert 4 <= retry_delay_s(4, 60) <= 8
    assert 30 <= retry_delay_s(40, 60) <= 60


async def test_the_ledger_keeps_one_signal_and_leases_each_notification_once(
    ledger: Ledger,
) -> None:
    store = SignalStore(ledger.db)
    now = datetime(2026, 1, 15, tzinfo=UTC)
    signal = Signal(THRESHOLD_CROSSED, "acme", "calls", JAN, 80, 100, NOW_US, 0.8)
    again = Signal(THRESHOLD_CROSSED, "acme", "calls", JAN, 81, 100, NOW_US + 9, 0.8)
    hooks = ["http://a/hook", "http://b/hook"]
    assert await store.record([(signal, hooks)], now) == [signal]
    assert await store.record([(again, hooks)], now) == []
    first = await store.claim("w1", now, 60, 10)
    assert {(d.signal_id, d.endpoint, d.attempts) for d in first} == {
        (signal.id, "http://a/hook", 1),
        (signal.id, "http://b/hook", 1),
    }
    assert first[0].payload == signal.payload()
    assert await store.claim("w2", now, 60, 10) == []  # leased to w1
    a, b = sorted(first, key=lambda d: d.endpoint)
    await store.delivered(a, "w1", now)
    await store.retry(b, "w1", now + timedelta(seconds=30), "answered 500")
    assert await store.claim("w2", now + timedelta(seconds=10), 60, 10) == []
    later = await store.claim("w2", now + timedelta(seconds=31), 60, 10)
    assert [(d.endpoint, d.attempts) for d in later] == [("http://b/hook", 2)]
    await store.dead(later[0], "w2", "gave up")
    assert await store.counts() == {"delivered": 1, "dead": 1}
    assert await store.requeue(signal.id, "http://b/hook", now)
    assert await store.counts() == {"delivered": 1, "pending": 1}
    # A lease that ran out (its worker died) is taken over.
    taken = await store.claim("w3", now, 60, 10)
    assert await store.claim("w4", now + timedelta(seconds=61), 60, 10) != []
    assert taken


PAYLOAD_SCHEMA = json.loads(
    (Path(__file__).parent.parent / "config" / "notification.schema.json").read_text()
)


def valid_payload(payload: Any) -> None:
    """A notification body as `config/notification.schema.json` documents it."""
    jsonschema.Draft202012Validator(PAYLOAD_SCHEMA).validate(payload)


def test_every_quota_signal_has_the_documented_shape() -> None:
    limits = [(HARD, 79, 21), (SOFT, 100, 1), (MeterLimit("seats", "gauge", 5, True), 4, 1)]
    for limit, before, cost in limits:
        for signal in crossings(*charge(limit, before, cost)):
            valid_payload(json.loads(signal.payload()))
    with pytest.raises(jsonschema.ValidationError):
        valid_payload({"type": "quota.exhausted", "timestamp": "x", "data": {"tenant": "a"}})


class Receiver:
    """The SaaS team's endpoint: answers 500 until `healthy_at`, records every request."""

    def __init__(self) -> None:
        self.healthy_at = 0.0
        self.requests: list[tuple[int, dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 500 if time.monotonic() < self.healthy_at else 204
        self.requests.append((status, dict(request.headers), body))
        return web.Response(status=status)

    def delivered(self) -> list[dict[str, Any]]:
        """The verified payloads the receiver accepted."""
        verifier = Webhook(SECRET)
        out = []
        for status, headers, body in self.requests:
            if status == 204:
                payload = verifier.verify(body, headers)
                valid_payload(payload)
                assert payload["type"] and headers["webhook-id"].startswith("sig_")
                out.append(payload)
        return out

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_notifications_from_two_processes_arrive_exactly_once_after_an_outage(
    upstream: Upstream, tmp_path: Path
) -> None:
    receiver = await Receiver().start()
    receiver.healthy_at = time.monotonic() + 30
    redis, postgres = RedisServer().start(), PostgresServer().start()
    jwt_secret = "signals-jwt-secret-" + "s" * 40
    data = gateway_config(
        upstream.url,
        storage={"counters": redis.url, "ledger": postgres.dsn},
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "SIGNALS_JWT_SECRET"}},
        meters={"api_calls": {"type": "counter", "period": "month"}},
        plans={"pro": {"limits": {"api_calls": {"limit": 100, "warn_at": [0.8]}}}},
        tenants=[{"id": "acme", "plan": "pro"}],
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                 "charge": {"api_calls": 1}}],
        usage={"worker_port": 0},
        notifications={"webhooks": [{"url": receiver.url, "secret_env": "HOOK_SECRET"}],
                       "max_retry_interval_s": 2},
    )  # fmt: skip
    config = write_config(tmp_path / "gateway.yaml", data)
    env = {"SIGNALS_JWT_SECRET": jwt_secret, "HOOK_SECRET": SECRET}
    migrate = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "migrate", "-c", str(config)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    processes: list[GatewayProcess] = [GatewayProcess(config, env) for _ in range(2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        worker = WorkerProcess(config, "worker-1", env)
        processes.append(await asyncio.to_thread(worker.start))
        token = mint(jwt_secret, "HS256", ["org_id"], "acme", 3600)
        statuses: Counter[int] = Counter()
        async with aiohttp.ClientSession() as client:

            async def one(n: int) -> None:
                port = processes[n % 2].port
                headers = {"Authorization": f"Bearer {token}"}
                async with client.get(f"http://127.0.0.1:{port}/v1/x", headers=headers) as r:
                    await r.read()
                    statuses[r.status] += 1

            await asyncio.gather(*(one(n) for n in range(150)))
        assert statuses == {200: 100, 402: 50}
        await eventually(lambda: len(receiver.delivered()) >= 2, timeout_s=60)
        await asyncio.sleep(3)  # time enough for a duplicate to show up
        delivered = receiver.delivered()
        refused = [r for r in receiver.requests if r[0] == 500]
        assert refused, "the outage was never seen: nothing was retried"
        assert sorted((p["type"], p["data"].get("threshold")) for p in delivered) == [
            ("quota.exhausted", None),
            ("quota.threshold_crossed", 0.8),
        ]
        for payload in delivered:
            assert payload["data"]["tenant"] == "acme"
            assert payload["data"]["meter"] == "api_calls"
            assert payload["data"]["limit"] == 100
        assert {p["data"]["used"] for p in delivered} == {80, 100}
        # Every attempt of one notification carried the same id.
        ids = Counter(r[1]["webhook-id"] for r in receiver.requests)
        assert len(ids) == 2
    finally:
        for process in processes:
            if process.proc is not None:
                process.kill()
        redis.close()
        postgres.close()
        await receiver.close()


async def test_an_embedded_gateway_delivers_its_own_notifications(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gateway: Any
) -> None:
    receiver = await Receiver().start()
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        gateway = await make_gateway(
            gateway_config(
                upstream.url,
                storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
                auth={"api_keys": {"enabled": True}},
                meters={"api_calls": {"type": "counter"}},
                plans={
                    "free": {
                        "limits": {
                            "api_calls": {"limit": 10, "enforcement": "soft", "warn_at": [0.5]}
                        }
                    }
                },
                tenants=[{"id": "acme", "plan": "free"}],
                routes=[
                    {
                        "name": "api",
                        "match": {"path": "/**"},
                        "upstream": "app",
                        "charge": {"api_calls": 1},
                    }
                ],
                notifications={
                    "webhooks": [
                        {
                            "url": receiver.url,
                            "secret_env": "HOOK_SECRET",
                            "events": ["quota.overage_started"],
                        }
                    ]
                },
            )  # fmt: skip
        )
        status, created = await admin(gateway, "POST", "/admin/tenants/acme/api-keys", {})
        assert status == 201, created
        key = created["key"]
        async with aiohttp.ClientSession() as client:
            for _ in range(12):
                url = f"http://127.0.0.1:{gateway.port}/x"
                async with client.get(url, headers={"X-API-Key": key}) as r:
                    assert r.status == 200
        await eventually(lambda: bool(receiver.delivered()), timeout_s=20)
        delivered = receiver.delivered()
        # Only the type this endpoint asked for: not the 50% threshold.
        assert [(p["type"], p["data"]["used"]) for p in delivered] == [
            ("quota.overage_started", 11)
        ]
    finally:
        await receiver.close()
