"""WebSocket passthrough and TLS on both sides of the gateway."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.certs import make_certs
from tests.conftest import MakeGateway, gateway_config
from tests.upstream import Upstream, start_upstream

WS_ROUTES: list[dict[str, Any]] = [
    {"name": "events", "match": {"path": "/ws"}, "upstream": "app", "auth": "none",
     "websocket": True},
    {"name": "plain", "match": {"path": "/**"}, "upstream": "app", "auth": "none"},
]  # fmt: skip


async def test_websocket_is_echoed_through(upstream: Upstream, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(gateway_config(upstream.url, routes=WS_ROUTES))
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gw.port}/ws?room=1"
        async with client.ws_connect(url, protocols=("chat", "echo")) as ws:
            assert ws.protocol == "echo"
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "echo: hello"
            await ws.send_bytes(b"\x01\x02\x03")
            assert await ws.receive_bytes(timeout=5) == b"\x03\x02\x01"
            await ws.close()
    seen = upstream.seen[-1]
    assert seen.raw_path == "/ws?room=1"
    assert seen.header("Via") == "1.1 gateway"


async def test_upgrade_is_not_passed_on_other_routes(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    routes = [{"name": "plain", "match": {"path": "/**"}, "upstream": "app", "auth": "none"}]
    gw = await make_gateway(gateway_config(upstream.url, routes=routes))
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect(f"http://127.0.0.1:{gw.port}/ws")
        async with client.get(
            f"http://127.0.0.1:{gw.port}/echo",
            headers={"Connection": "Upgrade", "Upgrade": "websocket"},
        ) as resp:
            assert resp.status == 200
    assert upstream.seen[-1].header("Upgrade") is None


async def test_tls_on_the_listener_and_to_an_https_upstream(
    tmp_path: Path, make_gateway: MakeGateway
) -> None:
    up_certs = make_certs(tmp_path, "upstream")
    gw_certs = make_certs(tmp_path, "gateway")
    up_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    up_ctx.load_cert_chain(up_certs.cert_file, up_certs.key_file)
    upstream = await start_upstream(up_ctx)
    try:
        server = {
            "host": "127.0.0.1",
            "port": 0,
            "tls": {"cert_file": str(gw_certs.cert_file), "key_file": str(gw_certs.key_file)},
        }
        upstreams = {
            "app": {"url": upstream.url, "ca_file": str(up_certs.ca_file)},
            "unverified": {"url": upstream.url},  # the system CAs do not know our test CA
        }
        routes = [
            {"name": "bad", "match": {"path": "/bad/**"}, "upstream": "unverified",
             "auth": "none"},
            {"name": "all", "match": {"path": "/**"}, "upstream": "app", "auth": "none"},
        ]  # fmt: skip
        gw = await make_gateway(
            gateway_config(upstream.url, server=server, upstreams=upstreams, routes=routes)
        )
        client_ctx = ssl.create_default_context(cafile=str(gw_certs.ca_file))
        async with aiohttp.ClientSession() as client:
            async with client.get(f"https://localhost:{gw.port}/echo?x=1", ssl=client_ctx) as resp:
                assert resp.status == 200
                info = await resp.json()
            assert info["raw_path"] == "/echo?x=1"
            assert upstream.seen[-1].header("X-Forwarded-Proto") == "https"
            async with client.get(f"https://localhost:{gw.port}/bad/x", ssl=client_ctx) as resp:
                assert resp.status == 502
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await client.get(f"https://localhost:{gw.port}/echo")  # client does not trust it
    finally:
        await upstream.close()


async def test_websocket_messages_are_limited_to_the_route_body_limit(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    routes = [{**WS_ROUTES[0], "max_body_bytes": 1024}, WS_ROUTES[1]]
    gw = await make_gateway(gateway_config(upstream.url, routes=routes))
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gw.port}/ws"
        async with client.ws_connect(url, compress=15) as ws:
            assert ws.compress == 0  # the gateway does not negotiate compression
            await ws.send_str("x" * 1000)
            assert await ws.receive_str(timeout=5) == "echo: " + "x" * 1000
            await ws.send_str("y" * 5000)
            closed = await ws.receive(timeout=5)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
