"""The admin API against its own OpenAPI document, by schemathesis: generated requests
(valid and not) to a running `gateway serve`; no answer is a 500, every status and
content type is one the document states, every body matches its schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import Case, checks

from gateway.openapi import openapi_document
from tests.procs import GatewayProcess, write_config

TOKEN = "contract-admin-token-" + "c" * 24
schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("contract")
    config = write_config(
        tmp / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "storage": {"ledger": f"sqlite:///{tmp / 'ledger.db'}"},
            "auth": {"api_keys": {"enabled": True}},
            "logging": {"access_log": False},
            "upstreams": {"app": {"url": "http://127.0.0.1:1"}},  # never reached
            "meters": {"api_calls": {"type": "counter"}, "seats": {"type": "gauge"}},
            "plans": {
                "free": {"limits": {"api_calls": {"limit": 100}, "seats": {"limit": 5}}},
                "pro": {"limits": {"api_calls": {"limit": 1000}}},
            },
            "tenants": [{"id": "acme", "plan": "free"}],
            "routes": [
                {
                    "name": "api",
                    "match": {"path": "/**"},
                    "upstream": "app",
                    "charge": {"api_calls": 1},
                }
            ],
        },  # fmt: skip
    )
    process = GatewayProcess(config, {"GATEWAY_ADMIN_TOKEN": TOKEN}).start()
    try:
        yield f"http://127.0.0.1:{process.admin_port}"
    finally:
        process.stop()


@schema.parametrize()
@hypothesis.settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
def test_the_admin_api_keeps_to_its_document(case: Case[Any], admin_url: str) -> None:
    case.call_and_validate(
        base_url=admin_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        # A schema-valid body may still name a plan or meter the config lacks, or a
        # new tenant without a plan: a 422 that says so is right, not a slip.
        excluded_checks=[checks.positive_data_acceptance],
    )
