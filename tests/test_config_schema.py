"""config/gateway.schema.json takes every config the loader takes, as an editor reads it,
and refuses what the loader refuses where a JSON Schema can say so."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import load, parse
from tests.schema_check import load_as_editor, schema_errors

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    ROOT / "config" / "gateway.yaml",
    ROOT / "config" / "demo.yaml",
    ROOT / "gateway" / "demo" / "demo.yaml",
    ROOT / "deploy" / "gateway.compose.yaml",
]
BAD = sorted((ROOT / "tests" / "bad_configs").glob("*.yaml"))
# Refused by the loader for what a JSON Schema cannot see: references between
# sections, uniqueness inside lists, files on disk, and what is not built yet.
BEYOND_A_SCHEMA = {
    "auth_required_without_a_method",  # depends on another section
    "duplicate_key",  # YAML parsers keep one of the two
    "duplicate_rate_limit",
    "duplicate_route_name",
    "glob_not_last",
    "jwt_hmac_with_public_keys",
    "memory_queue_with_redis_counters",
    "missing_tls_files",
    "plan_limit_unknown_meter",
    "queue_with_memory_counters",
    "response_charge_without_header",
    "stripe_gauge_meter",
    "stripe_unknown_price_plan",
    "tenant_with_unknown_plan",
    "unknown_meter",
    "unknown_upstream",
    "workers_with_memory_store",
}


def kubernetes_configs() -> dict[str, str]:
    """The gateway config files inside the Kubernetes ConfigMaps, by name."""
    found = {}
    for manifest in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if doc and doc.get("kind") == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        found[f"{manifest.name}:{key}"] = text
    return found


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_matches_the_schema(path: Path) -> None:
    load(path)
    assert schema_errors(load_as_editor(path.read_text())) == []


def test_the_kubernetes_config_loads_and_matches_the_schema(tmp_path: Path) -> None:
    configs = kubernetes_configs()
    assert configs
    for name, text in configs.items():
        file = tmp_path / "gateway.yaml"
        file.write_text(text)
        load(file)
        assert schema_errors(load_as_editor(text)) == [], name


def test_the_schema_takes_what_the_loader_turns_into_other_values() -> None:
    data = load_as_editor(
        """
        upstreams: {app: {url: "http://127.0.0.1:3000"}}
        auth: {jwt: {algorithms: [RS256], jwks_url: "https://a.example/jwks", tenant_claim: org}}
        meters: {calls: {type: counter}}
        plans: {free: {limits: {calls: {limit: unlimited}}}, old: {limits: {calls: {limit: -1}}}}
        subscription: {grace: {past_due: 3d, unpaid: 3600}}
        routes: [{name: a, match: {path: /v1, methods: [get, Post]}, upstream: app,
                  charge: {calls: 1}}]
        tenants: [{id: t, plan: free, billing_anchor: 2026-01-01T00:00:00Z}]
        server: {port: 8080.0, trusted_proxies: [10.0.0.0/8, "::1"]}
        """
    )
    parse(yaml.safe_load(yaml.safe_dump(data)), "inline.yaml")
    assert schema_errors(data) == []


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_the_schema_refuses_what_the_loader_refuses_where_it_can(path: Path) -> None:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        data = None
    refused = data is None or bool(schema_errors(data))
    assert refused == (path.stem not in BEYOND_A_SCHEMA)
