"""The deployment files parse and refer to what the gateway really has."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry

from gateway.config import load
from gateway.config.models import ServerConfig
from gateway.metrics import FAILURE_KINDS, StripeMetrics
from tests.deploy_files import (
    DASHBOARDS,
    DEPLOY,
    ROOT,
    alert_exprs,
    compose,
    dashboard_exprs,
    env_example,
    healthcheck_argv,
    interpolate,
    metric_names,
)


def test_alert_rules_are_complete() -> None:
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
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
    return alert_exprs()


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


def _tool(name: str) -> str:
    """A command from the test extras' wheels (beside this interpreter) or from the system."""
    found = shutil.which(
        name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    assert found, f"{name} is not installed (scripts/test installs it)"
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_prometheus_config_and_its_rules_as_shipped() -> None:
    config = _run(
        _tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")
    )
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout  # the rule file resolves beside the config
    rules = _run(_tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]


def _check_as_recording_rules(exprs: dict[str, str], tmp_path: Path) -> str:
    """promtool's verdict on each expression, written as a recording rule."""
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    done = _run(_tool("promtool"), "check", "rules", str(path))
    return "" if done.returncode == 0 else done.stdout + done.stderr


def test_every_promql_expression_of_the_alerts_and_the_dashboard_parses(tmp_path: Path) -> None:
    exprs = {**alert_exprs(), **dashboard_exprs()}
    assert len(dashboard_exprs()) >= 20
    assert _check_as_recording_rules(exprs, tmp_path) == ""
    # The check can fail: a broken expression is reported.
    assert "parse error" in _check_as_recording_rules({"bad": "sum(rate(x[5m])"}, tmp_path)


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = {name for expr in dashboard_exprs().values() for name in metric_names(expr)}
    for metric in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_quota_decisions_total",
        "gateway_tenant_quota_decisions_total",
        "gateway_counter_store_duration_seconds_bucket",
        "gateway_counter_store_errors_total",
        "gateway_ledger_errors_total",
        "gateway_quota_pending_writes",
        "gateway_usage_lag_events",
        "gateway_stripe_outbox_oldest_pending_seconds",
        "gateway_usage_drifting_counters",
        "gateway_usage_anomalies",
        "gateway_notifications_dead",
    ):
        assert metric in used, metric
    provisioning = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "quota-gateway.yaml").read_text()
    )
    grafana = compose()["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounted[provisioning["providers"][0]["options"]["path"]] == "./grafana/dashboards"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    done = _run(_tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # The check can fail: the former `USER gateway` is a finding (DL3002/ DL4xxx family).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install aiohttp\nUSER gateway\n")
    assert _run(_tool("hadolint"), "--no-color", str(bad)).returncode != 0


def test_the_image_is_multi_stage_locked_non_root_and_health_checked() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2
    assert re.search(r"^USER [0-9]+:[0-9]+$", dockerfile, re.M)
    assert "requirements.lock" in dockerfile and "--no-deps ." in dockerfile
    assert healthcheck_argv()
    assert ":latest" not in dockerfile


def test_the_lock_pins_every_run_time_dependency_within_pyproject() -> None:
    pins = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(spec) for spec in declared]
    seen: set[str] = set()
    while todo:  # the declared dependencies and all of theirs, as installed here
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        assert name in pins, f"{name} is not in deploy/requirements.lock: run scripts/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in deploy/requirements.lock does not satisfy {req}: "
            "run scripts/lock"
        )
        extras = req.extras or {""}
        for dep in metadata.requires(req.name) or []:
            sub = Requirement(dep)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                sub.marker = None
                todo.append(sub)
    assert seen == set(pins), f"pinned but not needed: {set(pins) - seen}"


K8S = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_kubernetes_manifest_passes_kubernetes_validate_strict(tmp_path: Path) -> None:
    done = _run(_tool("kubernetes-validate"), "--strict", *map(str, MANIFESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" passed for resource ") == sum(len(_docs(p)) for p in MANIFESTS)
    # The check can fail: a field the API does not have is refused under --strict.
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {portz: []}\n")
    assert _run(_tool("kubernetes-validate"), "--strict", str(bad)).returncode != 0


def test_the_kustomization_ties_every_manifest_and_tags_the_image_by_version() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # The Secret is an example: real values never belong in the repository.
    assert set(kustomization["resources"]) == {p.name for p in MANIFESTS} - {"secret.example.yaml"}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert kustomization["images"] == [
        {"name": "quota-gateway", "newName": "quota-gateway", "newTag": version}
    ]
    pods = [_pod(doc) for path in MANIFESTS for doc in _docs(path) if _pod(doc)]
    images = {container["image"] for pod in pods for container in pod["containers"]}
    assert images == {f"quota-gateway:{version}"}
    assert compose()["x-gateway"]["image"] == f"quota-gateway:{version}"


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    template = doc.get("spec", {}).get("template", {})
    spec: dict[str, Any] = template.get("spec", {})
    return spec


def test_kubernetes_pods_are_non_root_read_only_and_the_gateway_drains() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in _docs(p)}
    secret_keys = set(docs["Secret", "quota-gateway"]["stringData"])
    pods = [_pod(d) for d in docs.values() if _pod(d)]
    assert len(pods) == 3  # migration Job, gateway, worker
    for pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
        for container in pod["containers"]:
            own = container["securityContext"]
            assert own["readOnlyRootFilesystem"] is True
            assert own["allowPrivilegeEscalation"] is False
            assert own["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["key"] in secret_keys, env
    gateway = _pod(docs["Deployment", "quota-gateway"])
    container = gateway["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = yaml.safe_load(docs["ConfigMap", "quota-gateway"]["data"]["gateway.yaml"])
    # Probes and Prometheus on the metrics listener; the admin API is not on a pod port.
    assert ports == {"http": config["server"]["port"], "metrics": config["metrics"]["port"]}
    assert config["admin"]["host"] == "127.0.0.1"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = docs["Deployment", "quota-gateway"]["spec"]["template"]["metadata"]
    assert annotations["annotations"]["prometheus.io/port"] == str(config["metrics"]["port"])
    sleep_s = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain_s = ServerConfig.model_fields.get("drain_delay_s")
    assert sleep_s == (drain_s.default if drain_s is not None else 5)
    assert (
        gateway["terminationGracePeriodSeconds"] > sleep_s + config["server"]["shutdown_timeout_s"]
    )
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Namespace"):
        assert any(k == kind for k, _ in docs), kind
    assert any(
        k == "Job" and "migrate" in _pod(d)["containers"][0]["args"] for (k, _), d in docs.items()
    )


def test_the_compose_file_matches_the_compose_spec() -> None:
    schema = json.loads(
        (ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json").read_text()
    )
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert [e.message for e in validator.iter_errors(raw)] == []
    # The check can fail: a misspelled key is refused.
    broken = {**raw, "services": {**raw["services"], "redis": {"imagee": "redis"}}}
    assert list(validator.iter_errors(broken))


def test_the_compose_stack_waits_for_health_restarts_and_keeps_its_data() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "migrate", "gateway", "worker", "upstream", "prometheus",
            "alertmanager", "grafana"} <= services.keys()  # fmt: skip
    for name, service in services.items():
        if name != "migrate":
            assert service["restart"] == "unless-stopped", name
            assert "healthcheck" in service or name in ("gateway", "worker", "upstream"), name
        for dependency, condition in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            )
            assert condition == {"condition": expected}, (name, dependency)
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"]["migrate"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert "host.docker.internal" not in (DEPLOY / "compose.yaml").read_text()
    env = env_example()
    for service in services.values():
        for value in service.get("environment", {}).values():
            interpolate(str(value), env)  # every variable is in .env.example
    config = load(DEPLOY / "gateway.compose.yaml")
    assert any(route.charge for route in config.routes) and config.plans
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]
    }
    assert targets == {
        "gateway": [f"gateway:{config.metrics.port}"],
        "usage-worker": [f"worker:{config.usage.worker_port}"],
    }
