"""Prometheus metrics, grouped per concern, on an injected registry.

Labels are bounded by design: route, plan, meter and upstream names come from
the config, methods are folded to the standard set, statuses are three-digit
codes, and tenants get a label of their own only when `metrics.tenant_label`
asks for it, and then only the busiest `metrics.tenant_label_top`.

On the request path a metric costs one child's `inc` or `observe`: children are
looked up once (per route, plan and meter) and kept, never by `labels()` per
request, which takes a lock and builds a key each time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.config.types import HTTP_METHODS

_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip

# Round trips to Redis and calls to the ledger: from well under a millisecond to
# the timeouts (storage.timeout_ms, a stuck ledger).
_STORE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0
)  # fmt: skip

UNMATCHED = "_unmatched"
GATEWAY = "_gateway"


def method_label(method: str) -> str:
    """Fold unknown methods into one label value."""
    return method if method in HTTP_METHODS else "OTHER"


_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ProxyMetrics:
    """What the public listener does, per route."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route and status "
            "class (2xx, 4xx, ...; a client gone mid-body counts as 4xx, its 499).",
            ["route", "status_class"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time from sending to the upstream to its response headers.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures, by upstream and kind (connect, timeout, reset, body_limit).",
            ["upstream", "kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being handled now.",
            registry=registry,
        )
        self.shed = Counter(
            "gateway_requests_shed",
            "Requests answered 503 by the listener under overload, unread, by reason "
            "(in_flight, connections).",
            ["reason"],
            registry=registry,
        )
        self.limited = Counter(
            "gateway_client_limited",
            "Requests refused 429 by a per-client limit, by reason (upstream_share, "
            "per_ip, failed_auth).",
            ["reason"],
            registry=registry,
        )

        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late the process's event loop ran a timer set every 0.25 s: how long "
            "its requests' next steps wait behind the others' work for its CPU.",
            buckets=_LAG_BUCKETS_S,
            registry=registry,
        )

        # A request's counter and duration children, by (route, method, status).
        self._requests: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._upstream_durations: dict[str, Histogram] = {}

    def observe(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one answered request."""
        key = (route, method, status)
        children = self._requests.get(key)
        if children is None:
            status_class = f"{status // 100}xx"
            children = self._requests[key] = (
                self.requests.labels(route, method_label(method), str(status)),
                self.duration.labels(route, status_class),
            )
        children[0].inc()
        children[1].observe(duration_s)

    def upstream_latency(self, upstream: str, duration_s: float) -> None:
        """Time to the upstream's response headers."""
        histogram = self._upstream_durations.get(upstream)
        if histogram is None:
            histogram = self._upstream_durations[upstream] = self.upstream_duration.labels(upstream)
        histogram.observe(duration_s)

    def client_limited(self, reason: str) -> None:
        """Count one request refused by a per-client limit."""
        self.limited.labels(reason).inc()

    def request_shed(self, reason: str) -> None:
        """Count one request the listener shed."""
        self.shed.labels(reason).inc()

    def upstream_error(self, upstream: str, kind: str) -> None:
        """Count one failed upstream exchange."""
        self.upstream_errors.labels(upstream, kind).inc()


# What a quota check came to, per meter of the request (see quota/tally.py).
OUTCOMES = (
    "allowed", "warned", "overage", "exhausted", "refused", "rate_limited", "shadow_refused",
    "fail_open", "fail_closed",
)  # fmt: skip


class QuotaMetrics:
    """Quota decisions by plan, meter and outcome; what waits for the counter store."""

    def __init__(self, registry: CollectorRegistry, tenant_top: int = 0) -> None:
        self.decisions = Counter(
            "gateway_quota_decisions",
            "Quota checks per meter of the request, by plan, meter and outcome: "
            + ", ".join(OUTCOMES) + ".",
            ["plan", "meter", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.tenant_top = tenant_top
        self.tenant_decisions = None
        if tenant_top > 0:
            self.tenant_decisions = Counter(
                "gateway_tenant_quota_decisions",
                "Quota checks per meter, by tenant (the busiest metrics.tenant_label_top; the "
                "others as _other), meter and outcome.",
                ["tenant", "meter", "outcome"],
                registry=registry,
            )
        self.pending_dropped = Counter(
            "gateway_quota_pending_dropped",
            "Counter-store writes (fail_open charges, refunds, voids) dropped after waiting "
            "longer than the store remembers operation ids: the stated loss bound at work.",
            registry=registry,
        )
        self.held = Counter(
            "gateway_quota_fail_open_charges",
            "Requests served under fail_open whose charges were held for the counter store.",
            registry=registry,
        )
        self.pending = Gauge(
            "gateway_quota_pending_writes",
            "Counter-store writes waiting in the process (fail_open charges, refunds and "
            "settlements that failed, voids of requests answered 503).",
            registry=registry,
        )
        self.spooled = Gauge(
            "gateway_quota_spool_entries",
            "Of those, the ones in this process's file under usage.spool_dir.",
            registry=registry,
        )


class StoreMetrics:
    """Round trips to the counter store, and the calls that failed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "gateway_counter_store_duration_seconds",
            "Redis round trips, by call (check_and_charge, apply_once, set_level: one pipeline "
            "of coalesced script calls each; queue_append; idempotency, level, lost: one call).",
            ["call"],
            buckets=_STORE_BUCKETS_S,
            registry=registry,
        )
        self.errors = Counter(
            "gateway_counter_store_errors",
            "Counter-store calls that failed, by call and kind (timeout: slower than "
            "storage.timeout_ms; error: refused, reset, unreachable).",
            ["call", "kind"],
            registry=registry,
        )
        self.queue_waiting = Gauge(
            "gateway_usage_queue_waiting_events",
            "Usage events waiting in the process for the queue's own Redis (storage.queue).",
            registry=registry,
        )

    def failed(self, call: str, exc: BaseException) -> None:
        """Count one failed call: `timeout` or `error`."""
        self.errors.labels(call, "timeout" if isinstance(exc, TimeoutError) else "error").inc()


class LedgerMetrics:
    """Calls to the ledger's database."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "gateway_ledger_duration_seconds",
            "Ledger calls, by operation (a transaction counts once, whole).",
            ["op"],
            buckets=_STORE_BUCKETS_S,
            registry=registry,
        )
        self.errors = Counter(
            "gateway_ledger_errors",
            "Ledger calls that failed, by operation.",
            ["op"],
            registry=registry,
        )


class AuthMetrics:
    """Fetches of the identity provider's keys."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jwks_fetches = Counter(
            "gateway_jwks_fetches",
            "JWKS fetches, by result: ok, error (the last good keys are kept), empty (no "
            "usable signing key; the last good keys are kept).",
            ["result"],
            registry=registry,
        )
        self.jwks_success = Gauge(
            "gateway_jwks_last_success_timestamp_seconds",
            "When the JWKS was last fetched with usable keys (Unix time).",
            registry=registry,
        )


class LedgerWrites:
    """Usage events written into the ledger (by `gateway worker`, or `serve` when embedded)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.inserted = Counter(
            "gateway_usage_inserted_events", "Events written to the ledger.", registry=registry
        )
        self.duplicates = Counter(
            "gateway_usage_duplicate_events",
            "Redelivered events the ledger already had.",
            registry=registry,
        )


# Every kind is exported from the start at 0: `increase()` in an alert sees the first one.
FAILURE_KINDS = ("rate_limited", "server_error", "timeout", "auth", "rejected", "async_rejected",
                 "meter_missing", "expired", "ledger")  # fmt: skip


class StripeMetrics:
    """What the reporter does, on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reported = Counter(
            "gateway_stripe_reported_quantity",
            "Quantity Stripe accepted, by meter: usage, and corrections (negative reports of "
            "refunds written after their charge was reported).",
            ["meter", "direction"],
            registry=registry,
        )
        self.events = Counter(
            "gateway_stripe_reported_events",
            "Meter events Stripe accepted (or already had: duplicate).",
            ["result"],
            registry=registry,
        )
        self.failures = Counter(
            "gateway_stripe_send_failures",
            "Failed Stripe calls by kind (" + ", ".join(FAILURE_KINDS) + ").",
            ["kind"],
            registry=registry,
        )
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)
        self.pending_rows = Gauge(
            "gateway_stripe_outbox_pending_rows", "Outbox rows not sent yet.", registry=registry
        )
        self.pending_quantity = Gauge(
            "gateway_stripe_outbox_pending_quantity",
            "Usage quantity in outbox rows not sent yet.",
            registry=registry,
        )
        self.oldest_pending = Gauge(
            "gateway_stripe_outbox_oldest_pending_seconds",
            "Age of the oldest unsent outbox row (0 when none).",
            registry=registry,
        )
        self.rejected_rows = Gauge(
            "gateway_stripe_outbox_rejected_rows",
            "Outbox rows Stripe refused for good (need a look).",
            registry=registry,
        )


class WorkerMetrics:
    """What the worker does, on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge(
            "gateway_usage_lag_events",
            "Usage events in the streams not yet written to the ledger.",
            registry=registry,
        )
        self.batch = Histogram(
            "gateway_usage_batch_events",
            "Events per ledger write.",
            buckets=(1, 10, 100, 1000, 5000, 20000, 80000),
            registry=registry,
        )
        self.written = LedgerWrites(registry)
        self.drifting = Gauge(
            "gateway_usage_drifting_counters",
            "Counters that differ from the ledger at the last reconciliation.",
            registry=registry,
        )
        self.drift = Gauge(
            "gateway_usage_drift_events",
            "Sum of |counter - ledger| at the last reconciliation (includes the lag).",
            registry=registry,
        )
        self.errors = Counter(
            "gateway_usage_errors",
            "Failures, by kind (ledger, queue, malformed).",
            ["kind"],
            registry=registry,
        )
        self.last_success = Gauge(
            "gateway_usage_last_success_timestamp_seconds",
            "When the worker last finished a round: read every shard and wrote what it read "
            "(Unix time).",
            registry=registry,
        )


class WebhookMetrics:
    """Stripe webhooks received on the public listener."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "gateway_stripe_webhooks",
            "Stripe webhooks by type and result (applied, stale, duplicate, ignored, unmapped, "
            "bad_signature, error).",
            ["type", "result"],
            registry=registry,
        )
