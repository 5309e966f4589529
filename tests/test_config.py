"""The config contract: one bad YAML file per error, each with its exact message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, json_schema, load, parse
from gateway.config.types import UNLIMITED

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((Path(__file__).parent / "bad_configs").glob("*.yaml"))


def expected_lines(path: Path) -> list[str]:
    prefix = "# expect: "
    lines = path.read_text().splitlines()
    return [f"{path}: {line[len(prefix) :]}" for line in lines if line.startswith(prefix)]


def test_there_is_a_bad_file_per_error_case() -> None:
    assert len(BAD) >= 10


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_is_refused_with_its_exact_message(path: Path) -> None:
    expected = expected_lines(path)
    assert expected, f"{path.name} has no '# expect:' line"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).splitlines() == expected


@pytest.mark.parametrize("name", ["gateway.yaml", "demo.yaml"])
def test_example_configs_are_valid(name: str) -> None:
    load(ROOT / "config" / name)


def test_schema_file_is_current() -> None:
    assert (ROOT / "config" / "gateway.schema.json").read_text() == json_schema()


def test_schema_rejects_unknown_keys() -> None:
    schema = json.loads(json_schema())
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["RouteConfig"]["additionalProperties"] is False


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load(missing)
    assert str(caught.value) == f"{missing}: cannot read the file: No such file or directory"


def test_defaults_and_normalisation() -> None:
    config = parse(
        {
            "upstreams": {"app": {"url": "http://127.0.0.1:3000"}},
            "routes": [
                {"name": "a", "match": {"path": "/x", "methods": ["get"]}, "upstream": "app",
                 "auth": "none"}
            ],
            "auth": {
                "jwt": {
                    "algorithms": ["RS256"],
                    "jwks_url": "https://x.test/jwks.json",
                    "tenant_claim": "https://x.test/org",
                }
            },
        },
        "inline.yaml",
        check_support=False,
    )  # fmt: skip
    assert config.routes[0].match.methods == ["GET"]
    assert config.auth.jwt is not None and config.auth.jwt.tenant_claim == ["https://x.test/org"]
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    assert config.storage.counters == "memory://"


@pytest.mark.parametrize(
    ("raw", "limit"), [("unlimited", UNLIMITED), (-1, UNLIMITED), (0, 0), (1000, 1000)]
)
def test_limit_spellings(raw: object, limit: int) -> None:
    config = parse(
        {
            "upstreams": {"app": {"url": "http://127.0.0.1:3000"}},
            "routes": [{"name": "a", "match": {"path": "/x"}, "upstream": "app", "auth": "none"}],
            "meters": {"api_calls": {"type": "counter"}},
            "plans": {"p": {"limits": {"api_calls": {"limit": raw}}}},
        },
        "inline.yaml",
        check_support=False,
    )
    assert config.plans["p"].limits["api_calls"].limit == limit


def test_check_config_command_exit_codes() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(ROOT / "config" / "gateway.yaml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith(": ok (7 routes, 1 upstreams)\n")
    bad = BAD[0]
    refused = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(bad)], capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == expected_lines(bad)


def test_schema_command_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "schema"], capture_output=True, text=True, check=True
    )
    assert out.stdout == json_schema()
