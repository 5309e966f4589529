"""Proxy throughput, latency and cost: the gateway against a naive proxy and HAProxy.

Starts nginx (the upstream), the naive aiohttp proxy, HAProxy with JWT checks
and a per-tenant counter, and the gateway with full enforcement, each its own
process on loopback (see bench/stack.py). The target under test runs alone on
CPU 1, everything else on CPU 0. Each target gets the same wrk load in
interleaved rounds (medians shown); then hey paces nginx and the gateway at
half the gateway's maximum for the latency the gateway adds.
Usage: python -m bench.proxy [--duration S] [--rounds N] [--connections N] [--tenants N]
  [--access-log-ab] (also a gateway with its access log off, in the same rounds)
  [--layers] (also the gateway with fewer layers: what each one costs)
With --scale, the scale benchmark instead (bench/scale.py): 10 vs 100,000
active tenants, 10 vs 10,000 routes, Redis memory per tenant-meter.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import FrameType

import redis

from bench import measure, scale
from bench.measure import SHARED_CPU, TEST_CPU, Load
from bench.stack import LAYERS, PATH, STREAMS, Stack, Target

WARMUP_S = 3.0
DRAIN_TIMEOUT_S = 30.0
LOG_FLUSH_S = 0.5  # more than the access log's flush interval
Stages = dict[str, tuple[float, float]]  # p50 and p99 in ms by stage (measure.STAGES)


@dataclass(frozen=True)
class Run:
    """One wrk run of one target; costs in µs of CPU per request, NaN where they do not apply."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: float
    proxy_us: float
    redis_us: float = float("nan")
    worker_us: float = float("nan")
    redis_round_trips: float = float("nan")


def median_run(runs: list[Run]) -> Run:
    """Each figure's median over the rounds."""
    return Run(*(statistics.median(getattr(r, f.name) for r in runs) for f in fields(Run)))


class Bench:
    """The started stack and the wrk load every target gets."""

    def __init__(self, stack: Stack, args: argparse.Namespace, pinning: bool) -> None:
        self.stack = stack
        self.args = args
        self.pinning = pinning
        tenants = [f"tenant-{i:05d}" for i in range(args.tenants)]
        self.tokens, self.script = stack.tokens(tenants)
        nginx = stack.nginx()
        self.gw = stack.gateway(nginx.port, tenants)
        self.targets = [
            nginx,
            stack.bare_proxy(nginx.port),
            stack.haproxy(nginx.port, limit=10**9),
            self.gw.target,
        ]
        # With --layers, the same gateway with fewer layers, in the same rounds; with
        # --access-log-ab, only the one without its access log.
        layers = list(LAYERS) if args.layers else ["quota"] if args.access_log_ab else []
        self.layers = [
            stack.gateway_layer(layer, nginx.port, tenants, self.gw.stores) for layer in layers
        ]
        self.targets += self.layers
        self.redis = redis.Redis.from_url(self.gw.stores.redis_url)

    def url(self, target: Target) -> str:
        return f"http://127.0.0.1:{target.port}{PATH}"

    def _pin(self, target: Target, cpu: int) -> None:
        if self.pinning and target.pinned:
            measure.pin(target.pid, cpu)

    def load(self, target: Target, duration_s: float) -> tuple[Load, dict[str, float]]:
        """One wrk run on `target` alone on the test CPU; CPU seconds and segments spent."""
        gw, stores = self.gw, self.gw.stores
        watched = {"proxy": target.pid, "redis": stores.redis_pid, "worker": gw.worker_pid}
        self._pin(target, TEST_CPU)
        try:
            before = {name: measure.cpu_s(pid) for name, pid in watched.items()}
            gw_pids = set(measure.process_tree(gw.target.pid))
            segments = measure.segments_sent(gw_pids, stores.redis_port)
            load = measure.wrk(
                self.url(target), duration_s, self.args.connections, self.script, str(self.tokens)
            )
            if target is gw.target:  # the worker's share: until it has written every event
                measure.wait_drained(self.redis, STREAMS, DRAIN_TIMEOUT_S)
            spent = {name: measure.cpu_s(pid) - before[name] for name, pid in watched.items()}
            spent["segments"] = measure.segments_sent(gw_pids, stores.redis_port) - segments
        finally:
            self._pin(target, SHARED_CPU)
        return load, spent

    def run(self, target: Target) -> Run:
        load, spent = self.load(target, self.args.duration)
        per_request_us = 1e6 / max(load.requests, 1)
        figures = Run(
            load.rps, load.p50_ms, load.p99_ms, load.errors, spent["proxy"] * per_request_us
        )
        if target is not self.gw.target:
            return figures
        return replace(
            figures,
            redis_us=spent["redis"] * per_request_us,
            worker_us=spent["worker"] * per_request_us,
            redis_round_trips=spent["segments"] / max(load.requests, 1),
        )

    def paced(self, target: Target, rate: float) -> tuple[Load, Stages]:
        """hey at a fixed total `rate`, each of its processes with another tenant's token;
        for a gateway, also its stages' times from the access log it wrote meanwhile."""
        tokens = self.tokens.read_text().split()[: measure.HEY_PROCESSES]
        headers = [f"Authorization: Bearer {token}" for token in tokens]
        log = target.access_log
        offset = log.stat().st_size if log is not None else 0
        self._pin(target, TEST_CPU)
        try:
            load = measure.hey(self.url(target), rate, self.args.duration, headers, self.stack.tmp)
        finally:
            self._pin(target, SHARED_CPU)
        if log is None:
            return load, {}
        time.sleep(LOG_FLUSH_S)  # the access log's lines are written in batches
        return load, measure.stages(log, offset)


_WIDTHS = (8, 7, 7, 6, 10, 12, 13, 12)


def _cell(value: float, digits: int) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"  # NaN: does not apply


def _table(results: dict[str, Run]) -> None:
    columns = ("req/s", "p50 ms", "p99 ms", "errors", "CPU µs/req", "Redis µs/req",
               "worker µs/req", "Redis RT/req")  # fmt: skip
    print(f"{'target':28} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, _WIDTHS, strict=True)))
    for name, r in results.items():
        cells = (f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.errors:.0f}",
                 _cell(r.proxy_us, 1), _cell(r.redis_us, 1), _cell(r.worker_us, 1),
                 _cell(r.redis_round_trips, 3))  # fmt: skip
        print(f"{name:28} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS, strict=True)))


def _notes(bench: Bench, paced: dict[str, Load], rate: float, stages: Stages) -> list[str]:
    args, nginx, gw = bench.args, paced["nginx"], paced["gateway"]
    cpus = (
        f"the target under test alone on CPU {TEST_CPU}; wrk, hey, nginx, Redis, PostgreSQL, "
        f"the usage worker, this script and the idle targets on CPU {SHARED_CPU} (nginx stays "
        "there also when loaded directly, as it is behind every proxy)"
        if bench.pinning
        else "not pinned: this machine does not offer CPUs 0 and 1"
    )
    processes = measure.HEY_PROCESSES
    return [
        f"CPUs: {cpus}.",
        "CPU µs/req: utime+stime from /proc/<pid>/stat (every thread and child process) over "
        "the run, divided by the requests wrk completed: the target's own process, and for the "
        "gateway redis-server and `gateway worker`, counted until the worker has acknowledged "
        "every event.",
        "Redis RT/req: TCP segments with data that the gateway process sent to Redis (ss -ti "
        "data_segs_out of its own sockets; the worker's are not counted), per request. A "
        "command or a whole pipeline leaves in one send, so this counts round trips, not "
        "commands.",
        f"p99 at a fixed rate (p99_added_ms): {processes} processes of hey -c 1 -q "
        f"{rate / processes:.1f} -z {args.duration:g}s, started 1/{rate:,.0f} s apart, "
        f"{rate:,.0f} req/s in all (half the gateway's maximum), each with another tenant's "
        f"token; medians of {args.rounds}: nginx direct p50 {nginx.p50_ms:.2f} ms, p99 "
        f"{nginx.p99_ms:.2f} ms at {nginx.rps:,.0f} req/s; gateway p50 {gw.p50_ms:.2f} ms, "
        f"p99 {gw.p99_ms:.2f} ms at {gw.rps:,.0f} req/s. A hey worker waits for each answer, "
        "so one slower than its interval delays the next request: not a strict open loop "
        "(wrk2 is not packaged).",
        *_stage_note(stages),
    ]


_STAGE_NAMES = {
    "quota_ms": "the quota check (quota_ms: the Redis round trip, waiting to join one included)",
    "upstream_ms": "the upstream (upstream_ms)",
    "own_ms": "the rest (admission, forwarding, queueing in its event loop)",
}


def _stage_note(stages: Stages) -> list[str]:
    if not stages:
        return []
    parts = [
        f"{_STAGE_NAMES[stage]} p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        for stage, (p50, p99) in stages.items()
    ]
    return [
        "Where the gateway's time went at that rate, from its access log (each request's "
        "stages; medians of the rounds): " + "; ".join(parts) + "."
    ]


def report(
    bench: Bench, results: dict[str, Run], paced: dict[str, Load], rate: float, stages: Stages
) -> None:
    """The table, what its figures are, and the RESULT line."""
    args = bench.args
    print(
        f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s, GET {PATH} (70-byte JSON from "
        f"nginx), each request the next of {args.tenants:,} tenants' tokens; median of "
        f"{args.rounds} interleaved rounds"
    )
    _table(results)
    for note in _notes(bench, paced, rate, stages):
        print(textwrap.fill(note, 100, initial_indent="  ", subsequent_indent="    "))
    bare, haproxy, gateway = (results[t.name] for t in bench.targets[1:4])
    if bench.layers:
        _layers(bench, results)
    nginx, gw = paced["nginx"], paced["gateway"]
    print(
        f"RESULT ratio_vs_bare={gateway.rps / bare.rps:.3f} "
        f"ratio_vs_haproxy={gateway.rps / haproxy.rps:.3f} "
        f"p99_added_ms={gw.p99_ms - nginx.p99_ms:.2f} "
        f"redis_roundtrips_per_req={gateway.redis_round_trips:.3f}"
    )


def _layers(bench: Bench, results: dict[str, Run]) -> None:
    """What each layer of the gateway adds to the one before it, in CPU per request."""
    bare = results[bench.targets[1].name]
    print("\nthe gateway's layers, each on top of those before it (same rounds):")
    print(f"{'layer':28} {'req/s':>8} {'vs naive':>9} {'CPU µs/req':>11} {'added':>8}")
    before = None
    for target in [*bench.layers, bench.gw.target]:
        run = results[target.name]
        added = "" if before is None else f"{run.proxy_us - before:+.1f}"
        name = target.name if target is not bench.gw.target else "gw: + access log (full)"
        print(
            f"{name:28} {run.rps:>8,.0f} {run.rps / bare.rps:>9.2f} {run.proxy_us:>11.1f} "
            f"{added:>8}"
        )
        before = run.proxy_us


def median_load(loads: list[Load]) -> Load:
    return Load(*(statistics.median(getattr(x, f.name) for x in loads) for f in fields(Load)))


def benchmark(args: argparse.Namespace, pinning: bool) -> None:
    with Stack() as stack:
        bench = Bench(stack, args, pinning)
        for target in bench.targets:
            bench.load(target, WARMUP_S)  # connections, tenant and token caches
        # Rounds interleave the targets so that a noisy moment on the machine
        # hits all of them alike; each figure is the median.
        runs: dict[str, list[Run]] = {t.name: [] for t in bench.targets}
        for _ in range(args.rounds):
            for target in bench.targets:
                runs[target.name].append(bench.run(target))
        results = {name: median_run(rs) for name, rs in runs.items()}
        rate = results[bench.gw.target.name].rps / 2
        paced: dict[str, list[Load]] = {"nginx": [], "gateway": []}
        stage_runs: list[Stages] = []
        for _ in range(args.rounds):
            paced["nginx"].append(bench.paced(bench.targets[0], rate)[0])
            load, stages = bench.paced(bench.gw.target, rate)
            paced["gateway"].append(load)
            stage_runs.append(stages)
        medians = {k: median_load(v) for k, v in paced.items()}
        report(bench, results, medians, rate, median_stages(stage_runs))


def median_stages(runs: list[Stages]) -> Stages:
    """Each stage's p50 and p99, the medians over the rounds that logged it."""
    found = {stage for run in runs for stage in run}
    return {
        stage: (
            statistics.median(run[stage][0] for run in runs if stage in run),
            statistics.median(run[stage][1] for run in runs if stage in run),
        )
        for stage in measure.STAGES
        if stage in found
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds the stack: every process stops


def _out_of_time(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("the benchmark ran past --timeout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, help="seconds per run (default 8, --scale 5)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target (median shown)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--tenants", type=int, default=1000, help="tokens rotated by wrk")
    parser.add_argument("--timeout", type=int, help="seconds before giving up (600, --scale 1800)")
    parser.add_argument(
        "--access-log-ab", action="store_true",
        help="also load a gateway with its access log off, for the log's cost",
    )  # fmt: skip
    parser.add_argument(
        "--layers", action="store_true",
        help="also load the gateway with forwarding only, + JWT and tenant, + quota and events"
        " (access log off), for what each layer costs",
    )  # fmt: skip
    parser.add_argument("--scale", action="store_true", help="the scale benchmark instead")
    parser.add_argument("--scale-tenants", type=int, default=100_000, help="active tenants")
    parser.add_argument("--scale-routes", type=int, default=10_000, help="routes configured")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 5 if args.scale else 8
    if args.timeout is None:
        args.timeout = 1800 if args.scale else 600
    os.chdir(Path(__file__).resolve().parent.parent)
    pinning = {TEST_CPU, SHARED_CPU} <= os.sched_getaffinity(0)
    if pinning:
        os.sched_setaffinity(0, {SHARED_CPU})  # every process started from here inherits it
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(args.timeout)
    try:
        (scale.benchmark if args.scale else benchmark)(args, pinning)
    finally:
        signal.alarm(0)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
