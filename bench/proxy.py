"""Proxy throughput and latency: the gateway against a naive pass-through.

Starts an upstream, the baseline proxy and `gateway serve` as separate
processes on loopback, loads each with wrk and prints requests per second and
latency percentiles. Usage: python -m bench.proxy [--duration S] [--rounds N] [--connections N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from gateway.auth.jwt import mint
from tests.servers import RedisServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def _wrk(
    port: int, duration_s: int, connections: int, headers: tuple[str, ...] = ()
) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/projects/1?expand=members"
    extra = [arg for header in headers for arg in ("-H", header)]
    subprocess.run(["wrk", "-t1", "-c16", "-d2s", *extra, url], capture_output=True, check=True)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", *extra, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert m, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        figures[f"p{pct}_ms"] = float(m.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["errors"] = float(errors.group(1)) if errors else 0.0
    return figures


SECRET = "benchmark-only-secret-" + "b" * 40


def _gateway_config(
    port: int, up_port: int, auth: str, tmp: str, redis_url: str | None = None
) -> dict[str, Any]:
    """Three routes; `auth` on the API routes ("none" or "required": JWT + tenant);
    with `redis_url`, a quota and a rate limit in that Redis on every API request."""
    quota = redis_url is not None
    charge = {"charge": {"api_calls": 1}} if quota else {}
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": _free_port()},
        "storage": {"ledger": f"sqlite:///{tmp}/ledger-{port}.db",
                    **({"counters": redis_url, "timeout_ms": 1000} if quota else {})},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret_env": "BENCH_JWT_SECRET"}},
        **({"meters": {"api_calls": {"type": "counter"}}} if quota else {}),
        "plans": {"starter": {
            "limits": {"api_calls": {"limit": 10**12, "warn_at": [0.8]}},
            "rate_limits": [{"name": "per_second", "rate": 10**6, "burst": 10**6}],
        } if quota else {}},
        "tenants": [{"id": "bench", "plan": "starter"}],
        "upstreams": {"app": {"url": f"http://127.0.0.1:{up_port}"}},
        "routes": [
            {"name": "health", "match": {"path": "/healthz"}, "upstream": "app", "auth": "none"},
            {"name": "member", "match": {"path": "/v1/members/{id}", "methods": ["GET"]},
             "upstream": "app", "auth": auth, **charge},
            {"name": "api", "match": {"path": "/v1/**"}, "upstream": "app", "auth": auth,
             **charge},
        ],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target (median shown)")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (scripts/bench installs it)")
    up_port, base_port = _free_port(), _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench.servers", "upstream", str(up_port)]),
        subprocess.Popen(
            [sys.executable, "-m", "bench.servers", "baseline", str(base_port),
             f"http://127.0.0.1:{up_port}"]
        ),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        gw_port, auth_port, quota_port = _free_port(), _free_port(), _free_port()
        redis = RedisServer(appendonly=False).start()
        gateways = (
            (gw_port, "none", None), (auth_port, "required", None),
            (quota_port, "required", redis.url),
        )  # fmt: skip
        for port, auth, redis_url in gateways:
            path = Path(tmp) / f"gateway-{port}.yaml"
            path.write_text(yaml.safe_dump(_gateway_config(port, up_port, auth, tmp, redis_url)))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gateway", "serve", "-c", str(path)],
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "BENCH_JWT_SECRET": SECRET},
                )
            )
        token = mint(SECRET, "HS256", ["org_id"], "bench", 3600)
        bearer = (f"Authorization: Bearer {token}",)
        try:
            for port in (up_port, base_port, gw_port, auth_port, quota_port):
                _wait(port)
            targets: dict[str, tuple[int, tuple[str, ...]]] = {
                "upstream (direct)": (up_port, ()),
                "baseline pass-through": (base_port, ()),
                "gateway": (gw_port, ()),
                "gateway + JWT + tenant": (auth_port, bearer),
                "gateway + JWT + quota": (quota_port, bearer),
            }
            # Rounds interleave the targets so that a noisy moment on the
            # machine hits all of them alike; each figure is the median.
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (port, headers) in targets.items():
                    runs[name].append(_wrk(port, args.duration, args.connections, headers))
            results = {
                name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
                for name, rs in runs.items()
            }
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
            redis.close()
    print(
        f"\nwrk -t1 -c{args.connections} -d{args.duration}s, GET with a 70-byte JSON answer, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(f"{'target':24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name, fig in results.items():
        print(
            f"{name:24} {fig['rps']:9.0f} {fig['p50_ms']:8.2f} {fig['p99_ms']:8.2f} "
            f"{fig['errors']:8.0f}"
        )
    baseline = results["baseline pass-through"]["rps"]
    for name in ("gateway", "gateway + JWT + tenant", "gateway + JWT + quota"):
        print(f"{name} / baseline throughput: {results[name]['rps'] / baseline:.2f}")


if __name__ == "__main__":
    main()
