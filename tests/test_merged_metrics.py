"""Merging the scrapes of several processes into one exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.merged_metrics import Family, Merger, decode, encode


class Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def process(requests: int, in_flight: int, seen_at: float, latencies: list[float]) -> list[Family]:
    """One process's scrape, through the wire form the supervisor reads."""
    registry = CollectorRegistry()
    Counter("gateway_requests", "r", ["route"], registry=registry).labels("api").inc(requests)
    Gauge("gateway_requests_in_flight", "f", registry=registry).set(in_flight)
    Gauge("gateway_jwks_last_success_timestamp_seconds", "t", registry=registry).set(seen_at)
    Gauge("process_open_fds", "fds", registry=registry).set(10 + requests)
    histogram = Histogram("gateway_d_seconds", "d", buckets=(0.1, 1.0), registry=registry)
    for latency in latencies:
        histogram.observe(latency)
    return decode(encode(registry))


def values(families: list[Metric]) -> dict[str, float]:
    """`name{labels}` -> value, through a rendering and a parse (what a scrape sees)."""
    registry = CollectorRegistry()
    registry.register(Families(families))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_counters_histograms_and_gauges_sum_timestamps_take_the_latest() -> None:
    merged = values(
        Merger().merge(
            {0: process(3, 1, 100.0, [0.05, 0.5]), 1: process(4, 2, 200.0, [2.0])},
        )
    )
    assert merged["gateway_requests_total{route=api}"] == 7
    assert merged["gateway_requests_in_flight{}"] == 3
    assert merged["gateway_jwks_last_success_timestamp_seconds{}"] == 200.0
    assert merged["gateway_d_seconds_bucket{le=0.1}"] == 1
    assert merged["gateway_d_seconds_bucket{le=1.0}"] == 2
    assert merged["gateway_d_seconds_bucket{le=+Inf}"] == 3
    assert merged["gateway_d_seconds_count{}"] == 3
    assert merged["gateway_d_seconds_sum{}"] == 2.55


def test_process_metrics_stay_per_process() -> None:
    merged = values(Merger().merge({0: process(3, 0, 0, []), 1: process(4, 0, 0, [])}))
    assert merged["process_open_fds{worker=0}"] == 13
    assert merged["process_open_fds{worker=1}"] == 14
    assert "process_open_fds{}" not in merged


def test_an_exited_process_keeps_its_counts_and_loses_its_gauges() -> None:
    merger = Merger()
    first = process(5, 2, 100.0, [0.05])
    before = values(merger.merge({0: first, 1: process(1, 1, 0, [])}))
    merger.retire(first)
    # Its replacement starts from zero: the totals must not go back.
    after = values(merger.merge({0: process(0, 0, 0, []), 1: process(2, 1, 0, [])}))
    assert before["gateway_requests_total{route=api}"] == 6
    assert after["gateway_requests_total{route=api}"] == 7
    assert after["gateway_d_seconds_count{}"] == 1
    assert after["gateway_requests_in_flight{}"] == 1
    assert after["process_open_fds{worker=0}"] == 10
