"""Hypothesis against the route matcher through a running gateway: hostile paths (dot
segments plain and encoded, encoded slashes and backslashes, `;` parameters, odd
escapes, case) sent raw, and a real upstream that records what it was asked for.

Each route forwards under its own base path and charges its own meter, so the upstream
tells which route the gateway chose. The property: whatever the upstream serves, read
the way upstreams read paths (escapes decoded, `/` and `\\` as separators, dot segments
resolved), is what the chosen route covers; nothing is a 5xx; and each meter holds
exactly the requests its route forwarded.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import hypothesis
import pytest
from hypothesis import strategies as st

from gateway.config.loader import parse
from gateway.routing import Router
from tests.conftest import gateway_config
from tests.rawhttp import read_answer
from tests.test_auth_gateway import ADMIN_TOKEN, admin
from tests.upstream import Upstream

TEMPLATES = [
    "/v1/users/{id}",
    "/v1/users/{id}/orders/**",
    "/v1/**",
    "/v2/{x}/static",
    "/admin/**",
    "/files/{name}",
    "/",
]
NORMAL = [
    "v1", "V1", "v2", "users", "Users", "orders", "admin", "static", "files", "x", "42",
    "a%20b", "%C3%A9", "é", "~", "*", "a;b", "%252e", "%7E",
]  # fmt: skip
HOSTILE = [
    ".", "..", "", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "a%2fb", "..;x", "%00",
    "%zz", "%", "%ff", "v1%2f..", "%2fadmin", "users%5c..%5cadmin",
]  # fmt: skip
SEGMENT_RE = re.compile(r"[/\\]")


def config(upstream: Upstream, tmp_path: Path) -> dict[str, Any]:
    return gateway_config(
        upstream.url,
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
        auth={"api_keys": {"enabled": True}},
        upstreams={f"r{i}": {"url": f"{upstream.url}/r{i}"} for i in range(len(TEMPLATES))},
        meters={f"m{i}": {"type": "counter"} for i in range(len(TEMPLATES))},
        plans={"free": {}},
        tenants=[{"id": "acme", "plan": "free"}],
        routes=[{"name": f"route{i}", "match": {"path": t}, "upstream": f"r{i}",
                 "charge": {f"m{i}": 1}} for i, t in enumerate(TEMPLATES)],
    )  # fmt: skip


def as_upstreams_read(raw_path: str) -> list[str]:
    """The segments an upstream serves for a forwarded path: escapes decoded, `/` and `\\`
    both separators, dot segments resolved (RFC 3986 section 5.2.4)."""
    path = raw_path.partition("?")[0]
    decoded = unquote(path, errors="surrogateescape")
    resolved = posixpath.normpath("/" + "/".join(SEGMENT_RE.split(decoded)))
    resolved = resolved.lstrip("/")
    return resolved.split("/") if resolved else []


@pytest.mark.slow
async def test_the_route_charged_is_the_one_the_upstream_serves(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gateway: Any
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    data = config(upstream, tmp_path)
    gateway = await make_gateway(data)
    router = Router(parse(data, "test.yaml").routes)
    _, created = await admin(gateway, "POST", "/admin/tenants/acme/api-keys", {})
    key = created["key"]
    forwarded: Counter[int] = Counter()
    statuses: Counter[int] = Counter()

    async def send(target: str) -> tuple[int, str | None]:
        """The gateway's status, and the raw path the upstream saw (None if nothing)."""
        before = len(upstream.seen)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: api.test\r\nX-API-Key: {key}\r\n"
                f"Connection: close\r\n\r\n".encode("utf-8", "surrogateescape")
            )
            answer = await read_answer(reader)
        finally:
            writer.close()
        seen = upstream.seen[before:]
        assert len(seen) <= 1
        return answer.status, seen[0].raw_path if seen else None

    # Mostly ordinary segments after a route's first one, so that most paths reach a
    # route; one segment in eight hostile.
    segment = st.one_of(*[st.sampled_from(NORMAL)] * 7, st.sampled_from(HOSTILE))
    first = st.sampled_from(["v1", "v2", "admin", "files", "V1", "", "%2e%2e", "v1%2f"])
    paths = st.builds(
        lambda head, tail: "/" + "/".join([head, *tail]), first, st.lists(segment, max_size=5)
    )
    queries = st.sampled_from(["", "?a=1", "?next=/admin/x", "?%2e%2e"])

    @hypothesis.given(path=paths, query=queries)
    @hypothesis.settings(
        max_examples=1500, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )  # fmt: skip
    def check(path: str, query: str) -> None:
        status, raw = asyncio.run_coroutine_threadsafe(send(path + query), loop).result(10)
        statuses[status] += 1
        assert status < 500, (path, status)
        if raw is None:
            assert status >= 400, (path, status)  # refused or unrouted, never served
            return
        assert status == 200, (path, status)
        base, _, rest = raw[1:].partition("/")
        index = int(base.removeprefix("r"))
        forwarded[index] += 1
        served = as_upstreams_read("/" + rest)
        match = router.match("GET", "api.test", served)
        assert match is not None and match.route.index == index, (path, raw, served)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(check)
    print(f"\nroute fuzz: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert forwarded and statuses[400] and statuses[200], statuses  # both kinds were tried
    status, usage = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    charged = {i: usage["meters"][f"m{i}"]["used"] for i in range(len(TEMPLATES))}
    assert charged == {i: forwarded[i] for i in range(len(TEMPLATES))}
