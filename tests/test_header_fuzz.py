"""Hypothesis against header handling through a running gateway: any mix of hop-by-hop,
override, client-address, credential and gateway-owned headers, in any case, repeated,
named in `Connection`, with odd values, sent raw. Nothing is a 5xx, and whatever the
client sent, none of them reaches the upstream as the client wrote it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from gateway.headers import CLIENT_IP_HEADERS, HOP_BY_HOP, OVERRIDE_HEADERS
from gateway.server import Gateway
from tests.conftest import gateway_config
from tests.rawhttp import read_answer
from tests.test_auth_gateway import ADMIN_TOKEN, admin
from tests.upstream import Upstream

OWNED = ("X-Tenant-Id", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded")
NAMES = sorted(
    {*HOP_BY_HOP, *OVERRIDE_HEADERS, *CLIENT_IP_HEADERS, *OWNED, "Authorization", "X-API-Key",
     "Expect", "X-Custom", "Accept", "Content-Type", "Idempotency-Key", "X-Request-Id"}
)  # fmt: skip
# Never forwarded as the client wrote them (the gateway sets its own of some).
STRIPPED = {n.lower() for n in (*HOP_BY_HOP, *OVERRIDE_HEADERS, *CLIENT_IP_HEADERS, *OWNED,
                                "X-API-Key")}  # fmt: skip
MARK = "fz9"  # in every fuzzed value, so that a forwarded copy is recognised


def cased(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


values = st.one_of(
    st.sampled_from(["", "a", "close", "keep-alive, x-custom", "100-continue", "chunked",
                     "127.0.0.1", "https", "/admin", "Bearer x", "DELETE", "\t", "é"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)  # fmt: skip
fields = st.lists(st.tuples(st.sampled_from(NAMES).flatmap(cased), values), min_size=1, max_size=8)


@pytest.mark.slow
async def test_fuzzed_headers_never_fail_and_never_pass_through(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gateway: Any
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    gateway: Gateway = await make_gateway(
        gateway_config(
            upstream.url,
            storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
            auth={"api_keys": {"enabled": True}},
            meters={"calls": {"type": "counter"}},
            plans={"free": {}},
            tenants=[{"id": "acme", "plan": "free"}],
            routes=[
                {"name": "open", "match": {"path": "/open/**"}, "upstream": "app", "auth": "none"},
                {
                    "name": "api",
                    "match": {"path": "/api/**"},
                    "upstream": "app",
                    "charge": {"calls": 1},
                },
            ],
        )  # fmt: skip
    )
    _, created = await admin(gateway, "POST", "/admin/tenants/acme/api-keys", {})
    key = created["key"]
    statuses: dict[int, int] = {}

    async def send(path: str, headers: list[tuple[str, str]]) -> tuple[int, list[Any]]:
        before = len(upstream.seen)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            head = "".join(f"{name}: {value}\r\n" for name, value in headers)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: api.test\r\n{head}\r\n".encode())
            answer = await asyncio.wait_for(read_answer(reader), 10)
        finally:
            writer.close()
        return answer.status, upstream.seen[before:]

    @hypothesis.given(
        fuzzed=fields, keyed=st.booleans(), path=st.sampled_from(["/open/x", "/api/x"])
    )
    @hypothesis.settings(
        max_examples=400, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )  # fmt: skip
    def check(fuzzed: list[tuple[str, str]], keyed: bool, path: str) -> None:
        sent = [(name, f"{value}{MARK}" if value.strip() else value) for name, value in fuzzed]
        if keyed:
            sent.append(("X-API-Key", key))
        status, seen = asyncio.run_coroutine_threadsafe(send(path, sent), loop).result(15)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (sent, status)
        for request in seen:
            for name, value in request.headers:
                if name.lower() in STRIPPED:
                    assert MARK not in value, (name, value, sent)
            assert key not in str(request.headers)  # the gateway's own credential

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check)
    assert statuses.get(200), statuses  # some got through: the property was exercised
