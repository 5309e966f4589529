"""The deployment files parse and refer to what the gateway really has."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.billing.reporter import StripeMetrics
from gateway.config import load
from gateway.usage.worker import WorkerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_alert_rules_use_only_exported_metrics() -> None:
    registry = CollectorRegistry()
    create_app(load(DEPLOY / "gateway.compose.yaml"), registry)
    WorkerMetrics(registry)  # `gateway worker`'s, scraped as their own job
    StripeMetrics(registry)  # the worker's Stripe reporter
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


def test_compose_and_kubernetes_files_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"gateway", "worker", "redis", "postgres", "prometheus"} <= compose["services"].keys()
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "gateway.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "Deployment"]
