"""One exposition from the metrics of every process under a supervisor.

Each process keeps its own registry (no shared-memory metric values on the
request path) and hands it to the supervisor as JSON (`encode`): the text
exposition would do, but parsing it in Python costs about 30 µs a series,
seconds for a config with thousands of routes. The supervisor merges:

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

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

# Where a process serves `encode` on its private admin socket.
SAMPLES_PATH = "/_supervisor/metrics"
PER_PROCESS = ("process_", "python_")
WORKER_LABEL = "worker"
_SUMMED = ("counter", "histogram", "summary", "gaugehistogram")

Sample = tuple[str, dict[str, str], float]  # sample name, labels, value
SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


@dataclass(frozen=True)
class Family:
    """One metric family as a process reported it."""

    name: str
    typ: str
    documentation: str
    samples: list[Sample]


def encode(registry: CollectorRegistry) -> bytes:
    """A registry's families as JSON (Infinity and NaN as Python's json writes them)."""
    return json.dumps(
        [
            [m.name, m.type, m.documentation, [[s.name, s.labels, s.value] for s in m.samples]]
            for m in registry.collect()
        ],
        separators=(",", ":"),
    ).encode()


def decode(body: bytes) -> list[Family]:
    """The families `encode` wrote."""
    raw: list[list[Any]] = json.loads(body)
    return [
        Family(name, typ, doc, [(s[0], s[1], float(s[2])) for s in samples])
        for name, typ, doc, samples in raw
    ]


@dataclass
class _Merged:
    name: str
    typ: str
    documentation: str
    values: dict[SampleKey, float] = field(default_factory=dict)


class Merger:
    """Merges the latest scrape of each process with what exited processes left."""

    def __init__(self) -> None:
        self._retired: dict[str, _Merged] = {}  # counters and histograms of exited processes

    def retire(self, families: Iterable[Family]) -> None:
        """Keep an exited process's counters and histograms in every later merge."""
        for family in families:
            if family.typ in _SUMMED and not family.name.startswith(PER_PROCESS):
                _add(self._retired, family, {})

    def merge(self, scrapes: dict[int, list[Family]]) -> list[Metric]:
        """One family list from the scrapes of the live processes, by worker index."""
        merged = {
            name: _Merged(f.name, f.typ, f.documentation, dict(f.values))
            for name, f in self._retired.items()
        }
        for index in sorted(scrapes):
            for family in scrapes[index]:
                extra = {WORKER_LABEL: str(index)} if family.name.startswith(PER_PROCESS) else {}
                _add(merged, family, extra)
        return [_metric(f) for f in merged.values()]


def _add(into: dict[str, _Merged], family: Family, extra: dict[str, str]) -> None:
    target = into.get(family.name)
    if target is None:
        target = into[family.name] = _Merged(family.name, family.typ, family.documentation)
    latest = family.typ == "gauge" and family.name.endswith("_timestamp_seconds")
    values = target.values
    for name, labels, value in family.samples:
        every = {**labels, **extra} if extra else labels
        key = (name, tuple(sorted(every.items())))
        if key not in values:
            values[key] = value
        elif latest:
            values[key] = max(values[key], value)
        else:
            values[key] += value


def _metric(family: _Merged) -> Metric:
    metric = Metric(family.name, family.documentation, family.typ)
    for (name, labels), value in family.values.items():
        metric.add_sample(name, dict(labels), value)
    return metric
