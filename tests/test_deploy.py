"""The deployment files parse and refer to what the gateway really has."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import load
from gateway.metrics import (
    FAILURE_KINDS,
    AuthMetrics,
    LedgerMetrics,
    StoreMetrics,
    StripeMetrics,
    WorkerMetrics,
)
from gateway.process_metrics import SupervisorMetrics
from gateway.signals.notifier import NotifierMetrics
from gateway.signals.watch import WatchMetrics
from gateway.usage.quarantine import QuarantineMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_alert_rules_use_only_exported_metrics() -> None:
    registry = CollectorRegistry()
    create_app(load(DEPLOY / "gateway.compose.yaml"), registry)
    # Made when the app's contexts open the stores and the ledger:
    StoreMetrics(registry)
    LedgerMetrics(registry)
    AuthMetrics(registry)
    WorkerMetrics(registry)  # `gateway worker`'s, scraped as their own job
    StripeMetrics(registry)  # the worker's Stripe reporter
    WatchMetrics(registry, 0)  # the worker's anomaly and forecast rounds
    NotifierMetrics(registry)  # the worker's webhook deliveries
    QuarantineMetrics(registry)  # refused usage, in every process that writes usage
    SupervisorMetrics(registry)  # serve's supervisor, with server.workers > 1
    exported = {
        sample_name
        for metric in registry.collect()
        for sample_name in (
            metric.name,
            f"{metric.name}_total",
            f"{metric.name}_bucket",
            f"{metric.name}_count",
        )
    }
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {
        name
        for group in rules["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\b(gateway_[a-z_]+)", rule["expr"])
    }
    assert used and used <= exported, used - exported


def test_alert_rules_pass_promtool_or_parse() -> None:
    """promtool checks the rules as Prometheus loads them where it is installed (the test
    command installs it); elsewhere every rule must at least be a complete one."""
    rules = DEPLOY / "prometheus" / "alerts.yml"
    promtool = shutil.which("promtool")
    if promtool is not None:
        checked = subprocess.run(
            [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
            assert rule["labels"]["severity"] in ("page", "ticket"), rule


def test_alerts_for_fail_open_a_worker_down_and_counter_store_errors() -> None:
    alerts = _alerts()
    assert "gateway_quota_pending_writes" in alerts["GatewayFailOpenInEffect"]
    worker = alerts["GatewayUsageWorkerDown"]
    assert 'up{job="usage-worker"} == 0' in worker and "absent(" in worker
    assert "gateway_usage_last_success_timestamp_seconds" in worker
    assert "gateway_counter_store_errors_total" in alerts["GatewayCounterStoreErrors"]


def _alerts() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def test_stripe_alerts_see_a_missing_reporter_and_the_first_failure() -> None:
    alerts = _alerts()
    assert (
        "absent(gateway_stripe_outbox_oldest_pending_seconds)" in alerts["GatewayStripeOutboxStuck"]
    )
    failures = {name: expr for name, expr in alerts.items() if "send_failures" in expr}
    # A rate threshold cannot fire at one round a minute; an increase over a window can.
    assert failures and all("increase(" in expr for expr in failures.values()), failures
    named = {
        kind
        for expr in failures.values()
        for kinds in re.findall(r'kind[!=]~"([a-z_|]+)"', expr)
        for kind in kinds.split("|")
    }
    assert {"expired", "async_rejected"} <= named <= set(FAILURE_KINDS)
    # Exported at 0 from the start, so that `increase()` sees the first failure.
    registry = CollectorRegistry()
    StripeMetrics(registry)
    for kind in FAILURE_KINDS:
        assert registry.get_sample_value("gateway_stripe_send_failures_total", {"kind": kind}) == 0


def test_compose_and_kubernetes_files_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"gateway", "worker", "redis", "postgres", "prometheus"} <= compose["services"].keys()
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "gateway.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "Deployment"]
