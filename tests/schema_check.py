"""Configs checked against config/gateway.schema.json as an editor would check them."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "config" / "gateway.schema.json"


class _EditorLoader(yaml.SafeLoader):
    """YAML as editors hand it to a JSON Schema: timestamps stay strings."""


_EditorLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(data: Any) -> list[str]:
    """What the JSON Schema finds wrong in a config, one line per error."""
    plain = json.loads(json.dumps(data, default=str))  # Path and datetime objects as text
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in _validator().iter_errors(plain)
    ]


def assert_schema_accepts(data: Any, where: str = "config") -> None:
    """Fail when a config that the gateway is about to accept does not match the schema."""
    errors = schema_errors(data)
    assert not errors, f"{where} does not match config/gateway.schema.json: {errors}"


def load_as_editor(text: str) -> Any:
    """Parse YAML text the way an editor's schema check reads it."""
    return yaml.load(text, Loader=_EditorLoader)  # noqa: S506 - a SafeLoader subclass
