"""Load a YAML config file; every error names the file and the path of the key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway.config.models import GatewayConfig
from gateway.config.support import unsupported
from gateway.config.templates import TemplateError, parse_template

Issue = tuple[str, str]  # (path of the key, what is wrong)


class ConfigError(Exception):
    """A config file that cannot be used; `str()` has one line per problem."""

    def __init__(self, file: str, issues: Iterable[Issue]) -> None:
        self.file = file
        self.issues = list(issues)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One line per problem, whatever control characters a key or value holds."""
        return [
            _one_line(f"{self.file}: {path}: {msg}" if path else f"{self.file}: {msg}")
            for path, msg in self.issues
        ]


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # what splits or hides a line


def _one_line(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config must not lose one silently."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def format_path(loc: Iterable[int | str]) -> str:
    """Render a pydantic location as `routes[2].match.path`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: ErrorDetails) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    simple = {
        "extra_forbidden": "unknown key",
        "missing": "required key is missing",
        "int_type": "expected an integer",
        "int_parsing": "expected an integer",
        "int_from_float": "expected an integer",
        "float_type": "expected a number",
        "float_parsing": "expected a number",
        "bool_type": "expected true or false",
        "bool_parsing": "expected true or false",
        "string_type": "expected a string",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping",
        "list_type": "expected a list",
        "datetime_type": "expected a date-time such as 2026-01-01T00:00:00Z",
        "datetime_from_date_parsing": "expected a date-time such as 2026-01-01T00:00:00Z",
        "datetime_parsing": "expected a date-time such as 2026-01-01T00:00:00Z",
        "path_type": "expected a file path",
    }
    if kind in simple:
        return simple[kind]
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "literal_error":
        return f"expected one of {ctx['expected']}"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "too_short":
        return "must not be empty"
    return err["msg"][0].lower() + err["msg"][1:]


def _validation_issues(exc: ValidationError) -> list[Issue]:
    issues = []
    for err in exc.errors():
        loc = list(err["loc"])
        prefix = ""
        if loc and loc[-1] == "[key]":  # the key of a mapping, not its value, is wrong
            loc.pop()
            prefix = "bad key: "
        issues.append((format_path(loc), prefix + _message(err)))
    return issues


def _unknown(kind: str, name: str, defined: Iterable[str]) -> str:
    """`unknown meter 'api_cals' (defined: api_calls, tokens)`: the fix is in the list."""
    return f"unknown {kind} {name!r} (defined: {', '.join(sorted(defined)) or 'none'})"


def _references(cfg: GatewayConfig) -> Iterator[Issue]:
    """Cross-references that a single model cannot see."""
    names: set[str] = set()
    for i, route in enumerate(cfg.routes):
        at = f"routes[{i}]"
        if route.name in names:
            yield f"{at}.name", f"duplicate route name {route.name!r}"
        names.add(route.name)
        if route.upstream not in cfg.upstreams:
            yield f"{at}.upstream", _unknown("upstream", route.upstream, cfg.upstreams)
        try:
            parse_template(route.match.path)
        except TemplateError as exc:
            yield f"{at}.match.path", str(exc)
        if route.auth == "required" and not (cfg.auth.jwt or cfg.auth.api_keys.enabled):
            yield (
                f"{at}.auth",
                '"required" needs auth.jwt or auth.api_keys.enabled (or set "auth: none")',
            )
        if route.charge and route.auth == "none":
            yield f"{at}.charge", 'charges belong to a tenant: the route needs "auth: required"'
        for meter, cost in route.charge.items():
            spec = cfg.meters.get(meter)
            if spec is None:
                yield f"{at}.charge.{meter}", _unknown("meter", meter, cfg.meters)
            elif cost == "response" and not spec.from_response_header:
                yield f"{at}.charge.{meter}", '"response" needs the meter\'s from_response_header'
    for meter_name, spec in cfg.meters.items():
        if spec.type == "gauge" and spec.period is not None:
            yield f"meters.{meter_name}.period", "a gauge has no period"
        if spec.type == "gauge" and spec.from_response_header:
            yield (
                f"meters.{meter_name}.from_response_header",
                "only a counter can be charged from a response",
            )
    for plan_name, plan in cfg.plans.items():
        for meter in plan.limits:
            if meter not in cfg.meters:
                yield f"plans.{plan_name}.limits.{meter}", _unknown("meter", meter, cfg.meters)
        seen: set[str] = set()
        for j, rate_limit in enumerate(plan.rate_limits):
            if rate_limit.name in seen:
                yield f"plans.{plan_name}.rate_limits[{j}].name", f"duplicate {rate_limit.name!r}"
            seen.add(rate_limit.name)
    for i, tenant in enumerate(cfg.tenants):
        if tenant.plan not in cfg.plans:
            yield f"tenants[{i}].plan", _unknown("plan", tenant.plan, cfg.plans)
    if cfg.stripe:
        if not cfg.stripe.webhook_path.startswith("/_gateway/"):
            yield "stripe.webhook_path", "must be under /_gateway/"
        events: dict[str, str] = {}
        for meter, event_name in cfg.stripe.meter_events.items():
            spec = cfg.meters.get(meter)
            if spec is None:
                yield f"stripe.meter_events.{meter}", _unknown("meter", meter, cfg.meters)
            elif spec.type != "counter":
                yield (
                    f"stripe.meter_events.{meter}",
                    "only counters are reported to Stripe (a gauge is a level, not usage)",
                )
            if event_name in events:
                yield (
                    f"stripe.meter_events.{meter}",
                    f"event name {event_name!r} is already used by {events[event_name]}",
                )
            events.setdefault(event_name, meter)
        for price, plan_name in cfg.stripe.prices.items():
            if plan_name not in cfg.plans:
                yield f"stripe.prices.{price}", _unknown("plan", plan_name, cfg.plans)
    queue = cfg.storage.queue
    if queue is not None and queue != cfg.storage.counters:
        if cfg.storage.embedded:
            yield (
                "storage.queue",
                (
                    "memory:// counters record usage inside the process; "
                    "a queue needs redis:// counters"
                ),
            )
        elif queue.startswith("memory:"):
            yield "storage.queue", "with redis:// counters the queue must be redis:// too"
    if cfg.server.workers > 1:
        for key in ("counters", "ledger"):
            url: str = getattr(cfg.storage, key)
            if url.startswith(("memory:", "sqlite:")):
                scheme = url.split(":", 1)[0]
                yield (
                    "server.workers",
                    f"storage.{key} {scheme}:// keeps its state inside one process; "
                    "use redis:// and postgresql:// with more than one worker",
                )


def _resolve_files(cfg: GatewayConfig, base: Path) -> tuple[GatewayConfig, list[Issue]]:
    """Resolve file paths against the config file's directory and check they exist."""
    issues: list[Issue] = []

    def resolve(at: str, path: Path) -> Path:
        full = path if path.is_absolute() else base / path
        if not full.is_file():
            issues.append((at, f"file not found: {path}"))
        return full

    server = cfg.server
    if server.tls:
        tls = server.tls.model_copy(
            update={
                "cert_file": resolve("server.tls.cert_file", server.tls.cert_file),
                "key_file": resolve("server.tls.key_file", server.tls.key_file),
            }
        )
        server = server.model_copy(update={"tls": tls})
    upstreams = {
        name: up.model_copy(update={"ca_file": resolve(f"upstreams.{name}.ca_file", up.ca_file)})
        if up.ca_file
        else up
        for name, up in cfg.upstreams.items()
    }
    return cfg.model_copy(update={"server": server, "upstreams": upstreams}), issues


def parse(
    data: Any, file: str, base: Path | None = None, *, check_support: bool = True
) -> GatewayConfig:
    """Validate already-parsed YAML data; `file` names the source in errors.

    `check_support=False` skips refusing keys whose behaviour is not built yet;
    only tests of the models themselves use it.
    """
    if not isinstance(data, dict):
        raise ConfigError(file, [("", "expected a mapping of sections at the top level")])
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(file, _validation_issues(exc)) from None
    issues = list(_references(cfg))
    cfg, file_issues = _resolve_files(cfg, base or Path.cwd())
    issues += file_issues
    if check_support:
        issues += unsupported(cfg)
    if issues:
        raise ConfigError(file, issues)
    return cfg


def load(path: str | Path) -> GatewayConfig:
    """Read, parse and validate a config file."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [("", f"cannot read the file: {exc.strerror}")]) from None
    return parse_text(text, file, Path(path).resolve().parent)


def parse_text(text: str, file: str, base: Path | None = None) -> GatewayConfig:
    """Parse and validate a config's YAML text; `file` names it in errors."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, [("", f"{where}invalid YAML: {problem}")]) from None
    return parse(data, file, base)


def json_schema() -> str:
    """The JSON Schema of the config file, as `gateway schema` prints it."""
    schema = GatewayConfig.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Quota gateway configuration"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
