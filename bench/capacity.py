"""A capacity model on paper: what 100,000 and 1,000,000 req/s need, from measured CPU.

Each part's busy cores are the rate times its CPU per request (per usage event
for the worker and PostgreSQL; one event per request here); divided by a safe
utilization and rounded up, the processes (one core each) to run. Usage:
python -m bench.capacity --gateway-us N --redis-us N --worker-us N
--postgres-us N, with figures from `bash scripts/bench`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

RATES = (100_000, 1_000_000)


@dataclass(frozen=True)
class Part:
    """One kind of process and how busy it may run."""

    name: str
    unit: str
    utilization: float  # of each core, leaving headroom for bursts and failover


# A Redis shard is one core (its commands run on one thread): kept at half, so
# that a shard absorbs a neighbour's slots or a burst without queueing. The
# Python processes at 70%: beyond that their event loops add latency.
PARTS = (
    Part("gateway", "`gateway serve` processes (1 core each)", 0.7),
    Part("redis", "Redis Cluster primaries (1 core each)", 0.5),
    Part("worker", "`gateway worker` processes (1 core each)", 0.7),
    Part("postgres", "PostgreSQL cores (primary)", 0.6),
)


@dataclass(frozen=True)
class Costs:
    """Measured CPU per request in µs (per usage event for worker and PostgreSQL)."""

    gateway_us: float
    redis_us: float
    worker_us: float
    postgres_us: float

    def of(self, part: str) -> float:
        return float(getattr(self, f"{part}_us"))


def busy_cores(us_per_request: float, rate: float) -> float:
    """Cores kept fully busy: CPU seconds per second."""
    return rate * us_per_request / 1e6


def processes(us_per_request: float, rate: float, utilization: float) -> int:
    """Processes of one core each to carry `rate` at `utilization`."""
    return math.ceil(busy_cores(us_per_request, rate) / utilization)


def report(costs: Costs, rates: tuple[int, ...] = RATES) -> None:
    """A Markdown table: each part's µs, utilization and, per rate, the arithmetic and count."""
    header = ["part", "µs/req", "utilization", *(f"{rate:,} req/s" for rate in rates)]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for part in PARTS:
        us = costs.of(part.name)
        cells = [
            f"{busy_cores(us, rate):,.1f} / {part.utilization:.1f} = "
            f"**{processes(us, rate, part.utilization):,}**"
            for rate in rates
        ]
        print(f"| {part.unit} | {us:,.1f} | {part.utilization:.0%} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for part in PARTS:
        parser.add_argument(f"--{part.name}-us", type=float, required=True)
    args = parser.parse_args()
    report(Costs(args.gateway_us, args.redis_us, args.worker_us, args.postgres_us))


if __name__ == "__main__":
    main()
