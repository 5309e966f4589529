"""The proxy core against a real upstream on port 0 (DESIGN section 4)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import MakeGateway, gateway_config
from tests.servers import free_port
from tests.upstream import Upstream


async def raw_http(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request exactly as written; return status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def problem_of(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    assert {"type", "title", "status", "detail"} <= doc.keys()
    return doc


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/c%20d?x=1&x=2&y=%2F%3F&empty=&flag",
        "/%7Euser/caf%C3%A9/%E2%82%AC?q=a+b&q=%2B&q=",
        "/v1/items;matrix=1,2/%252F?a=%26&a=%3D&a=%25",
        "/UPPER/a%2fb/MiXeD?Key=Value&key=value&%23=%23",
    ],
)
async def test_path_and_query_reach_upstream_byte_for_byte(
    upstream: Upstream, make_gateway: MakeGateway, target: str
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    status, _, _ = await raw_http(
        gw.port, f"GET {target} HTTP/1.1\nHost: api.test\nConnection: close\n"
    )
    assert status == 200
    assert upstream.seen[-1].raw_path == target


async def test_hop_by_hop_request_headers_are_dropped(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    head = (
        "GET /echo HTTP/1.1\nHost: api.test\n"
        "Connection: close, X-Private-Hop\nX-Private-Hop: secret\n"
        "Keep-Alive: timeout=5\nTE: trailers\nProxy-Authorization: Basic eDp5\n"
        "Proxy-Connection: keep-alive\nUpgrade: h2c\nTrailer: X-Checksum\n"
        "X-End-To-End: kept\n"
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n"
    )
    status, _, _ = await raw_http(gw.port, head)
    assert status == 200
    seen = upstream.seen[-1]
    for name in (
        "X-Private-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Proxy-Connection",
        "Upgrade", "Trailer",
    ):  # fmt: skip
        assert seen.header(name) is None, name
    assert seen.header("Connection") in (None, "keep-alive")
    assert seen.header("X-End-To-End") == "kept"
    assert seen.header("traceparent") == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert seen.header("Via") == "1.1 gateway"


async def test_hop_by_hop_response_headers_are_dropped(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    status, headers, body = await raw_http(
        gw.port, "GET /hop HTTP/1.1\nHost: api.test\nConnection: close\n"
    )
    assert (status, body) == (200, b"ok")
    assert "x-upstream-private" not in headers
    assert "keep-alive" not in headers
    assert "proxy-authenticate" not in headers
    assert headers["x-upstream-public"] == "visible"
    assert headers["via"] == "1.1 gateway"


async def test_forwarded_headers_from_an_untrusted_client_are_replaced(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    async with aiohttp.ClientSession() as client:
        headers = {
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.test",
            "Forwarded": "for=203.0.113.9",
            "X-Real-IP": "203.0.113.9",
        }
        async with client.get(f"http://127.0.0.1:{gw.port}/echo", headers=headers) as resp:
            assert resp.status == 200
    seen = upstream.seen[-1]
    assert seen.all("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{gw.port}"
    assert seen.header("Forwarded") is None
    assert seen.header("X-Real-IP") is None


async def test_forwarded_headers_from_a_trusted_proxy_are_kept(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    server = {"host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.0/8"]}
    gw = await make_gateway(gateway_config(upstream.url, server=server))
    async with aiohttp.ClientSession() as client:
        headers = {
            "X-Forwarded-For": "203.0.113.9, 10.1.1.1",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.com",
        }
        async with client.get(f"http://127.0.0.1:{gw.port}/echo", headers=headers) as resp:
            assert resp.status == 200
    seen = upstream.seen[-1]
    assert seen.header("X-Forwarded-For") == "203.0.113.9, 10.1.1.1, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == "api.example.com"


async def test_request_ids_host_tenant_and_authorization_headers(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    upstreams = {
        # `always`: the client's own Authorization on an `auth: none` route.
        "app": {"url": upstream.url, "forward_authorization": "always"},
        "private": {"url": upstream.url, "forward_authorization": False, "preserve_host": True},
    }
    routes = [
        {
            "name": "private",
            "match": {"path": "/private/**"},
            "upstream": "private",
            "auth": "none",
        },
        {"name": "all", "match": {"path": "/**"}, "upstream": "app", "auth": "none"},
    ]
    gw = await make_gateway(gateway_config(upstream.url, upstreams=upstreams, routes=routes))
    base = f"http://127.0.0.1:{gw.port}"
    sent = {"X-Request-Id": "req-123.abc", "X-Tenant-Id": "spoofed", "Authorization": "Bearer t"}
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/echo", headers=sent) as resp:
            assert resp.headers["X-Request-Id"] == "req-123.abc"
        seen = upstream.seen[-1]
        assert seen.header("X-Request-Id") == "req-123.abc"
        assert seen.header("X-Tenant-Id") is None
        assert seen.header("Authorization") == "Bearer t"
        assert seen.header("Host") == f"127.0.0.1:{upstream.port}"

        bad = {"X-Request-Id": "bad id\twith spaces", "Authorization": "Bearer t"}
        async with client.get(f"{base}/private/x", headers=bad) as resp:
            generated = resp.headers["X-Request-Id"]
        assert len(generated) == 32 and generated != bad["X-Request-Id"]
        seen = upstream.seen[-1]
        assert seen.header("X-Request-Id") == generated
        assert seen.header("Authorization") is None
        assert seen.header("Host") == f"127.0.0.1:{gw.port}"


async def test_redirects_are_passed_back_not_followed(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gw.port}/redirect"
        async with client.get(url, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/elsewhere?from=redirect"
    assert [s.raw_path for s in upstream.seen] == ["/redirect"]


async def test_bodies_are_not_decompressed(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    compressed = gzip.compress(b"x" * 1000)
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"http://127.0.0.1:{gw.port}/gzip") as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await resp.read()) == b'{"compressed": true}'
        headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        url = f"http://127.0.0.1:{gw.port}/echo"
        async with client.post(url, data=compressed, headers=headers) as resp:
            info = await resp.json()
    assert info["body_sha256"] == hashlib.sha256(compressed).hexdigest()
    assert upstream.seen[-1].header("Content-Encoding") == "gzip"


async def test_unmatched_bad_and_reserved_paths_get_problems(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    routes = [{"name": "v1", "match": {"path": "/v1/**"}, "upstream": "app", "auth": "none"}]
    gw = await make_gateway(gateway_config(upstream.url, routes=routes))
    cases = {
        "/v2/items": (404, "no-route"),
        "/_gateway/nothing": (404, "not-found"),
        "/v1/a/../b": (400, "bad-path"),
        "/v1/a/%2e%2E/b": (400, "bad-path"),
        "/v1//b": (400, "bad-path"),
        "/v1/%zz": (400, "bad-path"),
    }
    for target, (status, kind) in cases.items():
        got, headers, body = await raw_http(
            gw.port, f"GET {target} HTTP/1.1\nHost: api.test\nConnection: close\n"
        )
        doc = problem_of(body)
        assert (got, doc["status"]) == (status, status), target
        assert doc["type"].endswith(":" + kind), target
        assert headers["content-type"] == "application/problem+json"
        assert doc["request_id"] == headers["x-request-id"]
    assert upstream.seen == []


async def test_unreachable_upstream_is_502(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(gateway_config(f"http://127.0.0.1:{free_port()}"))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gw.port}/anything") as resp:
            assert resp.status == 502
            assert resp.content_type == "application/problem+json"
            assert problem_of(await resp.read())["type"].endswith(":upstream-unreachable")


async def test_upstream_timeouts(upstream: Upstream, make_gateway: MakeGateway) -> None:
    config = gateway_config(upstream.url)
    config["upstreams"]["app"]["timeout_s"] = 0.3
    gw = await make_gateway(config)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gw.port}/slow?delay=3") as resp:
            assert resp.status == 504
            assert problem_of(await resp.read())["type"].endswith(":upstream-timeout")
        # A small body is read whole before answering: a stall is still a 504.
        async with client.get(f"http://127.0.0.1:{gw.port}/stall?bytes=1000") as resp:
            assert resp.status == 504
        # A large body streams: once the headers are sent and the upstream
        # stalls, the client must see a truncated body, never a short one that
        # looks complete.
        async with client.get(f"http://127.0.0.1:{gw.port}/stall?bytes=1000000") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_total_timeout(upstream: Upstream, make_gateway: MakeGateway) -> None:
    config = gateway_config(upstream.url)
    config["upstreams"]["app"].update(timeout_s=10, total_timeout_s=0.3)
    gw = await make_gateway(config)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gw.port}/slow?delay=2") as resp:
            assert resp.status == 504


def _limited_config(upstream: Upstream) -> dict[str, Any]:
    routes = [
        {"name": "upload", "match": {"path": "/upload"}, "upstream": "app", "auth": "none",
         "max_body_bytes": 1024 * 1024},
        {"name": "all", "match": {"path": "/**"}, "upstream": "app", "auth": "none"},
    ]  # fmt: skip
    server = {"host": "127.0.0.1", "port": 0, "max_body_bytes": 1000}
    return gateway_config(upstream.url, routes=routes, server=server)


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        block = b"u" * min(size, total - sent)
        sent += len(block)
        yield block


async def test_declared_length_over_the_limit_is_413_before_the_upstream(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(_limited_config(upstream))
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{gw.port}/echo", data=b"x" * 1001) as resp:
            assert resp.status == 413
            doc = problem_of(await resp.read())
            assert doc["type"].endswith(":body-too-large") and doc["limit"] == 1000
        async with client.post(f"http://127.0.0.1:{gw.port}/echo", data=b"x" * 1000) as resp:
            assert resp.status == 200
    assert [s.body_bytes for s in upstream.seen] == [1000]


async def test_chunked_upload_over_the_limit_is_aborted_upstream(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(_limited_config(upstream))
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gw.port}/upload"
        async with client.post(url, data=_chunks(3 * 1024 * 1024)) as resp:
            assert resp.status == 413
            assert problem_of(await resp.read())["limit"] == 1024 * 1024
        for _ in range(100):  # the upstream notices the abort asynchronously
            if upstream.seen:
                break
            await asyncio.sleep(0.02)
        assert len(upstream.seen) == 1
        assert not upstream.seen[0].complete
        assert upstream.seen[0].body_bytes <= 1024 * 1024
        # Within the limit, the same route streams the whole body.
        async with client.post(url, data=_chunks(1024 * 1024)) as resp:
            assert resp.status == 200
            assert (await resp.json())["body_bytes"] == 1024 * 1024
        assert upstream.seen[-1].complete


async def test_metrics_and_health_on_the_admin_listener(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"http://127.0.0.1:{gw.port}/echo") as resp:
                assert resp.status == 200
        admin = f"http://127.0.0.1:{gw.admin_port}"
        async with client.get(f"{admin}/metrics") as resp:
            text = await resp.text()
        async with client.get(f"{admin}/healthz") as resp:
            assert resp.status == 200
        async with client.get(f"{admin}/readyz") as resp:
            assert resp.status == 200
    assert 'gateway_requests_total{method="GET",route="all",status="200"} 3.0' in text
    assert 'gateway_request_duration_seconds_count{route="all",status_class="2xx"} 3.0' in text
    assert 'gateway_upstream_duration_seconds_count{upstream="app"} 3.0' in text


async def test_a_body_that_stops_arriving_is_answered_408_and_closed(
    upstream: Upstream, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    config = gateway_config(upstream.url)
    config["server"]["limits"] = {"body_idle_timeout_s": 0.3}
    gw = await make_gateway(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # read() returns at the close
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert problem_of(body)["type"].endswith(":body-timeout")
    assert upstream.seen == []  # the upload was aborted, never taken for a whole request
    assert not [r for r in caplog.records if r.name.startswith("gateway") and r.levelno >= 40]


async def test_a_client_gone_mid_body_is_counted_and_logs_no_error(
    upstream: Upstream, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    assert gw.app is not None
    requests = gw.registry.get_sample_value(
        "gateway_requests_total", {"route": "all", "method": "POST", "status": "499"}
    )
    for _ in range(50):
        if requests:
            break
        await asyncio.sleep(0.05)
        requests = gw.registry.get_sample_value(
            "gateway_requests_total", {"route": "all", "method": "POST", "status": "499"}
        )
    assert requests == 1
    assert upstream.seen == []
    assert not [r for r in caplog.records if r.name.startswith("gateway") and r.levelno >= 40]


async def test_header_bytes_that_are_not_ascii_reach_the_upstream_unchanged(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(gateway_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET /echo HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n"
        b"X-Name: caf\xc3\xa9 \xff\xfe\r\n\r\n"
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    seen = upstream.seen[-1].header("X-Name")
    assert seen is not None
    assert seen.encode("latin-1") == b"caf\xc3\xa9 \xff\xfe"  # as the upstream read them
