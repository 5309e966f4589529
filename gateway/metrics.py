"""Prometheus metrics, grouped per concern, on an injected registry.

Labels are bounded by design: route names come from the config, methods are
folded to the standard set and statuses are three-digit codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.config.types import HTTP_METHODS

_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip

UNMATCHED = "_unmatched"
GATEWAY = "_gateway"


def method_label(method: str) -> str:
    """Fold unknown methods into one label value."""
    return method if method in HTTP_METHODS else "OTHER"


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
            "Time from the request's arrival to the end of its response.",
            ["route"],
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

        # Children by label values: `labels()` takes a lock and builds a key on
        # every call, which shows on the per-request path.
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._upstream_durations: dict[str, Histogram] = {}

    def observe(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one answered request."""
        key = (route, method, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self.requests.labels(route, method_label(method), str(status))
            self._requests[key] = counter
        counter.inc()
        histogram = self._durations.get(route)
        if histogram is None:
            histogram = self._durations[route] = self.duration.labels(route)
        histogram.observe(duration_s)

    def upstream_latency(self, upstream: str, duration_s: float) -> None:
        """Time to the upstream's response headers."""
        histogram = self._upstream_durations.get(upstream)
        if histogram is None:
            histogram = self._upstream_durations[upstream] = self.upstream_duration.labels(upstream)
        histogram.observe(duration_s)

    def upstream_error(self, upstream: str, kind: str) -> None:
        """Count one failed upstream exchange."""
        self.upstream_errors.labels(upstream, kind).inc()


class QuotaMetrics:
    """Quota decisions, by outcome."""

    OUTCOMES = (
        "allowed", "quota_exceeded", "rate_limited", "shadow_refusal",
        "store_error_open", "store_error_closed",
    )  # fmt: skip

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "gateway_quota_decisions",
            "Quota checks, by outcome: allowed, quota_exceeded, rate_limited, shadow_refusal, "
            "store_error_open (served under fail_open), store_error_closed (answered 503).",
            ["outcome"],
            registry=registry,
        )
        self._children = {outcome: self.decisions.labels(outcome) for outcome in self.OUTCOMES}
        self.pending_dropped = Counter(
            "gateway_quota_pending_dropped",
            "Counter-store writes (fail_open charges, refunds, voids) dropped after waiting "
            "longer than the store remembers operation ids: the stated loss bound at work.",
            registry=registry,
        )

    def decided(self, outcome: str) -> None:
        """Count one decision."""
        self._children[outcome].inc()


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
