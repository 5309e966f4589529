"""config/gateway.schema.json takes every config the loader takes, as an editor reads it,
and refuses what the loader refuses where a JSON Schema can say so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load, parse
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


_BASE = """
upstreams: {app: {url: "http://127.0.0.1:3000"}}
auth: {jwt: {algorithms: [HS256], secret_env: JWT_SECRET}}
meters: {calls: {type: counter}, seats: {type: gauge}}
plans: {p: {limits: {calls: {limit: 10}}, rate_limits: [{name: r, rate: 1}]}}
routes: [{name: a, match: {path: /v1}, upstream: app, charge: {calls: 1}}]
"""
# (where, values): one key of _BASE set to each value in turn, YAML spellings included.
_VARIANTS: list[tuple[tuple[str | int, ...], list[str]]] = [
    (("server", "port"), ["8080", "8080.0", '"8080"', "true", "-1", "70000", "1.5", "null"]),
    (("server", "max_body_bytes"), ["0", "1e3", "1000.0", '"10"', "-5"]),
    (("server", "shutdown_timeout_s"), ["0", "2.5", '"30"', "-1", "false"]),
    (("server", "trusted_proxies"), ["[10.0.0.0/8]", '["::1"]', "[proxy.local]", "10.0.0.1"]),
    (("plans", "p", "limits", "calls", "limit"),
     ["unlimited", "-1", "-2", "0", "1000.0", "1.5", "lots", "true", '"5"', "1000000000000001"]),
    (("plans", "p", "limits", "calls", "warn_at"), ["[0.8]", "[1]", "[0]", "[1.5]", '["0.8"]']),
    (("plans", "p", "rate_limits", 0, "rate"), ["1", "0", '"1"', "2.0", "2.5"]),
    (("plans", "p", "rate_limits", 0, "burst"), ["null", "5", "0"]),
    (("subscription", "grace", "past_due"), ["3d", "12h", "3600", "1.5 h", "3 days", "-1", "true"]),
    (("subscription", "deny_status"), ["402", "403", "404", '"402"']),
    (("auth", "jwt", "tenant_claim"), ["org", "[a, b]", "[]", "5", "[1]"]),
    (("auth", "api_keys"), ["{enabled: true}", '{enabled: "yes"}', "{enabled: 1}",
                            "{header: X-Key}", "{header: 'X Key'}"]),
    (("routes", 0, "match", "methods"), ["[get]", "[GET, Post]", "[FETCH]", "[]", "GET"]),
    (("routes", 0, "match", "path"), ["/v1/{id}", "v1", "/_gateway/x", "/_gateway", "/_gatewayx"]),
    (("routes", 0, "charge", "calls"), ["1", "-1", "response", "x", "1.5", "2.0", "true"]),
    (("routes", 0, "auth"), ["required", "none", "maybe"]),
    (("meters", "seats", "period"), ["null", "month"]),
    (("storage", "counters"), ["memory://", "redis://h:6379/0", "rediss://h", "mysql://h"]),
    (("storage", "shards"), ["1", "1024", "1025", "0", "16.0"]),
    (("upstreams", "app", "forward_authorization"), ["verified", "true", "false", "sometimes"]),
    (("tenants",), ["[{id: t, plan: p, billing_anchor: 2026-01-01T00:00:00Z}]",
                    "[{id: t, plan: p, billing_anchor: '2026-01-01T00:00:00+02:00'}]",
                    "[{id: t, plan: p, status: expired}]", "[{id: 'a b', plan: p}]"]),
    (("metrics",), ["{port: 9100, host: 0.0.0.0}", "{port: null}", "{port: '9100'}",
                    "{tenant_label_top: 0}"]),
    (("usage", "spool_dir"), ["/var/lib/gateway/spool", "spool", "null", "5"]),
]  # fmt: skip


def _set(data: Any, where: tuple[str | int, ...], value: Any) -> None:
    for key in where[:-1]:
        data = data.setdefault(key, {}) if isinstance(key, str) else data[key]
    data[where[-1]] = value


@pytest.mark.parametrize(
    ("where", "values"), _VARIANTS, ids=[".".join(map(str, w)) for w, _ in _VARIANTS]
)
def test_the_schema_and_the_loader_agree_on_each_spelling(
    where: tuple[str | int, ...], values: list[str]
) -> None:
    """Accepted by the loader means accepted by the schema; refused by the schema means
    refused by the loader (the schema may accept what only a cross-reference refuses)."""
    disagreements = []
    for text in values:
        data = load_as_editor(_BASE)
        _set(data, where, load_as_editor(f"v: {text}")["v"])
        yaml_data = yaml.safe_load(yaml.safe_dump(data))  # as the loader reads the same text
        _set(yaml_data, where, yaml.safe_load(f"v: {text}")["v"])
        try:
            parse(yaml_data, "variant.yaml", check_support=False)
            loader = True
        except ConfigError:
            loader = False
        schema = not schema_errors(data)
        if loader and not schema or schema and not loader and text not in _REFERENCES_ONLY:
            disagreements.append((text, f"loader {loader}", f"schema {schema}"))
    assert disagreements == []


# Spellings the schema takes and the loader refuses for a reason beyond one value.
_REFERENCES_ONLY = {"response"}  # the meter has no from_response_header
