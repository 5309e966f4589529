"""Anomalies and exhaustion forecasts from the ledger's hourly rollups: the worker's watch,
its metric, the admin endpoint and the notifications."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.clock import to_us
from gateway.config.loader import parse
from gateway.ledger.events import UsageEvent
from gateway.ledger.records import Tenant
from gateway.ledger.store import Ledger
from gateway.ledger.usage_ledger import UsageLedger
from gateway.quota.forecast import forecast, window
from gateway.quota.periods import Period
from gateway.quota.rules import MeterLimit
from gateway.signals.anomaly import HOUR, AnomalySettings, baseline, judge
from gateway.signals.watch import Watch
from tests.conftest import gateway_config
from tests.test_auth_gateway import ADMIN_TOKEN, admin
from tests.test_signals import SECRET, Receiver, valid_payload
from tests.upstream import Upstream
from tests.waiting import eventually

SETTINGS = AnomalySettings()
T0 = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
MARCH = datetime(2026, 3, 1, tzinfo=UTC)


def flat(first: datetime, hour: datetime, value: int) -> dict[datetime, int]:
    hours = int((hour - first) / HOUR)
    return {first + i * HOUR: value for i in range(hours)}


def test_a_spike_against_a_flat_history_is_an_anomaly_and_a_wobble_is_not() -> None:
    hour = T0 + timedelta(days=30)
    first = T0
    history = flat(first, hour, 200)
    samples = baseline(history, first, hour, 4)
    assert len(samples) == 12  # the same hour of 4 weeks, and the hours beside it
    verdict = judge(2000, samples, SETTINGS)
    assert verdict is not None and verdict.anomalous and verdict.ratio == 10
    calm = judge(300, samples, SETTINGS)
    assert calm is not None and not calm.anomalous


def test_a_small_tenant_doubling_is_not_an_incident() -> None:
    hour = T0 + timedelta(days=10)
    samples = baseline(flat(T0, hour, 2), T0, hour, 4)
    assert len(samples) == 168  # under three weeks: the last week, every hour
    verdict = judge(40, samples, SETTINGS)
    assert verdict is not None and not verdict.anomalous  # 20x, but under min_quantity


def test_too_little_history_judges_nothing() -> None:
    hour = T0 + timedelta(hours=12)
    assert judge(10_000, baseline(flat(T0, hour, 100), T0, hour, 4), SETTINGS) is None


def test_earlier_spikes_do_not_move_the_baseline() -> None:
    hour = T0 + timedelta(days=30)
    history = flat(T0, hour, 200)
    history[hour - timedelta(days=7)] = 50_000  # last week's incident, same hour
    verdict = judge(2000, baseline(history, T0, hour, 4), SETTINGS)
    assert verdict is not None and verdict.anomalous and verdict.median == 200


def test_a_steady_consumer_is_forecast_within_five_percent() -> None:
    """The clock moves hour by hour through a month; at each step the forecast of a
    tenant using 40 an hour is compared with when it really runs out."""
    period = Period(T0, datetime(2026, 4, 1, tzinfo=UTC))
    limit = MeterLimit("calls", "counter", 20_000, True)
    rate_per_h = 40.0
    true_exhaustion = T0 + timedelta(hours=limit.limit / rate_per_h)
    checked = 0
    for step in range(2, int(limit.limit / rate_per_h) - 1, 7):
        now = T0 + timedelta(hours=step, minutes=17)
        used = int(rate_per_h * (now - T0).total_seconds() / 3600)
        since, _ = window(period, now)
        # The rollups: whole hours at the rate, the current one so far.
        hours = []
        hour = since
        while hour < now:
            span_s = (min(now, hour + HOUR) - hour).total_seconds()
            hours.append((hour, round(rate_per_h * span_s / 3600)))
            hour += HOUR
        ahead = forecast(used, limit, period, now, hours)
        assert ahead is not None and ahead.exhausts_at is not None
        error_s = abs((ahead.exhausts_at - true_exhaustion).total_seconds())
        assert error_s <= 0.05 * (true_exhaustion - now).total_seconds(), (now, ahead)
        checked += 1
    assert checked > 50


async def test_the_watch_forecasts_a_steady_tenant_from_the_ledger(tmp_path: Path) -> None:
    """Events written as the clock advances: the worker's forecast of the tenant's
    exhaustion, read from the rollups, is within 5% of the truth at every check."""
    config = parse(
        gateway_config(
            "http://127.0.0.1:1",
            storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
            meters={"calls": {"type": "counter", "period": "month"}},
            plans={"pro": {"limits": {"calls": {"limit": 3000}}}},
            signals={"forecast_horizon_s": "40d"},
        ),
        "test.yaml",
    )
    ledger = await Ledger.open(config.storage.ledger)
    await ledger.migrate()
    usage = UsageLedger(ledger.db)
    await ledger.create_tenant_if_missing(
        Tenant(id="acme", name=None, plan="pro", status="active", status_changed_at=T0)
    )
    clock = [T0]
    watch = Watch(config, ledger.db, clock=lambda: clock[0])
    true_exhaustion = T0 + timedelta(hours=3000 / 12)  # 12 an hour: 2 every 10 minutes
    try:
        n = 0
        for hour in range(0, 240):
            events = []
            for tick in range(6):
                at = T0 + timedelta(hours=hour, minutes=10 * tick)
                events.append(
                    UsageEvent(f"e{n}", "acme", "calls", 2, to_us(at), to_us(MARCH), "charge")
                )
                n += 1
            await usage.write(events)
            clock[0] = T0 + timedelta(hours=hour + 1)
            if hour % 24 == 5:
                found = await watch.forecasts(clock[0])
                assert len(found) == 1
                valid_payload(json.loads(found[0].payload()))
                data = dict(found[0].details)
                exhausts = datetime.fromisoformat(str(data["exhausts_at"]))
                error_s = abs((exhausts - true_exhaustion).total_seconds())
                assert error_s <= 0.05 * (true_exhaustion - clock[0]).total_seconds(), data
    finally:
        await ledger.close()


def seeded_hours(now: datetime) -> tuple[list[tuple[Any, ...]], list[str], list[str]]:
    """Four weeks of hourly usage for 200 tenants (daily cycle and noise), up to the
    current hour; 3 tenants spike this hour, 3 others grow 3% a day throughout."""
    rng = random.Random(7)
    current = now.replace(minute=0, second=0, microsecond=0)
    start = current - timedelta(days=28)
    tenants = [f"t{i:03d}" for i in range(200)]
    spiking, growing = tenants[10:13], tenants[50:53]
    rows = []
    for tenant in tenants:
        base = rng.uniform(150, 600)
        hour = start
        while hour <= current:
            days = (hour - start).total_seconds() / 86400
            level = base * (1 + 0.5 * math.sin(2 * math.pi * hour.hour / 24))
            if tenant in growing:
                level *= 1.03**days
            value = level * rng.uniform(0.85, 1.15)
            if hour == current:
                value *= (now - current) / HOUR  # the hour so far
                if tenant in spiking:
                    value *= 12
            rows.append((tenant, "api_calls", hour, max(0, round(value)), 1))
            hour += HOUR
    return rows, spiking, growing


async def test_exactly_the_spikes_are_reported_by_metric_endpoint_and_notification(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gateway: Any
) -> None:
    now = datetime.now(UTC)
    if now.minute < 20:  # a nearly empty current hour would judge the last one instead
        now = now.replace(minute=20)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = await Ledger.open(url)
    await ledger.migrate()
    rows, spiking, growing = seeded_hours(now)
    async with ledger.db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO usage_hourly (tenant_id, meter, hour, quantity, events) "
            "VALUES ($1, $2, $3, $4, $5)",
            rows,
        )
    await ledger.close()
    receiver = await Receiver().start()
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        gateway = await make_gateway(
            gateway_config(
                upstream.url,
                storage={"ledger": url},
                auth={"api_keys": {"enabled": True}},
                meters={"api_calls": {"type": "counter"}},
                plans={"free": {"limits": {"api_calls": {"limit": "unlimited"}}}},
                routes=[
                    {
                        "name": "api",
                        "match": {"path": "/**"},
                        "upstream": "app",
                        "charge": {"api_calls": 1},
                    }
                ],
                metrics={"tenant_label": True, "tenant_label_top": 10},
                notifications={
                    "webhooks": [
                        {
                            "url": receiver.url,
                            "secret_env": "HOOK_SECRET",
                            "events": ["usage.anomaly"],
                        }
                    ]
                },
            )  # fmt: skip
        )
        await eventually(lambda: len(receiver.delivered()) >= 3, timeout_s=20)
        delivered = receiver.delivered()
        assert sorted(p["data"]["tenant"] for p in delivered) == spiking
        assert {p["type"] for p in delivered} == {"usage.anomaly"}
        status, body = await admin(gateway, "GET", "/admin/anomalies")
        assert status == 200, body
        assert sorted(a["tenant"] for a in body["anomalies"]) == spiking
        assert all(a["ratio"] >= 3 for a in body["anomalies"])
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as r:
                scrape = await r.text()
        assert "gateway_usage_anomalies 3.0" in scrape
        labelled = sorted(
            line.split('tenant="')[1].split('"')[0]
            for line in scrape.splitlines()
            if line.startswith("gateway_tenant_usage_anomaly_ratio{")
        )
        assert labelled == spiking
        assert not set(growing) & {p["data"]["tenant"] for p in delivered}
        status, body = await admin(gateway, "GET", "/admin/notifications?state=delivered")
        assert status == 200 and len(body["notifications"]) == 3, body
    finally:
        await receiver.close()


async def test_status_changes_and_grace_periods_signal_once_each(tmp_path: Path) -> None:
    config = parse(
        gateway_config(
            "http://127.0.0.1:1",
            storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
            subscription={"grace": {"past_due": "30m"}},
        ),
        "test.yaml",
    )
    ledger = await Ledger.open(config.storage.ledger)
    await ledger.migrate()
    now = datetime.now(UTC)
    for tenant in ("acme", "newco", "lapsed", "old"):
        await ledger.create_tenant_if_missing(
            Tenant(id=tenant, plan="pro", status="active", status_changed_at=now)
        )
    changes = [  # (tenant, status, changed, created)
        ("acme", "past_due", now - timedelta(hours=1), now - timedelta(days=5)),
        ("newco", "active", now - timedelta(minutes=5), now - timedelta(minutes=5)),
        ("lapsed", "canceled", now - timedelta(minutes=10), now - timedelta(days=40)),
        ("old", "past_due", now - timedelta(days=9), now - timedelta(days=40)),
    ]
    for tenant, status, changed, created in changes:
        await ledger.db.execute(
            "UPDATE tenants SET status = $2, status_changed_at = $3, created_at = $4 "
            "WHERE id = $1",
            tenant, status, changed, created,
        )  # fmt: skip
    watch = Watch(config, ledger.db)
    try:
        found = await watch.round()
        seen = sorted((s.type, s.tenant) for s in found)
        assert seen == [
            ("subscription.grace_ended", "acme"),
            ("subscription.grace_started", "acme"),
            ("subscription.status_changed", "acme"),
            ("subscription.status_changed", "lapsed"),
        ]
        started = next(s for s in found if s.type == "subscription.grace_started")
        for signal in found:
            valid_payload(json.loads(signal.payload()))
        data = json.loads(started.payload())["data"]
        assert data["status"] == "past_due" and data["tenant"] == "acme"
        assert datetime.fromisoformat(data["grace_ends_at"]) == (
            now - timedelta(minutes=30)
        ).replace(microsecond=0)
        again = await watch.round()
        assert sorted((s.type, s.tenant) for s in again) == seen
        rows = await ledger.db.fetch("SELECT type, tenant_id FROM signals ORDER BY 1, 2")
        assert [(r["type"], r["tenant_id"]) for r in rows] == seen  # written once each
    finally:
        await ledger.close()
