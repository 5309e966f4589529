"""The proxy benchmark's processes, each started on loopback and stopped on exit.

nginx is the upstream; in front of it the naive proxy (`bench/bareproxy.py`),
HAProxy with JWT verification and a per-tenant counter, and the gateway with
everything on: JWT, tenants in PostgreSQL, a quota and a rate limit in Redis,
usage events written by `gateway worker`, metrics. Configs are generated into
one temporary directory, removed with every process when the stack closes,
also after a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.measure import binary
from gateway.auth.jwt import mint
from gateway.quota import keyspace
from tests.procs import GatewayProcess, WorkerProcess, write_config
from tests.servers import PostgresServer, RedisServer, free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
SECRET = "benchmark-only-secret-" + "b" * 40
BODY = '{"id": 1, "name": "apollo", "members": [1, 2, 3], "status": "active"}'
PATH = "/v1/projects/1?expand=members"
TENANT_CLAIM = "org_id"
TOKEN_TTL_S = 3600
# Limits no run reaches: every request is checked and charged, none refused.
QUOTA_PER_MONTH = 10**12
RATE_PER_S = 10**6
SHARDS = 16
STREAMS = tuple(keyspace.shard_stream(shard) for shard in range(SHARDS))  # the usage events
_ENV = {"BENCH_JWT_SECRET": SECRET, "GATEWAY_ADMIN_TOKEN": "bench-admin-" + "a" * 32}

_NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""

# The token's alg must be HS256 and its signature and expiry good (as the
# gateway checks them); then the tenant claim keys a stick-table counter.
_HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind 127.0.0.1:{port}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{secret}") -m int 1 }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
    http-request set-var(txn.tenant) var(txn.bearer),jwt_payload_query('$.{claim}')
    http-request deny deny_status 403 unless {{ var(txn.tenant) -m found }}
    http-request track-sc0 var(txn.tenant) table per_tenant
    http-request deny deny_status 429 if {{ sc_http_req_cnt(0) gt {limit} }}
    default_backend upstream
backend per_tenant
    stick-table type string len 64 size 200k expire 1h store http_req_cnt
backend upstream
    server nginx 127.0.0.1:{upstream}
"""  # noqa: E501 - HAProxy has no line continuation

# Request i carries token i mod T and path i mod P (prebuilt for i < max(T, P)).
# Arguments: a file of tokens; optionally a file of paths (else the URL's path)
# and the index to start at, so that a run can go on where the last one stopped.
ROTATE_LUA = """\
local requests = {}
local last = 0

function init(args)
    local tokens, paths = {}, {}
    for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
    if args[2] then
        for line in io.lines(args[2]) do paths[#paths + 1] = line end
    else
        paths[1] = wrk.path
    end
    for i = 0, math.max(#tokens, #paths) - 1 do
        requests[i + 1] = wrk.format(nil, paths[i % #paths + 1],
            {Authorization = "Bearer " .. tokens[i % #tokens + 1]})
    end
    last = tonumber(args[3] or "0") % #requests
end

function request()
    last = last % #requests + 1
    return requests[last]
end
"""


@dataclass(frozen=True)
class Target:
    """A server wrk loads; `pid` is the process measured (and pinned, if `pinned`)."""

    name: str
    port: int
    pid: int
    pinned: bool = True
    admin_port: int = 0  # the gateway's (/metrics)
    access_log: Path | None = None  # the gateway's stdout


@dataclass(frozen=True)
class Stores:
    """The gateway's private Redis and PostgreSQL."""

    redis_pid: int
    redis_port: int
    redis_url: str
    postgres_pid: int
    dsn: str


@dataclass(frozen=True)
class GatewayStack:
    """The gateway under full enforcement and the processes it relies on."""

    target: Target
    worker_pid: int
    stores: Stores


def gateway_config(upstream: int, redis_url: str, dsn: str, tenants: list[str]) -> dict[str, Any]:
    """Full enforcement on one catch-all route: JWT, tenant, quota, rate limit, usage events."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain_delay_s": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        # The timeout is raised from 50 ms: Redis shares its CPU with the load generator.
        "storage": {"counters": redis_url, "ledger": dsn, "shards": SHARDS, "timeout_ms": 1000},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret_env": "BENCH_JWT_SECRET",
                         "tenant_claim": [TENANT_CLAIM]}},
        "upstreams": {"app": {"url": f"http://127.0.0.1:{upstream}"}},
        "meters": {"api_calls": {"type": "counter", "period": "billing_cycle"}},
        "plans": {"bench": {
            "limits": {"api_calls": {"limit": QUOTA_PER_MONTH, "enforcement": "hard"}},
            "rate_limits": [{"name": "per_second", "rate": RATE_PER_S, "burst": RATE_PER_S}],
        }},
        "routes": [{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                    "charge": {"api_calls": 1}}],
        "usage": {"worker_port": free_port()},
        "metrics": {"tenant_label": False},
        # On, as by default: its cost is part of what is measured.
        "logging": {"format": "json", "access_log": True},
        "tenants": [{"id": tenant, "plan": "bench"} for tenant in tenants],
    }  # fmt: skip


# The gateway's layers, each on top of those before it (full enforcement adds
# the access log to the last); `layer_config` takes the others away.
LAYERS = {
    "forward": "gw: forwarding only",
    "auth": "gw: + JWT, tenant",
    "quota": "gw: + quota, events",
}


def layer_config(layer: str, config: dict[str, Any]) -> dict[str, Any]:
    """`gateway_config` with the access log off and, below "quota", no quota, no rate
    limit, no usage events; below "auth", no authentication either (`auth: none`)."""
    config["logging"] = {"format": "json", "access_log": False}
    if layer in ("forward", "auth"):
        config["plans"] = {"bench": {}}
        route = config["routes"][0]
        del route["charge"]
        if layer == "forward":
            route["auth"] = "none"
    return config


def mint_tokens(tenants: list[str]) -> list[str]:
    """A token for each tenant, as the gateway checks them (HS256, the tenant claim)."""
    return [mint(SECRET, "HS256", [TENANT_CLAIM], tenant, TOKEN_TTL_S) for tenant in tenants]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Stack:
    """Starts the benchmark's processes; closing it stops them all and removes their files."""

    def __init__(self) -> None:
        self._exit = ExitStack()
        self.tmp = Path(self._exit.enter_context(tempfile.TemporaryDirectory(prefix="gw-bench-")))

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exit.close()

    def _spawn(self, name: str, args: list[str], port: int) -> subprocess.Popen[bytes]:
        log_path = self.tmp / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self._exit.callback(_stop, proc)
        try:
            wait_port(port, 30, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{log_path.read_text()}") from None
        return proc

    def tokens(self, tenants: list[str]) -> tuple[Path, Path]:
        """One token per tenant in a file, and the wrk script that sends them in turn."""
        tokens = self.tmp / "tokens.txt"
        tokens.write_text("".join(token + "\n" for token in mint_tokens(tenants)))
        script = self.tmp / "rotate-tokens.lua"
        script.write_text(ROTATE_LUA)
        return tokens, script

    def nginx(self) -> Target:
        """The upstream; it stays on the shared CPU, also when it is loaded directly."""
        port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(tmp=self.tmp, port=port, body=BODY))
        log = str(self.tmp / "nginx-error.log")
        proc = self._spawn(
            "nginx", [binary("nginx"), "-p", f"{self.tmp}/", "-c", str(conf), "-e", log], port
        )
        return Target("nginx (upstream, direct)", port, proc.pid, pinned=False)

    def bare_proxy(self, upstream: int) -> Target:
        """`python bench/bareproxy.py PORT UPSTREAM_PORT`, the naive baseline."""
        port = free_port()
        args = [sys.executable, "bench/bareproxy.py", str(port), str(upstream)]
        return Target("naive proxy (bareproxy.py)", port, self._spawn("bareproxy", args, port).pid)

    def haproxy(self, upstream: int, limit: int) -> Target:
        """HAProxy with jwt_verify and a per-tenant stick-table counter denying above `limit`."""
        port = free_port()
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(
            _HAPROXY_CFG.format(
                port=port, upstream=upstream, secret=SECRET, claim=TENANT_CLAIM, limit=limit
            )
        )
        proc = self._spawn("haproxy", [binary("haproxy"), "-db", "-f", str(cfg)], port)
        return Target("haproxy (JWT + stick table)", port, proc.pid)

    def gateway(self, upstream: int, tenants: list[str]) -> GatewayStack:
        """Redis, PostgreSQL, `gateway migrate`, `gateway worker`, then `gateway serve`."""
        stores = self.stores()
        config = self.write_config(
            "gateway", gateway_config(upstream, stores.redis_url, stores.dsn, tenants)
        )
        self.migrate(config)
        worker_pid = self.worker(config)
        return GatewayStack(self.serve("gateway (full enforcement)", config), worker_pid, stores)

    def gateway_layer(
        self, layer: str, upstream: int, tenants: list[str], stores: Stores
    ) -> Target:
        """Another `gateway serve` on the same stores, with only the layers up to `layer`."""
        data = layer_config(layer, gateway_config(upstream, stores.redis_url, stores.dsn, tenants))
        return self.serve(LAYERS[layer], self.write_config(f"gateway-{layer}", data))

    def stores(self) -> Stores:
        """A private Redis and PostgreSQL (empty: `migrate` creates the ledger's schema)."""
        redis_server = RedisServer()  # with AOF, as production runs the queue's Redis
        self._exit.callback(redis_server.close)
        redis_server.start()
        self._exit.callback(PostgresServer.remove_template)
        postgres = PostgresServer()
        self._exit.callback(postgres.close)
        postgres.start()
        assert redis_server.proc is not None and postgres.proc is not None
        return Stores(
            redis_pid=redis_server.proc.pid,
            redis_port=redis_server.port,
            redis_url=redis_server.url,
            postgres_pid=postgres.proc.pid,
            dsn=postgres.dsn,
        )

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        return write_config(self.tmp / f"{name}.yaml", config)

    def migrate(self, config: Path) -> None:
        """`gateway migrate`: the ledger's schema."""
        migrate = [sys.executable, "-m", "gateway", "migrate", "-c", str(config)]
        subprocess.run(
            migrate, check=True, timeout=120, capture_output=True, env={**os.environ, **_ENV}
        )

    def worker(self, config: Path) -> int:
        """`gateway worker`, running until the stack closes; its pid."""
        worker = WorkerProcess(config, "bench", _ENV)
        self._exit.callback(worker.stop)
        worker.start(60)
        return worker.pid

    def serve(self, name: str, config: Path, start_timeout_s: float = 120) -> Target:
        """`gateway serve`, running until the stack closes."""
        # The access log goes to a file, as it would in production, not to /dev/null.
        access_log = self.tmp / f"{config.stem}-access.log"
        gateway = GatewayProcess(config, _ENV, stdout=access_log)
        self._exit.callback(gateway.stop)
        gateway.start(start_timeout_s)  # it seeds the config's tenants before it listens
        return Target(
            name, gateway.port, gateway.pid, admin_port=gateway.admin_port, access_log=access_log
        )
