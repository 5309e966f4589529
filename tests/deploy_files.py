"""The deployment files as the tests read them: the PromQL they hold, the compose services."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Grafana's own variables, as Grafana replaces them before Prometheus sees a query.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Prometheus' own series, not a process's: present for every scrape target.
SYNTHETIC = {"up"}
_METRIC = re.compile(r"\b((?:gateway|process|python)_[a-z_]+)\b(?!\s*\()")


def alert_exprs() -> dict[str, str]:
    """Every alert's expression, by alert name."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def dashboard_exprs() -> dict[str, str]:
    """Every dashboard query, Grafana's variables replaced, by `file: panel [refId]`."""
    found = {}
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in _GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found[f"{path.name}: {panel['title']} [{target['refId']}]"] = expr
    return found


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions and labels left out)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    names = set(_METRIC.findall(without_labels))
    if re.search(r"\bup\b", without_labels):
        names.add("up")
    return names


def compose() -> dict[str, Any]:
    """deploy/compose.yaml, its YAML anchors and merge keys resolved."""
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def env_example() -> dict[str, str]:
    """deploy/.env.example as compose reads it."""
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:?message}` and `${VAR:-default}` from `env`."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] or op != ":-"):
            return env[name]
        if op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one, value)


def native_argv(service: dict[str, Any]) -> list[str]:
    """A compose service's entrypoint and command as this machine runs them: the image's
    `gateway` and `python` are this interpreter's."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = service.get("entrypoint") or json.loads(
        re.findall(r"^ENTRYPOINT (.*)$", dockerfile, re.M)[-1]
    )
    command = service.get("command") or json.loads(re.findall(r"^CMD (.*)$", dockerfile, re.M)[-1])
    argv = [*entrypoint, *command]
    if argv[0] == "gateway":
        return [sys.executable, "-m", "gateway", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"not a command of the image: {argv}")


def healthcheck_argv() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, run by this interpreter."""
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.findall(r"^HEALTHCHECK .*? CMD (\[.*\])$", dockerfile, re.M)[0])
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]
