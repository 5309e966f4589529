"""One exposition from the scrapes of every process under a supervisor.

Each process keeps its own registry (no shared-memory metric values on the
request path); the supervisor reads every process's `/metrics` and merges:

- counters and histograms (buckets, sums, counts): summed per label set, so a
  scrape is the total across the processes;
- gauges: summed (requests in flight, writes waiting: the node's total), except
  the `*_timestamp_seconds` ones, where the latest is the answer;
- `process_*` and `python_*` (CPU, memory, file descriptors, the interpreter):
  kept per process with a `worker` label (its index), as a sum of start times
  or of fd limits means nothing.

A process that exits takes its counts with it; the merge keeps the counters
and histograms of its last scrape (`retire`), so the totals never go back,
which Prometheus would read as a reset. What it counted after that scrape is
lost, as it would be with one process killed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PER_PROCESS = ("process_", "python_")
WORKER_LABEL = "worker"
_SUMMED = ("counter", "histogram", "summary", "gaugehistogram")

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


@dataclass
class _Family:
    name: str
    documentation: str
    typ: str
    values: dict[SampleKey, float] = field(default_factory=dict)


def parse(text: str) -> list[Metric]:
    """The families of one process's text exposition."""
    return list(text_string_to_metric_families(text))


def _key(name: str, labels: dict[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


class Merger:
    """Merges the latest scrape of each process with what exited processes left."""

    def __init__(self) -> None:
        self._retired: dict[str, _Family] = {}  # counters and histograms of exited processes

    def retire(self, families: Iterable[Metric]) -> None:
        """Keep an exited process's counters and histograms in every later merge."""
        for family in families:
            if family.type in _SUMMED and not family.name.startswith(PER_PROCESS):
                _add(self._retired, family, {})

    def merge(self, scrapes: dict[int, list[Metric]]) -> list[Metric]:
        """One family list from the scrapes of the live processes, by worker index."""
        merged: dict[str, _Family] = {
            name: _Family(f.name, f.documentation, f.typ, dict(f.values))
            for name, f in self._retired.items()
        }
        for index in sorted(scrapes):
            for family in scrapes[index]:
                extra = {WORKER_LABEL: str(index)} if family.name.startswith(PER_PROCESS) else {}
                _add(merged, family, extra)
        return [_metric(f) for f in merged.values()]


def _add(into: dict[str, _Family], family: Metric, extra: dict[str, str]) -> None:
    target = into.get(family.name)
    if target is None:
        target = into[family.name] = _Family(family.name, family.documentation, family.type)
    latest = family.type == "gauge" and family.name.endswith("_timestamp_seconds")
    for sample in family.samples:
        key = _key(sample.name, {**sample.labels, **extra})
        if key not in target.values:
            target.values[key] = sample.value
        elif latest:
            target.values[key] = max(target.values[key], sample.value)
        else:
            target.values[key] += sample.value


def _metric(family: _Family) -> Metric:
    metric = Metric(family.name, family.documentation, family.typ)
    for (name, labels), value in family.values.items():
        metric.add_sample(name, dict(labels), value)
    return metric
