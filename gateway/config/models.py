"""Pydantic models of the whole YAML contract; unknown keys are refused everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    model_validator,
)

from gateway.config.base import Model
from gateway.config.listener import ListenerLimits
from gateway.config.signals import NotificationsConfig, SignalsConfig
from gateway.config.types import (
    STRICT_INT,
    Charge,
    DurationS,
    EnvName,
    HeaderName,
    HttpUrl,
    JWTAlgorithm,
    Limit,
    Methods,
    Name,
    Network,
    NonNegativeInt,
    Port,
    PositiveFloat,
    PositiveInt,
    StrList,
    SubscriptionStatus,
    url_schema,
    url_with_schemes,
)

CounterURL = Annotated[
    str, url_with_schemes("memory", "redis", "rediss"), url_schema("memory", "redis", "rediss")
]


# Paths and times arrive as YAML strings: converted, as the JSON Schema's strings say.
FilePath = Annotated[Path, Strict(False)]
Timestamp = Annotated[AwareDatetime, Strict(False)]


class TLSConfig(Model):
    cert_file: FilePath
    key_file: FilePath


class ServerConfig(Model):
    host: str = "0.0.0.0"
    port: Port = 8080
    workers: PositiveInt = 1
    max_body_bytes: NonNegativeInt = 10 * 1024 * 1024
    trusted_proxies: list[Network] = []
    tls: TLSConfig | None = None
    shutdown_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    # After SIGTERM, /readyz answers 503 and the listener keeps serving this long
    # before it stops accepting: a load balancer notices and stops sending first.
    drain_delay_s: Annotated[float, Field(ge=0)] = 5.0
    limits: ListenerLimits = ListenerLimits()


class AdminConfig(Model):
    host: str = "127.0.0.1"
    port: Port = 9090
    token_env: EnvName = "GATEWAY_ADMIN_TOKEN"


class StorageConfig(Model):
    counters: CounterURL = "memory://"
    queue: CounterURL | None = None
    ledger: Annotated[
        str,
        url_with_schemes("sqlite", "postgresql", "postgres"),
        url_schema("sqlite", "postgresql", "postgres"),
    ] = "sqlite:///./gateway.db"
    shards: Annotated[int, Field(ge=1, le=1024), STRICT_INT] = 16
    timeout_ms: PositiveInt = 50
    on_counter_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    # Whether `counters` is a Redis Cluster node (any one of them); null asks it at start.
    redis_cluster: bool | None = None
    # Tenants and API keys are cached in each process and invalidated by a
    # message on change; this TTL is only the backstop for a lost message.
    cache_ttl_s: PositiveFloat = 600.0
    # Tenants (and, apart, API keys and compiled plans per tenant and route)
    # each process keeps; every active tenant should fit, or its requests read
    # the ledger and recompile.
    cache_entries: PositiveInt = 250_000

    @property
    def embedded(self) -> bool:
        """Counters in this process (`memory://`): it also writes its own usage."""
        return self.counters.startswith("memory:")

    @property
    def separate_queue(self) -> str | None:
        """The queue's URL when it is not the counter store's Redis."""
        return self.queue if self.queue not in (None, self.counters) else None

    @property
    def queue_url(self) -> str:
        return self.queue or self.counters


class PublicKeyConfig(Model):
    kid: str
    file: FilePath
    alg: JWTAlgorithm


def _set(key: str) -> dict[str, Any]:
    return {"required": [key], "properties": {key: {"not": {"type": "null"}}}}


class JWTConfig(Model):
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [_set(k) for k in ("jwks_url", "public_keys", "secret_env")]}
    )

    algorithms: Annotated[list[JWTAlgorithm], Field(min_length=1)]
    issuer: str | None = None
    audience: StrList | None = None
    jwks_url: HttpUrl | None = None
    jwks_refresh_s: PositiveFloat = 300.0
    # Minimum gap between refetches caused by unknown `kid`s; default: the
    # refresh interval. Lower it for an issuer that signs with a new key
    # before publishing it; a flood still causes one fetch per gap.
    jwks_refetch_min_s: PositiveFloat | None = None
    public_keys: list[PublicKeyConfig] | None = None
    secret_env: EnvName | None = None
    # a claim name (URLs allowed), or a list for a path into nested claims
    tenant_claim: StrList = ["org_id"]
    leeway_s: Annotated[float, Field(ge=0)] = 30.0
    # Verified tokens kept (until they expire) per process: every token in
    # use should fit, or each of its requests verifies it again.
    cache_entries: PositiveInt = 262_144

    @model_validator(mode="after")
    def _one_key_source_bound_to_its_algorithms(self) -> JWTConfig:
        # Mixing HMAC with public-key algorithms is how algorithm confusion
        # happens (a public key used as an HMAC secret): refuse it outright.
        sources = [
            name
            for name in ("jwks_url", "public_keys", "secret_env")
            if getattr(self, name) is not None
        ]
        if len(sources) != 1:
            raise ValueError("set exactly one of jwks_url, public_keys or secret_env")
        hmac = [a for a in self.algorithms if a.startswith("HS")]
        if self.secret_env is not None:
            if len(hmac) != 1 or len(self.algorithms) != 1:
                raise ValueError(
                    "secret_env binds the secret to one algorithm: list one HS algorithm"
                )
        elif hmac:
            raise ValueError(f"{hmac[0]} needs secret_env; keys from {sources[0]} are public keys")
        for key in self.public_keys or []:
            if key.alg not in self.algorithms:
                raise ValueError(
                    f"public key {key.kid!r} uses {key.alg}, which is not in algorithms"
                )
        return self


class APIKeysConfig(Model):
    enabled: bool = False
    header: HeaderName = "X-API-Key"


class AuthConfig(Model):
    jwt: JWTConfig | None = None
    api_keys: APIKeysConfig = APIKeysConfig()
    forward_tenant_header: HeaderName = "X-Tenant-Id"


class UpstreamConfig(Model):
    url: HttpUrl
    ca_file: FilePath | None = None
    connect_timeout_s: PositiveFloat = 2.0
    timeout_s: PositiveFloat = 30.0
    total_timeout_s: PositiveFloat | None = None
    # Which `Authorization` reaches the upstream: `verified` only the bearer token the
    # gateway verified for the request (`true` means this), `always` the client's as
    # sent (an upstream with its own authentication), `never` none (`false`).
    forward_authorization: Literal["verified", "always", "never"] | bool = "verified"
    max_connections: PositiveInt = 256
    # Requests one client address (IPv6: its /64) may have under way to this
    # upstream; more get 429. Default: half of `max_connections`.
    max_connections_per_client: PositiveInt | None = None
    preserve_host: bool = False

    @property
    def authorization(self) -> Literal["verified", "always", "never"]:
        """`forward_authorization` with the booleans spelled out."""
        given = self.forward_authorization
        if isinstance(given, bool):
            return "verified" if given else "never"
        return given


class MeterConfig(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "gauge"}}},
            "then": {
                "properties": {"period": {"type": "null"}, "from_response_header": {"type": "null"}}
            },
        }
    )

    type: Literal["counter", "gauge"]
    period: Literal["billing_cycle", "month", "day", "hour", "none"] | None = None
    unit: str | None = None
    from_response_header: HeaderName | None = None


class LimitConfig(Model):
    limit: Limit
    enforcement: Literal["hard", "soft"] = "hard"
    warn_at: list[Annotated[float, Field(gt=0, le=1)]] = []


class RateLimitConfig(Model):
    name: Name
    rate: PositiveInt
    per_s: PositiveFloat = 1.0
    burst: PositiveInt | None = None
    scope: Literal["tenant", "route"] = "tenant"


class PlanConfig(Model):
    limits: dict[Name, LimitConfig] = {}
    rate_limits: list[RateLimitConfig] = []
    upgrade_url: HttpUrl | None = None
    shadow: bool = False


class SubscriptionConfig(Model):
    allow: list[SubscriptionStatus] = ["active", "trialing"]
    grace: dict[SubscriptionStatus, DurationS] = {}
    deny_status: Literal[402, 403] = 402


class BillingConfig(Model):
    upgrade_url: HttpUrl | None = None


class RouteMatch(Model):
    # What the JSON Schema can say of a template: absolute, and not the gateway's own.
    path: Annotated[str, WithJsonSchema({"type": "string", "pattern": "^/(?!_gateway(/|$))"})]
    methods: Methods | None = None
    host: str | None = None


class RouteConfig(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"required": ["auth"], "properties": {"auth": {"const": "none"}}},
            "then": {"properties": {"charge": {"maxProperties": 0}}},
        }
    )

    name: Name
    match: RouteMatch
    upstream: str
    auth: Literal["required", "none"] = "required"
    charge: dict[Name, Charge] = {}
    charge_on: Literal["success", "not_server_error", "always"] = "success"
    max_body_bytes: NonNegativeInt | None = None
    websocket: bool = False
    shadow: bool = False
    # CORS preflights on an `auth: required` route are forwarded (bare: no body, no
    # credentials, never charged) only with this; otherwise answered 403.
    cors: bool = False


class UsageConfig(Model):
    flush_interval_ms: PositiveInt = 50
    spool_dir: FilePath | None = None
    retention_months: PositiveInt = 24
    # `gateway worker` serves /metrics and /healthz here (host: admin.host).
    worker_port: Port = 9091


class StripeConfig(Model):
    api_key_env: EnvName = "STRIPE_API_KEY"
    # Several secrets separated by commas are all accepted (for rotating the endpoint's).
    webhook_secret_env: EnvName = "STRIPE_WEBHOOK_SECRET"
    webhook_path: str = "/_gateway/stripe/webhook"
    # How old a webhook's signature timestamp may be.
    webhook_tolerance_s: PositiveInt = 300
    api_base: HttpUrl | None = None
    meter_events_base: HttpUrl | None = None
    mode: Literal["v1", "v2"] = "v1"
    meter_events: dict[Name, Annotated[str, Field(min_length=1, max_length=100)]] = {}
    prices: dict[str, Name] = {}
    report_interval_s: PositiveFloat = 60.0
    # One Stripe call slower than this has failed (and is retried with backoff).
    timeout_s: PositiveFloat = 10.0
    # A new subscription's customer (or the subscription itself) names its tenant here.
    tenant_metadata_key: Annotated[str, Field(min_length=1, max_length=40)] = "tenant_id"


class LoggingConfig(Model):
    """How a process logs: every line in one format; the access log of the public listener."""

    format: Literal["json", "text"] = "json"
    access_log: bool = True  # one line per public request, on stdout
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(Model):
    # A listener of its own for /metrics, /healthz and /readyz, without the admin API, so
    # that Prometheus and probes reach them while the admin API stays private; null: they
    # are served by the admin listener only.
    port: Port | None = None
    # The address of that listener and of `gateway worker`'s (usage.worker_port); null:
    # admin.host.
    host: str | None = None
    # A `tenant` label on the quota decisions, for the busiest tenants only.
    tenant_label: bool = False
    tenant_label_top: Annotated[int, Field(ge=1, le=10_000)] = 100


class TenantSeed(Model):
    id: Name
    name: str | None = None
    plan: str
    status: SubscriptionStatus = "active"
    stripe_customer: str | None = None
    billing_anchor: Timestamp | None = None
    disabled: bool = False


class GatewayConfig(Model):
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    storage: StorageConfig = StorageConfig()
    auth: AuthConfig = AuthConfig()
    upstreams: Annotated[dict[Name, UpstreamConfig], Field(min_length=1)]
    meters: dict[Name, MeterConfig] = {}
    billing: BillingConfig = BillingConfig()
    plans: dict[Name, PlanConfig] = {}
    subscription: SubscriptionConfig = SubscriptionConfig()
    routes: Annotated[list[RouteConfig], Field(min_length=1)]
    usage: UsageConfig = UsageConfig()
    stripe: StripeConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    signals: SignalsConfig = SignalsConfig()
    tenants: list[TenantSeed] = []

    def upgrade_url(self, plan: str) -> str | None:
        """Where a refused tenant on `plan` can fix its subscription."""
        spec = self.plans.get(plan)
        return (spec.upgrade_url if spec else None) or self.billing.upgrade_url
