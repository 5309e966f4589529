"""The Stripe reporter against the strict fake Stripe, on SQLite and PostgreSQL ledgers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, Gauge

from gateway.billing.outbox import Outbox
from gateway.billing.reporter import PLAN_HORIZON, Reporter
from gateway.billing.rules import event_time, report_identifier, summary_window
from gateway.billing.stripe_api import SendFailure, StripeAPI
from gateway.clock import to_us
from gateway.config.models import MeterConfig, StripeConfig
from gateway.ledger import Ledger
from gateway.ledger.events import UsageEvent
from gateway.ledger.records import Tenant
from gateway.ledger.usage_ledger import UsageLedger
from gateway.metrics import FAILURE_KINDS, StripeMetrics
from gateway.quota.periods import period_of
from tests.conftest import PgLedger
from tests.fake_stripe import API_KEY, FakeStripe

METERS = {"api_calls": MeterConfig(type="counter"), "tokens": MeterConfig(type="counter")}
EVENTS = {"api_calls": "api_calls", "tokens": "llm_tokens"}
_ids = itertools.count()


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = await FakeStripe(session_ttl_s=3).start()
    for event_name in EVENTS.values():
        server.add_meter(event_name)
    yield server
    await server.close()


def stripe_config(fake: FakeStripe, mode: str = "v1", **extra: object) -> StripeConfig:
    return StripeConfig.model_validate(
        {"api_base": fake.url, "mode": mode, "meter_events": EVENTS, "timeout_s": 0.5,
         "report_interval_s": 0.05, **extra}
    )  # fmt: skip


async def add_tenants(ledger: Ledger, fake: FakeStripe, n: int) -> list[str]:
    now = datetime.now(UTC)
    names = [f"t{i}" for i in range(n)]
    for name in names:
        fake.add_customer(f"cus_{name}")
        tenant = Tenant(name, "p", "active", now, stripe_customer=f"cus_{name}")
        await ledger.put_tenant(tenant)
    return names


async def charge(ledger: Ledger, tenant: str, meter: str, quantity: int, at: datetime) -> None:
    period = period_of("billing_cycle", at)
    event = UsageEvent(f"op{next(_ids)}:{meter}", tenant, meter, quantity, to_us(at),
                       to_us(period.start), "charge", "api", "GET", 200, "rid")  # fmt: skip
    await UsageLedger(ledger.db).write([event])


def reporter(
    ledger: Ledger, fake: FakeStripe, config: StripeConfig, holder: str = "w1"
) -> Reporter:
    outbox = Outbox(ledger.db, METERS, dict(config.meter_events))
    api = StripeAPI(config, API_KEY)
    return Reporter(config, outbox, api, StripeMetrics(CollectorRegistry()), holder)


async def until_settled(rep: Reporter, rounds: int = 200) -> None:
    for _ in range(rounds):
        await rep.round()
        stats = await rep.outbox.pending()
        if stats.rows == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"outbox never emptied: {await rep.outbox.counts()}")


def gauge(metric: Gauge) -> float:
    (family,) = metric.collect()
    return float(family.samples[0].value)


def test_event_time_is_inside_the_period_and_its_summary_window() -> None:
    start = datetime(2026, 1, 15, 10, 30, 12, tzinfo=UTC)
    end = datetime(2026, 2, 15, 10, 30, 12, tzinfo=UTC)
    window = summary_window(start, end)
    assert window == (datetime(2026, 1, 15, 10, 31, tzinfo=UTC),
                      datetime(2026, 2, 15, 10, 30, tzinfo=UTC))  # fmt: skip
    running = datetime(2026, 1, 20, 8, 0, 0, 123456, tzinfo=UTC)
    assert event_time(start, end, running) == running.replace(microsecond=0)
    closed = event_time(start, end, datetime(2026, 2, 20, tzinfo=UTC))
    assert closed == datetime(2026, 2, 15, 10, 29, 59, tzinfo=UTC)
    assert window[0] <= closed < window[1]
    assert event_time(start, end, datetime(2026, 4, 1, tzinfo=UTC)) is None  # > 35 days


def test_identifiers_are_deterministic_and_distinct() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    one = report_identifier("acme", "api_calls", start, 1)
    assert one == report_identifier("acme", "api_calls", start, 1)
    assert len({one, report_identifier("acme", "api_calls", start, 2),
                report_identifier("acme", "tokens", start, 1)}) == 3  # fmt: skip
    assert len(one) <= 100


@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_growth_is_reported_exactly_once(ledger: Ledger, fake: FakeStripe, mode: str) -> None:
    tenants = await add_tenants(ledger, fake, 5)
    rep = reporter(ledger, fake, stripe_config(fake, mode))
    now = datetime.now(UTC)
    expected: dict[tuple[str, str], int] = {}
    try:
        for round_ in range(3):
            for i, tenant in enumerate(tenants):
                await charge(ledger, tenant, "api_calls", i + 1, now)
                await charge(ledger, tenant, "tokens", 100 * (round_ + 1), now)
                for meter, q in (("api_calls", i + 1), ("tokens", 100 * (round_ + 1))):
                    key = (f"cus_{tenant}", EVENTS[meter])
                    expected[key] = expected.get(key, 0) + q
            await until_settled(rep)
        await asyncio.sleep(0.05)  # the v2 stream validates after answering
        assert fake.totals() == expected
        assert fake.conflicting_identifiers() == []
        # Nothing grew: another round sends nothing.
        before = dict(fake.calls)
        await rep.round()
        assert await rep.outbox.counts() == {"sent": 30}
        sends = [k for k in fake.calls if "meter_event" in k and "session" not in k]
        assert all(fake.calls[k] == before.get(k) for k in sends)
    finally:
        await rep.api.close()


@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_failing_and_hanging_stripe_still_ends_exact(
    ledger: Ledger, fake: FakeStripe, mode: str
) -> None:
    tenants = await add_tenants(ledger, fake, 10)
    fake.failures.rate = 0.3
    fake.failures.hang_s = 0.6
    rep = reporter(ledger, fake, stripe_config(fake, mode))
    rep._jitter = lambda: 0.0  # the shortest backoff keeps the test quick
    now = datetime.now(UTC)
    try:
        for q in (1, 2, 3):
            for tenant in tenants:
                await charge(ledger, tenant, "api_calls", q, now)
            await until_settled(rep, rounds=10_000)
        expected = {(f"cus_{tenant}", "api_calls"): 6 for tenant in tenants}
        await asyncio.sleep(0.05)
        assert fake.totals() == expected
        assert fake.conflicting_identifiers() == []
        assert sum(fake.failures.injected.values()) > 0, fake.failures.injected
    finally:
        await rep.api.close()


async def test_a_closed_period_is_reported_inside_it(ledger: Ledger, fake: FakeStripe) -> None:
    (tenant,) = await add_tenants(ledger, fake, 1)
    now = datetime.now(UTC)
    last_period = period_of("billing_cycle", period_of("billing_cycle", now).start - timedelta(1))
    await charge(ledger, tenant, "api_calls", 7, last_period.end - timedelta(seconds=3))
    rep = reporter(ledger, fake, stripe_config(fake))
    try:
        await until_settled(rep)
    finally:
        await rep.api.close()
    (event,) = fake.events.values()
    assert event.value == 7
    start, end = summary_window(last_period.start, last_period.end)
    assert start.timestamp() <= event.timestamp < end.timestamp()


async def test_missing_customer_is_rejected_and_counted_not_retried(
    ledger: Ledger, fake: FakeStripe
) -> None:
    (tenant,) = await add_tenants(ledger, fake, 1)
    del fake.customers[f"cus_{tenant}"]
    await charge(ledger, tenant, "api_calls", 2, datetime.now(UTC))
    rep = reporter(ledger, fake, stripe_config(fake))
    try:
        await until_settled(rep)
        assert await rep.outbox.counts() == {"rejected": 1}
        assert rep.metrics.failures.labels("rejected")._value.get() == 1
    finally:
        await rep.api.close()


async def test_a_send_stripe_has_forgotten_is_resent_only_when_its_summary_lacks_it(
    ledger: Ledger, fake: FakeStripe
) -> None:
    tenants = await add_tenants(ledger, fake, 2)
    now = datetime.now(UTC)
    for tenant in tenants:
        await charge(ledger, tenant, "api_calls", 5, now)
    # Both sends reach Stripe, neither answer reaches us; then a day passes.
    fake.failures.rate, fake.failures.kinds, fake.failures.hang_s = (
        1.0,
        ("commit_then_timeout",),
        1.0,
    )
    clock = [now]
    rep = reporter(ledger, fake, stripe_config(fake))
    rep._clock = lambda: clock[0]
    try:
        await rep.round()
        assert len(fake.events) == 2
        assert (await rep.outbox.pending()).rows == 2
        fake.failures.rate = 0.0
        fake.advance(25 * 3600)  # Stripe has forgotten both identifiers
        clock[0] = now + timedelta(hours=25)
        fake.remove_event(next(iter(fake.events)))  # ... and one event never made it
        await until_settled(rep)
        assert {e.customer for e in fake.events.values()} == {f"cus_{t}" for t in tenants}
        assert sorted(fake.totals().values()) == [5, 5]
    finally:
        await rep.api.close()


@pytest.mark.parametrize("names", [("w1", "w2"), ("w1", "w1")])
@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_two_reporters_never_send_one_row_twice(
    ledger: Ledger, fake: FakeStripe, mode: str, names: tuple[str, str]
) -> None:
    tenants = await add_tenants(ledger, fake, 20)
    config = stripe_config(fake, mode)
    fake.latency_s = 0.02  # long enough for a second send of a row to overlap the first
    first, second = (reporter(ledger, fake, config, name) for name in names)
    seen: list[str] = []
    fake.on_commit = lambda event: seen.append(event.identifier)
    now = datetime.now(UTC)
    try:
        for q in (1, 2):
            for tenant in tenants:
                await charge(ledger, tenant, "api_calls", q, now)
            await asyncio.gather(until_settled(first), until_settled(second))
        assert len(seen) == len(set(seen)) == 40
        assert set(fake.totals().values()) == {3}
        # Never two requests at once for one row, or for one customer and meter.
        assert fake.max_in_flight == 1
    finally:
        await first.api.close()
        await second.api.close()


@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_a_refund_after_its_charge_was_reported_is_sent_as_a_correction(
    ledger: Ledger, fake: FakeStripe, mode: str
) -> None:
    (tenant,) = await add_tenants(ledger, fake, 1)
    rep = reporter(ledger, fake, stripe_config(fake, mode))
    now = datetime.now(UTC)
    try:
        await charge(ledger, tenant, "api_calls", 5, now)
        await until_settled(rep)
        await charge(ledger, tenant, "api_calls", -2, now)  # two of the five refunded
        await until_settled(rep)
        await asyncio.sleep(0.05)
        assert fake.totals() == {(f"cus_{tenant}", "api_calls"): 3}
        assert sorted(e.value for e in fake.events.values()) == [-2, 5]
    finally:
        await rep.api.close()


@pytest.mark.parametrize(
    ("mode", "broken"), [("v1", "GET /v1/billing/meters"), ("v2", "GET /v2/core/events")]
)
async def test_a_failing_round_still_exports_the_outbox_gauges(
    ledger: Ledger, fake: FakeStripe, mode: str, broken: str
) -> None:
    (tenant,) = await add_tenants(ledger, fake, 1)
    now = datetime.now(UTC)
    await charge(ledger, tenant, "api_calls", 3, now)
    await charge(ledger, tenant, "tokens", 5, now)
    # llm_tokens has no meter: its row waits whatever else happens.
    del fake.meters[next(m for m, v in fake.meters.items() if v["event_name"] == "llm_tokens")]
    fake.broken.add(broken)
    clock = [now]
    rep = reporter(ledger, fake, stripe_config(fake, mode))
    rep._clock = lambda: clock[0]
    try:
        for _ in range(2):
            with pytest.raises(SendFailure):
                await rep.round()
            clock[0] += timedelta(hours=1)
        assert gauge(rep.metrics.pending_rows) >= 1
        assert gauge(rep.metrics.oldest_pending) >= 7200
    finally:
        await rep.api.close()


async def test_two_reporters_given_one_name_never_hold_one_lease(
    ledger: Ledger, fake: FakeStripe
) -> None:
    tenants = await add_tenants(ledger, fake, 3)
    now = datetime.now(UTC)
    for tenant in tenants:
        await charge(ledger, tenant, "api_calls", 1, now)
    config = stripe_config(fake)
    first, second = (
        reporter(ledger, fake, config, "host-a"),
        reporter(ledger, fake, config, "host-a"),
    )
    try:
        assert first.holder != second.holder
        await first.outbox.plan(now, now - PLAN_HORIZON)
        held = await first.outbox.lease(first.holder, now, 60, 100)
        assert len(held) == 3
        assert await second.outbox.lease(second.holder, now, 60, 100) == []
        assert not await second.outbox.renew(second.holder, held[0], now, 60)
    finally:
        await first.api.close()
        await second.api.close()


async def test_a_reporter_whose_clock_runs_ahead_takes_no_lease_over(
    pg_ledger: PgLedger, fake: FakeStripe
) -> None:
    _, ledger = pg_ledger
    (tenant,) = await add_tenants(ledger, fake, 1)
    now = datetime.now(UTC)
    await charge(ledger, tenant, "api_calls", 1, now)
    config = stripe_config(fake)
    first, second = reporter(ledger, fake, config, "w1"), reporter(ledger, fake, config, "w2")
    try:
        await first.outbox.plan(now, now - PLAN_HORIZON)
        assert len(await first.outbox.lease(first.holder, now, 60, 100)) == 1
        # Another machine two hours ahead: by its clock the lease ran out long ago.
        ahead = now + timedelta(hours=2)
        assert await second.outbox.lease(second.holder, ahead, 60, 100) == []
    finally:
        await first.api.close()
        await second.api.close()


async def test_refusals_an_error_report_does_not_name_are_found_by_summary_and_resent(
    ledger: Ledger, fake: FakeStripe
) -> None:
    tenants = await add_tenants(ledger, fake, 5)
    gone = {t: fake.customers.pop(f"cus_{t}") for t in tenants[:3]}
    fake.error_samples = 1  # Stripe names one of the three refusals
    rep = reporter(ledger, fake, stripe_config(fake, "v2"))
    now = datetime.now(UTC)
    start = period_of("billing_cycle", now).start
    try:
        for tenant in tenants:
            await charge(ledger, tenant, "api_calls", 4, now)
        await rep.round()
        await asyncio.sleep(0.05)  # validated after the answer
        (report,) = fake.core_events
        assert report["data"]["reason"]["error_count"] == 3
        ((sample,),) = (t["sample_errors"] for t in report["data"]["reason"]["error_types"])
        (named,) = (t for t in gone if report_identifier(t, "api_calls", start, 1)
                    == sample["request"]["identifier"])  # fmt: skip
        # One unnamed refusal's customer exists now (created late, say); the other's never.
        late, never = (t for t in gone if t != named)
        fake.customers[f"cus_{late}"] = gone[late]
        for _ in range(3):
            await until_settled(rep)
            await asyncio.sleep(0.05)
        assert await rep.outbox.counts() == {"sent": 3, "rejected": 2}
        assert fake.totals() == {
            (f"cus_{t}", "api_calls"): 4 for t in tenants if t not in (named, never)
        }
        assert rep.metrics.failures.labels("async_rejected")._value.get() == 2
    finally:
        await rep.api.close()


async def test_a_stream_request_refused_for_one_row_rejects_only_that_row(
    ledger: Ledger, fake: FakeStripe
) -> None:
    tenants = await add_tenants(ledger, fake, 8)
    fake.stream_refuses.add("cus_t5")
    rep = reporter(ledger, fake, stripe_config(fake, "v2"))
    now = datetime.now(UTC)
    try:
        for tenant in tenants:
            await charge(ledger, tenant, "api_calls", 2, now)
        await until_settled(rep)
        await asyncio.sleep(0.05)
        assert await rep.outbox.counts() == {"sent": 7, "rejected": 1}
        assert fake.totals() == {(f"cus_{t}", "api_calls"): 2 for t in tenants if t != "t5"}
        assert rep.metrics.failures.labels("rejected")._value.get() == 1
    finally:
        await rep.api.close()


async def test_a_v2_session_stripe_expired_early_is_renewed_and_the_send_retried(
    ledger: Ledger, fake: FakeStripe
) -> None:
    fake.session_ttl_s = 90  # longer than the minute before expiry when the reporter renews
    (tenant,) = await add_tenants(ledger, fake, 1)
    rep = reporter(ledger, fake, stripe_config(fake, "v2"))
    now = datetime.now(UTC)
    sessions, stream = "POST /v2/billing/meter_event_session", "POST /v2/billing/meter_event_stream"
    try:
        await charge(ledger, tenant, "api_calls", 1, now)
        await until_settled(rep)
        assert (fake.calls[sessions], fake.calls[stream]) == (1, 1)
        fake.advance(100)  # by Stripe's clock the session is over; by ours it has 30 s left
        await charge(ledger, tenant, "api_calls", 2, now)
        await until_settled(rep)
        assert (fake.calls[sessions], fake.calls[stream]) == (2, 3)  # refused, renewed, resent
        await asyncio.sleep(0.05)
        assert fake.totals() == {(f"cus_{tenant}", "api_calls"): 3}
        assert sum(rep.metrics.failures.labels(k)._value.get() for k in FAILURE_KINDS) == 0
    finally:
        await rep.api.close()


async def test_more_than_a_hundred_groups_go_out_in_stream_requests_of_a_hundred(
    ledger: Ledger, fake: FakeStripe
) -> None:
    tenants = await add_tenants(ledger, fake, 130)
    fake.session_ttl_s = 900
    rep = reporter(ledger, fake, stripe_config(fake, "v2"))
    now = datetime.now(UTC)
    try:
        for tenant in tenants:
            await charge(ledger, tenant, "api_calls", 1, now)
        assert await rep.round() == 130
        assert fake.calls["POST /v2/billing/meter_event_stream"] == 2  # 100, then 30
        await asyncio.sleep(0.05)
        assert fake.totals() == {(f"cus_{t}", "api_calls"): 1 for t in tenants}
    finally:
        await rep.api.close()


async def test_a_row_that_waited_past_35_days_expires_unsent(
    ledger: Ledger, fake: FakeStripe
) -> None:
    (tenant,) = await add_tenants(ledger, fake, 1)
    now = datetime.now(UTC)
    await charge(ledger, tenant, "api_calls", 3, now)
    fake.failures.rate, fake.failures.kinds = 1.0, ("500",)
    clock = [now]
    rep = reporter(ledger, fake, stripe_config(fake))
    rep._clock = lambda: clock[0]
    try:
        await rep.round()
        assert await rep.outbox.counts() == {"pending": 1}
        fake.failures.rate = 0.0
        clock[0] = now + timedelta(days=36)  # Stripe now refuses the row's timestamp
        await rep.round()
        assert await rep.outbox.counts() == {"expired": 1}
        assert fake.events == {}
        assert rep.metrics.failures.labels("expired")._value.get() == 1
        assert gauge(rep.metrics.pending_rows) == 0
    finally:
        await rep.api.close()
