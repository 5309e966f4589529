"""The operator's series on the admin `/metrics`, after real traffic through a gateway on a
private Redis: decisions by plan, meter and outcome, Redis round trips, what fail_open
holds, the tenant label's cap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.config import parse
from gateway.lifecycle import LAG_SAMPLE_S
from gateway.quota.tally import OTHER_TENANTS, TenantTallies
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.servers import RedisServer
from tests.test_quota_gateway import SECRET, call, quota_config
from tests.upstream import Upstream
from tests.waiting import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gw: Gateway) -> Samples:
    """Every sample on the admin listener's /metrics, by name and labels."""
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, label: str, **fixed: str) -> dict[str, float]:
    """`name`'s nonzero samples matching `fixed`, by the value of `label`."""
    found: dict[str, float] = {}
    for (sample, labels), number in samples.items():
        given = dict(labels)
        if sample == name and number and all(given.get(k) == v for k, v in fixed.items()):
            found[given[label]] = found.get(given[label], 0.0) + number
    return found


@pytest.fixture
def quota_redis_config(
    upstream: Upstream, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The quota tests' config, counters in the test's private Redis (timeout 50 ms)."""
    monkeypatch.setenv("QUOTA_JWT_SECRET", SECRET)

    def make(**sections: Any) -> dict[str, Any]:
        storage = sections.pop("storage", {})
        data = quota_config(upstream, tmp_path, counters=redis_server.url, timeout_ms=50, **storage)
        data.update(sections)
        return data

    return make


async def test_decisions_by_plan_meter_and_outcome_and_durations_by_status_class(
    quota_redis_config: Any, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(quota_redis_config())
    # starter: api_calls 6, warn_at 0.5 (3 of 6); soft: 2, soft; throttled: 2 at once.
    statuses = [(await call(gw, "acme"))[0] for _ in range(8)]
    statuses += [(await call(gw, "beta"))[0] for _ in range(3)]
    statuses += [(await call(gw, "gamma"))[0] for _ in range(3)]
    # add-member charges api_calls (used up) and team_members: one refuses, one does not.
    statuses.append((await call(gw, "acme", "POST", "/v1/members"))[0])
    assert statuses == [200] * 6 + [402] * 2 + [200] * 3 + [200, 200, 429, 402]

    samples = await scrape(gw)
    decisions = {
        (dict(labels)["plan"], dict(labels)["meter"], dict(labels)["outcome"]): number
        for (name, labels), number in samples.items()
        if name == "gateway_quota_decisions_total" and number
    }
    assert decisions == {
        ("starter", "api_calls", "allowed"): 2,
        ("starter", "api_calls", "warned"): 4,
        ("starter", "api_calls", "exhausted"): 3,
        ("starter", "team_members", "refused"): 1,
        ("soft", "api_calls", "allowed"): 2,
        ("soft", "api_calls", "overage"): 1,
        ("throttled", "api_calls", "allowed"): 2,
        ("throttled", "api_calls", "rate_limited"): 1,
    }
    duration = "gateway_request_duration_seconds_count"
    assert by_label(samples, duration, "status_class", route="api") == {"2xx": 11, "4xx": 3}
    assert by_label(samples, duration, "status_class", route="add-member") == {"4xx": 1}
    # The seed tenants were written and each tenant read once: the ledger's calls are timed.
    assert sum(by_label(samples, "gateway_ledger_duration_seconds_count", "op").values()) >= 4
    assert not by_label(samples, "gateway_ledger_errors_total", "op")


async def test_counter_store_latency_counts_pipeline_round_trips_not_requests(
    quota_redis_config: Any, make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    gw = await make_gateway(quota_redis_config())
    rounds = "gateway_counter_store_duration_seconds_count"
    before = value(await scrape(gw), rounds, call="check_and_charge")
    for _ in range(5):  # one at a time: a round trip each
        assert (await call(gw, "gamma"))[0] in (200, 429)
    sequential = value(await scrape(gw), rounds, call="check_and_charge")
    assert sequential - before == 5

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        calls_before = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"]
        # 40 requests at once: their checks coalesce into a few pipelines.
        token_holders = ["acme", "beta"] * 20
        await asyncio.gather(*(call(gw, tenant) for tenant in token_holders))
        calls = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] - calls_before
    finally:
        await client.aclose()
    samples = await scrape(gw)
    concurrent = value(samples, rounds, call="check_and_charge") - sequential
    assert calls == 40  # every check reached Redis...
    assert 1 <= concurrent < 40, concurrent  # ...in fewer round trips than requests
    assert not by_label(samples, "gateway_counter_store_errors_total", "call")


async def test_fail_open_holds_are_counted_and_drain_when_redis_is_back(
    quota_redis_config: Any, make_gateway: MakeGateway, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = quota_redis_config(
        storage={"on_counter_store_error": "fail_open"},
        usage={"spool_dir": str(tmp_path / "spool")},
    )
    gw = await make_gateway(config)
    assert (await call(gw, "acme"))[0] == 200
    redis_server.stop()
    try:
        assert [(await call(gw, "acme"))[0] for _ in range(3)] == [200, 200, 200]
        held = await scrape(gw)
    finally:
        redis_server.start()  # with its data (AOF)
    assert value(held, "gateway_quota_fail_open_charges_total") == 3
    assert value(held, "gateway_quota_pending_writes") == 3
    assert value(held, "gateway_quota_spool_entries") == 3
    assert by_label(held, "gateway_quota_decisions_total", "outcome", meter="api_calls") == {
        "allowed": 1,
        "fail_open": 3,
    }
    errors = "gateway_counter_store_errors_total"
    assert value(held, errors, call="check_and_charge", kind="error") == 3

    async def drained() -> bool:
        samples = await scrape(gw)
        return value(samples, "gateway_quota_pending_writes") == 0

    await eventually(drained)
    after = await scrape(gw)
    assert value(after, "gateway_quota_spool_entries") == 0
    assert value(after, "gateway_quota_fail_open_charges_total") == 3  # a count, not a level


async def test_tenant_labels_are_capped_to_the_busiest(
    quota_redis_config: Any, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(
        quota_redis_config(metrics={"tenant_label": True, "tenant_label_top": 2})
    )
    for tenant, times in (("acme", 2), ("beta", 2), ("gamma", 3)):
        for _ in range(times):
            await call(gw, tenant)
    samples = await scrape(gw)
    per_tenant = by_label(samples, "gateway_tenant_quota_decisions_total", "tenant")
    assert per_tenant == {"acme": 2, "beta": 2, OTHER_TENANTS: 3}
    assert by_label(
        samples, "gateway_tenant_quota_decisions_total", "outcome", tenant=OTHER_TENANTS
    ) == {"allowed": 2, "rate_limited": 1}


async def test_tenant_labels_off_by_default(
    quota_redis_config: Any, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(quota_redis_config())
    await call(gw, "acme")
    assert not any(name.startswith("gateway_tenant_") for name, _ in await scrape(gw))


def test_the_busiest_tenants_take_the_labels_at_each_rebalance() -> None:
    registry = CollectorRegistry()
    family = Counter("decisions", "", ["tenant", "meter", "outcome"], registry=registry)
    now = [0.0]
    tallies = TenantTallies(family, top=2, rebalance_s=60, clock=lambda: now[0])

    def traffic(counts: Mapping[str, int]) -> None:
        for tenant, times in counts.items():
            for _ in range(times):
                tallies.tally(tenant, ("api_calls",)).count("allowed")

    def tenants() -> dict[str, float]:
        found: dict[str, float] = {}
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == "decisions_total" and sample.labels["outcome"] == "allowed":
                    found[sample.labels["tenant"]] = sample.value
        return found

    traffic({"a": 1, "b": 5, "c": 9})  # a and b took the free labels
    assert tenants() == {"a": 1, "b": 5, OTHER_TENANTS: 9}
    now[0] = 61.0
    traffic({"c": 1})  # c, the busiest of the window, takes a's label; a's series goes
    assert tallies.labelled == {"b", "c"}
    assert tenants() == {"b": 5, "c": 1, OTHER_TENANTS: 9}
    traffic({"a": 3})  # a counts as one of the others now, never more than top + 1 series
    assert tenants() == {"b": 5, "c": 1, OTHER_TENANTS: 12}


async def test_process_collectors_on_a_gateway_own_registry(
    quota_redis_config: Any,
) -> None:
    gw = Gateway(parse(quota_redis_config(), "test.yaml"))  # no registry given: its own
    await gw.start()
    try:
        names = {name for name, _ in await scrape(gw)}
    finally:
        await gw.stop()
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert "python_gc_collections_total" in names


async def test_a_held_event_loop_shows_in_its_lag(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    # The process's CPU busy elsewhere for a second: every timer runs late.
    asyncio.get_running_loop().call_soon(time.sleep, 1.0)
    await asyncio.sleep(LAG_SAMPLE_S * 2)

    async def sampled() -> bool:
        samples = await scrape(gw)
        return value(samples, "gateway_event_loop_lag_seconds_count") >= 2

    await eventually(sampled)
    samples = await scrape(gw)
    count = value(samples, "gateway_event_loop_lag_seconds_count")
    # The sample that spanned the hold was at least its length less one interval late.
    assert value(samples, "gateway_event_loop_lag_seconds_bucket", le="0.5") < count
    assert value(samples, "gateway_event_loop_lag_seconds_sum") >= 1.0 - LAG_SAMPLE_S


async def test_the_metrics_listener_serves_metrics_and_probes_but_not_the_admin_api(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    data = gateway_config(upstream.url, metrics={"port": 0, "host": "127.0.0.1"})
    gw = await make_gateway(data)
    assert gw.metrics_port not in (0, gw.port, gw.admin_port)
    base = f"http://127.0.0.1:{gw.metrics_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert "gateway_requests_total" in await resp.text()
        for probe in ("/healthz", "/readyz"):
            async with http.get(base + probe) as resp:
                assert resp.status == 200, probe
        headers = {"Authorization": "Bearer whatever"}
        async with http.get(f"{base}/admin/tenants", headers=headers) as resp:
            assert resp.status == 404
        gw.readiness.ready = False  # as on SIGTERM
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503


async def test_without_a_metrics_port_there_is_no_metrics_listener(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    assert gw.metrics_port == 0


class Blocking(Collector):
    """A collector that holds whoever collects until told to go on (5 s at most)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.released = False

    def collect(self) -> list[Metric]:
        self.entered.set()
        self.released = self.go.wait(5)
        return []


async def test_a_slow_scrape_holds_no_request(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    """/metrics is rendered off the event loop: a registry that takes long to collect
    (many routes or tenants) does not hold the requests of the public listener."""
    gw = await make_gateway(gateway_config(upstream.url))
    blocking = Blocking()
    gw.registry.register(blocking)
    scraping = asyncio.create_task(scrape(gw))
    assert await asyncio.to_thread(blocking.entered.wait, 10)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gw.port}/v1/things") as resp:
            assert resp.status == 200  # served while the scrape is still collecting
    blocking.go.set()
    await scraping
    assert blocking.released  # the collector was let go, not timed out
