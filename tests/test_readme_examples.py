"""The README's examples are what the gateway takes and what it answers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.auth.jwt import mint
from gateway.config import parse
from tests.conftest import MakeGateway, gateway_config
from tests.schema_check import load_as_editor, schema_errors
from tests.upstream import Upstream

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SECRET = "readme-examples-secret-" + "r" * 20


def _blocks(language: str) -> list[str]:
    """The README's fenced blocks in `language`, indentation (list items) removed."""
    found = []
    for indent, body in re.findall(rf"^( *)```{language}\n(.*?)^\1```", README, re.S | re.M):
        found.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return found


def test_the_readme_yaml_examples_load_and_match_the_schema() -> None:
    blocks = _blocks("yaml")
    assert blocks
    for block in blocks:
        parse(yaml.safe_load(block), "README.md")
        assert schema_errors(load_as_editor(block)) == [], block[:200]


def _shape(body: dict[str, Any]) -> dict[str, Any]:
    """What an example must share with a real answer: keys, value types, the problem type."""
    return {
        "type": body["type"],
        "status": body["status"],
        "fields": {key: type(value).__name__ for key, value in body.items()},
    }


async def test_the_readme_402_and_429_bodies_are_what_the_gateway_answers(
    upstream: Upstream, make_gateway: MakeGateway, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("README_JWT_SECRET", SECRET)
    data = gateway_config(
        upstream.url,
        auth={"jwt": {"algorithms": ["HS256"], "secret_env": "README_JWT_SECRET"}},
        storage={"ledger": f"sqlite:///{tmp_path}/ledger.db"},
        billing={"upgrade_url": "https://example.com/billing"},
        meters={"api_calls": {"type": "counter", "period": "billing_cycle"}},
        plans={
            "starter": {"limits": {"api_calls": {"limit": 1}}},
            "tiny": {"rate_limits": [{"name": "per_second", "rate": 1, "burst": 1}]},
        },
        tenants=[{"id": "acme", "plan": "starter"}, {"id": "fast", "plan": "tiny"}],
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                 "charge": {"api_calls": 1}}],
    )  # fmt: skip
    gw = await make_gateway(data)
    answers: dict[int, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as http:
        for tenant in ("acme", "fast"):
            token = mint(SECRET, "HS256", ["org_id"], tenant, 600)
            for _ in range(3):
                url = f"http://127.0.0.1:{gw.port}/v1/projects"
                async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                    if resp.status != 200:
                        answers[resp.status] = await resp.json(content_type=None)
                        break
    examples = {
        body["status"]: body for body in map(json.loads, _blocks("json")) if "status" in body
    }
    assert {402, 429} <= examples.keys() and {402, 429} <= answers.keys()
    for status in (402, 429):
        assert _shape(examples[status]) == _shape(answers[status]), status
