"""Scale: the gateway with 10 vs 100,000 active tenants and 10 vs 10,000 routes.

One private Redis, PostgreSQL and `gateway worker`; the ledger seeded with
100,000 tenants; three `gateway serve` processes under full enforcement (the
proxy benchmark's config) with 1, 10 and 10,000 routes. wrk loads one of them
at a time, alone on the test CPU, each request the next of a list built from a
tokens file and a paths file: 10 or all 100,000 tenants on the 1-route
gateway, 1,000 tenants over every route of the 10- and 10,000-route gateways.
A first pass sends every request of each list once (cold caches, and every
tenant charged); then interleaved rounds, medians. After the tenant rounds,
Redis memory per tenant-meter counter. `python -m bench.proxy --scale`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import textwrap
import time
import urllib.request
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from math import nan
from pathlib import Path

import redis

from bench import capacity, measure, redis_memory
from bench.measure import SHARED_CPU, TEST_CPU, Load
from bench.redis_memory import RedisMemory
from bench.stack import PATH, ROTATE_LUA, STREAMS, Stack, Target, gateway_config, mint_tokens
from gateway.ledger import Ledger
from gateway.ledger.records import Tenant

FEW = 10
ROUTE_TENANTS = 1000
SEED_CONCURRENCY = 10  # the ledger's connection pool
FIRST_PASS_CHUNK_S = 5.0  # wrk runs of the first pass, until every request was sent once
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Config:
    """One row of the table: a gateway and the requests rotated across it."""

    name: str
    target: Target
    tokens: Path
    paths: Path
    distinct: int  # requests in the rotation


@dataclass(frozen=True)
class Figures:
    """One run; costs in µs of CPU per request."""

    rps: float
    p99_ms: float
    errors: float
    gateway_us: float
    redis_us: float
    worker_us: float
    postgres_us: float


def median_figures(runs: list[Figures]) -> Figures:
    return Figures(*(statistics.median(getattr(r, f.name) for r in runs) for f in fields(Figures)))


def numbered_routes(count: int) -> list[dict[str, object]]:
    """Route i matches /v1/r{i}/**; every one charges the meter."""
    return [
        {"name": f"r{i}", "match": {"path": f"/v1/r{i}/**"}, "upstream": "app",
         "charge": {"api_calls": 1}}
        for i in range(count)
    ]  # fmt: skip


async def seed(dsn: str, tenants: list[str], plan: str) -> None:
    """Create `tenants` through the ledger (what the config's `tenants:` does, concurrently)."""
    ledger = await Ledger.open(dsn)
    now = datetime.now(UTC)
    try:
        for start in range(0, len(tenants), SEED_CONCURRENCY):
            await asyncio.gather(
                *(
                    ledger.create_tenant_if_missing(Tenant(tenant, plan, "active", now))
                    for tenant in tenants[start : start + SEED_CONCURRENCY]
                )
            )
    finally:
        await ledger.close()


class ScaleBench:
    """The stack with its three gateways, and the load each configuration gets."""

    def __init__(self, stack: Stack, args: argparse.Namespace, pinning: bool) -> None:
        self.stack, self.args, self.pinning = stack, args, pinning
        self.notes: list[str] = []
        nginx = stack.nginx()
        self.stores = stores = stack.stores()
        tenants = [f"tenant-{i:06d}" for i in range(args.scale_tenants)]
        base = gateway_config(nginx.port, stores.redis_url, stores.dsn, [])
        one_route = stack.write_config("gateway-1", base)
        stack.migrate(one_route)
        started = time.perf_counter()
        asyncio.run(seed(stores.dsn, tenants, "bench"))
        self.seed_s = time.perf_counter() - started
        self.worker_pid = stack.worker(one_route)
        gateways: dict[int, Target] = {}
        self.start_s: dict[int, float] = {}
        for routes in (1, FEW, args.scale_routes):
            config = (
                one_route
                if routes == 1
                else stack.write_config(
                    f"gateway-{routes}", {**base, "routes": numbered_routes(routes)}
                )
            )
            started = time.perf_counter()
            gateways[routes] = stack.serve(f"{routes:,} route(s)", config)
            self.start_s[routes] = time.perf_counter() - started
        self.start_rss_kib = {n: measure.rss_kib(t.pid) for n, t in gateways.items()}
        self.gateways = gateways
        tokens = mint_tokens(tenants)
        single = self._file("path-single", [PATH])
        numbered = [f"/v1/r{i}/projects/1?expand=members" for i in range(args.scale_routes)]
        self.tenant_configs = [
            self._config(f"{n:,} tenants, 1 route", gateways[1], tokens[:n], single, [PATH])
            for n in (FEW, args.scale_tenants)
        ]
        self.route_configs = [
            self._config(
                f"{n:,} routes, {ROUTE_TENANTS:,} tenants", gateways[n],
                tokens[:ROUTE_TENANTS], self._file(f"paths-{n}", numbered[:n]), numbered[:n],
            )
            for n in (FEW, args.scale_routes)
        ]  # fmt: skip
        self.redis = redis.Redis.from_url(stores.redis_url)
        self.offsets: dict[str, int] = {}
        self.script = stack.tmp / "rotate.lua"
        self.script.write_text(ROTATE_LUA)

    def _file(self, name: str, lines: list[str]) -> Path:
        path = self.stack.tmp / f"{name}.txt"
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def _config(
        self, name: str, target: Target, tokens: list[str], paths: Path, path_list: list[str]
    ) -> Config:
        token_file = self._file(f"tokens-{len(tokens)}", tokens)
        return Config(name, target, token_file, paths, max(len(tokens), len(path_list)))

    def run(self, config: Config, duration_s: float) -> tuple[Load, dict[str, float]]:
        """One wrk run on `config` alone on the test CPU, costs counted until the worker is done."""
        watched = {
            "gateway": config.target.pid,
            "redis": self.stores.redis_pid,
            "worker": self.worker_pid,
            "postgres": self.stores.postgres_pid,
        }
        if self.pinning:
            measure.pin(config.target.pid, TEST_CPU)
        try:
            before = {name: measure.cpu_s(pid) for name, pid in watched.items()}
            offset = self.offsets.get(config.name, 0)
            load = measure.wrk(
                f"http://127.0.0.1:{config.target.port}/", duration_s, self.args.connections,
                self.script, str(config.tokens), str(config.paths), str(offset),
            )  # fmt: skip
            self.offsets[config.name] = offset + load.requests
            measure.wait_drained(self.redis, STREAMS, DRAIN_TIMEOUT_S)
            spent = {name: measure.cpu_s(pid) - before[name] for name, pid in watched.items()}
        finally:
            if self.pinning:
                measure.pin(config.target.pid, SHARED_CPU)
        return load, spent

    def first_pass(self, config: Config) -> Figures:
        """Runs until every request of the list was sent once; p99 is not kept."""
        requests, seconds, errors = 0, 0.0, 0
        spent: dict[str, float] = {}
        while requests < config.distinct:
            load, run_spent = self.run(config, FIRST_PASS_CHUNK_S)
            requests += load.requests
            seconds += load.requests / max(load.rps, 1e-9)
            errors += load.errors
            spent = {name: spent.get(name, 0.0) + cpu for name, cpu in run_spent.items()}
        return figures(Load(requests / seconds, nan, nan, requests, errors), spent)


def figures(load: Load, spent: dict[str, float]) -> Figures:
    per_request_us = 1e6 / max(load.requests, 1)
    return Figures(
        load.rps, load.p99_ms, load.errors,
        *(spent[name] * per_request_us for name in ("gateway", "redis", "worker", "postgres")),
    )  # fmt: skip


def interleaved(bench: ScaleBench, configs: list[Config]) -> dict[str, Figures]:
    """A first pass over each list, then the rounds; medians of the rounds."""
    args = bench.args
    for config in configs:
        first = bench.first_pass(config)
        bench.notes.append(
            f"First pass, {config.name} (each of its {config.distinct:,} requests sent at least "
            f"once, caches cold): {first.rps:,.0f} req/s, {first.errors:.0f} errors, gateway "
            f"{first.gateway_us:,.1f} µs/req, PostgreSQL {first.postgres_us:,.1f} µs/req."
        )
    runs: dict[str, list[Figures]] = {c.name: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            runs[config.name].append(figures(*bench.run(config, args.duration)))
    return {name: median_figures(rs) for name, rs in runs.items()}


_COLUMNS = ("req/s", "p99 ms", "errors", "gateway µs/req", "Redis µs/req", "worker µs/req",
            "PostgreSQL µs/req")  # fmt: skip
_WIDTHS = (8, 7, 6, 14, 12, 13, 17)


def _row(first: str, cells: tuple[str, ...]) -> str:
    return f"{first:30} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS, strict=True))


def _table(results: dict[str, Figures]) -> None:
    print(_row("configuration", _COLUMNS))
    for name, r in results.items():
        cells = (f"{r.rps:,.0f}", f"{r.p99_ms:.2f}", f"{r.errors:.0f}", f"{r.gateway_us:,.1f}",
                 f"{r.redis_us:,.1f}", f"{r.worker_us:,.1f}", f"{r.postgres_us:,.1f}")  # fmt: skip
        print(_row(name, cells))


def _ratio(label: str, many: Figures, few: Figures) -> float:
    ratio = many.rps / few.rps
    verdict = "within 10%" if ratio >= 0.9 else "NOT within 10%"
    print(f"  {label}: {ratio:.3f} ({verdict})")
    return ratio


def scrape(target: Target) -> tuple[str, float]:
    """The gateway's /metrics and the seconds it took."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{target.admin_port}/metrics", timeout=60) as r:
        text = r.read().decode()
    return text, time.perf_counter() - started


_STATUS = re.compile(r'^gateway_requests_total\{[^}]*status="(\d+)"[^}]*\} ([\d.e+]+)$', re.M)
# Why a request failed inside the gateway: the counter store's and the ledger's failed calls.
_FAILED = re.compile(r"^gateway_(counter_store|ledger)_errors_total\{([^}]*)\} ([\d.e+]+)$", re.M)


def _gateway_notes(bench: ScaleBench) -> list[str]:
    notes = [
        f"Setup: {bench.args.scale_tenants:,} tenants created through "
        f"Ledger.create_tenant_if_missing, {SEED_CONCURRENCY} at a time, in {bench.seed_s:.1f} s."
    ]
    for routes, target in bench.gateways.items():
        text, scrape_s = scrape(target)
        statuses: dict[str, float] = {}
        for status, count in _STATUS.findall(text):
            statuses[status] = statuses.get(status, 0) + float(count)
        answered = ", ".join(f"{n:,.0f} × {status}" for status, n in sorted(statuses.items()))
        failed = [
            f"{float(n):,.0f} {what.replace('_', ' ')} ({labels.replace(chr(34), '')})"
            for what, labels, n in _FAILED.findall(text)
            if float(n)
        ]
        if failed:
            answered += "; failed calls: " + ", ".join(failed)
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        notes.append(
            f"Gateway with {routes:,} route(s): up in {bench.start_s[routes]:.1f} s, RSS "
            f"{bench.start_rss_kib[routes] / 1024:,.0f} MiB at start and "
            f"{measure.rss_kib(target.pid) / 1024:,.0f} MiB after the runs; /metrics "
            f"{len(text):,} B, {series:,} series, {scrape_s * 1000:,.0f} ms; answered {answered}."
        )
    return notes


def report(
    bench: ScaleBench, results: dict[str, Figures], memory: RedisMemory
) -> tuple[float, float]:
    """The table, the ratios, the notes; returns the tenants and routes ratios."""
    args = bench.args
    cpus = (
        f"the gateway loaded alone on CPU {TEST_CPU}, everything else on CPU {SHARED_CPU}"
        if bench.pinning
        else "not pinned"
    )
    print(
        f"\nscale: wrk -t1 -c{args.connections} -d{args.duration:g}s per run, median of "
        f"{args.rounds} interleaved rounds after a first pass over every request of each "
        f"list; {cpus}"
    )
    _table(results)
    few_tenants, many_tenants = (results[c.name] for c in bench.tenant_configs)
    few_routes, many_routes = (results[c.name] for c in bench.route_configs)
    print("throughput ratios:")
    tenants_ratio = _ratio(f"{args.scale_tenants:,}/{FEW} tenants", many_tenants, few_tenants)
    routes_ratio = _ratio(f"{args.scale_routes:,}/{FEW} routes", many_routes, few_routes)
    notes = [*bench.notes, *redis_memory.notes(memory), *_gateway_notes(bench)]
    for note in notes:
        print(textwrap.fill(note, 100, initial_indent="  ", subsequent_indent="    "))
    print(f"\ncapacity at {args.scale_tenants:,} active tenants, from this run's figures:")
    capacity.report(
        capacity.Costs(
            gateway_us=many_tenants.gateway_us,
            redis_us=many_tenants.redis_us,
            worker_us=many_tenants.worker_us,
            postgres_us=many_tenants.postgres_us,
        )
    )
    return tenants_ratio, routes_ratio


def benchmark(args: argparse.Namespace, pinning: bool) -> None:
    """`--scale`: the tenant rounds, Redis memory, the route rounds, the SCALE line."""
    with Stack() as stack:
        bench = ScaleBench(stack, args, pinning)
        baseline = redis_memory.used_but_streams(bench.redis)
        results = interleaved(bench, bench.tenant_configs)
        memory = redis_memory.measure(bench.redis, baseline)
        results |= interleaved(bench, bench.route_configs)
        tenants_ratio, routes_ratio = report(bench, results, memory)
    print(
        f"SCALE tenants_ratio={tenants_ratio:.3f} routes_ratio={routes_ratio:.3f} "
        f"redis_bytes_per_tenant_meter={memory.per_tenant_meter:.0f}"
    )
