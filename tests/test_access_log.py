"""The access log: a JSON line per request with its fields, text on demand, off by a
switch, and no credential or raw request byte in any line the gateway writes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, cast

import aiohttp
import jwt as pyjwt
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access_log import AccessLog, Outcome
from gateway.app_keys import ACCESS_LOG
from gateway.config.models import LoggingConfig
from gateway.headers import TrustedProxies
from gateway.http.message import Connection, Request, Response
from gateway.logs import LineBuffer, configure
from tests.conftest import MakeGateway, gateway_config
from tests.procs import GatewayProcess, write_config
from tests.rawhttp import read_answer
from tests.upstream import Upstream

JWT_SECRET = "access-log-jwt-secret-" + "J" * 40
ADMIN_TOKEN = "access-log-admin-token-ADMINSECRET"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FIELDS = {
    "ts", "level", "logger", "request_id", "traceparent", "tenant", "route", "method", "path",
    "status", "decision", "quota_ms", "upstream_ms", "total_ms", "bytes_in", "bytes_out", "client",
}  # fmt: skip


def _config(upstream_url: str, tmp_path: Path) -> dict[str, Any]:
    return gateway_config(
        upstream_url,
        storage={"ledger": f"sqlite:///{tmp_path}/ledger.db"},
        auth={
            "jwt": {"algorithms": ["HS256"], "secret_env": "GATEWAY_JWT_SECRET"},
            "api_keys": {"enabled": True},
        },
        meters={"api_calls": {"type": "counter", "period": "month"}},
        plans={"tiny": {"limits": {"api_calls": {"limit": 4}}}},
        tenants=[{"id": "acme", "plan": "tiny"}],
        routes=[
            {"name": "open", "match": {"path": "/open/**"}, "upstream": "app", "auth": "none"},
            {
                "name": "api",
                "match": {"path": "/v1/**"},
                "upstream": "app",
                "charge": {"api_calls": 1},
            },
        ],  # fmt: skip
    )


def _token(secret: str, tenant: str = "acme") -> str:
    return pyjwt.encode({"org_id": tenant, "exp": 4102444800}, secret, algorithm="HS256")


async def _raw(port: int, data: bytes) -> int:
    """Send `data` as it is; the status of the answer (0 when the connection just closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            return (await asyncio.wait_for(read_answer(reader), 5)).status
        except (asyncio.IncompleteReadError, ConnectionError):
            return 0
    finally:
        writer.close()


async def test_each_request_gets_a_json_line_and_no_secret_reaches_any_log(
    tmp_path: Path, upstream: Upstream
) -> None:
    path = write_config(tmp_path / "gateway.yaml", _config(upstream.url, tmp_path))
    env = {"GATEWAY_JWT_SECRET": JWT_SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    token = _token(JWT_SECRET)
    forged = _token("not-the-secret-" + "F" * 40)
    secrets = {
        "jwt secret": JWT_SECRET, "admin token": ADMIN_TOKEN, "token": token,
        "token signature": token.rsplit(".", 1)[1], "forged": forged,
        "unknown key": "gk_0123456789ab_UNKNOWNKEYSECRETUNKNOWNKEYSECRETUNKNOWNKEYSE",
        "cookie": "COOKIESECRET", "query": "QUERYSECRET", "odd auth": "ODDAUTHSECRET",
        "raw": "RAWSECRET", "raw2": "RAWLINESECRET", "basic": "QmFzaWNTRUNSRVQ6cHc=",
    }  # fmt: skip
    stdout = tmp_path / "stdout.log"
    gateway = GatewayProcess(path, env, stdout=stdout)
    await asyncio.to_thread(gateway.start)  # creates the tenant
    created = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "tenants", "-c", str(path), "create-key", "acme"],
        capture_output=True, text=True, timeout=60, env=gateway.env,
    )  # fmt: skip
    api_key = json.loads(created.stdout)["key"]
    secrets["api key"] = api_key
    base = f"http://127.0.0.1:{gateway.port}"
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as client:

            async def status(method: str, url: str, **kwargs: Any) -> int:
                async with client.request(method, base + url, **kwargs) as resp:
                    await resp.read()
                    return resp.status

            assert await status(
                "GET", "/v1/a?api_key=QUERYSECRET&token=QUERYSECRET",
                headers={**bearer, "traceparent": TRACEPARENT, "Cookie": "sid=COOKIESECRET"},
            ) == 200  # fmt: skip
            key = {"X-API-Key": api_key}
            assert await status("POST", "/v1/b", headers=key, data=b"x" * 10) == 200
            replay = {**bearer, "Idempotency-Key": "k1"}
            assert await status("POST", "/v1/c", headers=replay, data=b"{}") == 200
            assert await status("POST", "/v1/c", headers=replay, data=b"{}") == 200
            assert await status("GET", "/v1/d", headers=bearer) == 200
            assert await status("GET", "/v1/e", headers=bearer) == 402  # the 5th: quota
            assert await status("GET", "/v1/f", headers={"Authorization": f"Bearer {forged}"})
            assert await status("GET", "/v1/g", headers={"X-API-Key": secrets["unknown key"]})
            basic = {"Authorization": f"Basic {secrets['basic']}"}
            assert await status("GET", "/v1/h", headers=basic) == 401
            assert await status("GET", "/nowhere?token=QUERYSECRET") == 404
            assert await status("GET", "/open/i", headers={"Cookie": "a=COOKIESECRET"}) == 200
        port = gateway.port
        odd = (
            b"GET /v1/j HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfeODDAUTHSECRET\r\n\r\n"
        )
        assert await _raw(port, odd) == 401
        odd_key = (
            b"GET /v1/m HTTP/1.1\r\nHost: x\r\nX-API-Key: gk_0123456789ab_\xffODDAUTHSECRET\r\n\r\n"
        )
        assert await _raw(port, odd_key) == 401
        assert (
            await _raw(port, b"GET /v1/k HTTP/1.1\r\nHost: x\r\nX: a\x01RAWSECRET\r\n\r\n") == 400
        )
        assert await _raw(port, b"RAWLINESECRET /x HTTP/1.1\r\nHost: x\r\n\r\n") == 400
        ctl = b"GET /v1/l HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\x00ODDAUTHSECRET\r\n\r\n"
        assert await _raw(port, ctl) == 400
    finally:
        assert await asyncio.to_thread(gateway.stop) == 0
    out = stdout.read_text()
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(set(line) == FIELDS for line in lines), lines
    by_path = {line["path"]: line for line in lines}
    first = by_path["/v1/a"]  # the query string is not logged
    assert first["traceparent"] == TRACEPARENT and first["tenant"] == "acme"
    assert (first["route"], first["method"], first["status"]) == ("api", "GET", 200)
    assert (first["decision"], first["client"], first["bytes_in"]) == ("forwarded", "127.0.0.1", 0)
    assert first["upstream_ms"] > 0 and first["quota_ms"] > 0
    assert first["total_ms"] >= first["upstream_ms"] + first["quota_ms"]
    assert first["bytes_out"] > 0 and re.fullmatch(r"[0-9a-f]{32}", first["request_id"])
    assert by_path["/v1/b"]["bytes_in"] == 10
    decisions = [(line["path"], line["status"], line["decision"], line["tenant"]) for line in lines]
    assert decisions == [
        ("/v1/a", 200, "forwarded", "acme"),
        ("/v1/b", 200, "forwarded", "acme"),
        ("/v1/c", 200, "forwarded", "acme"),
        ("/v1/c", 200, "idempotent-replay", "acme"),
        ("/v1/d", 200, "forwarded", "acme"),
        ("/v1/e", 402, "quota-exhausted", "acme"),
        ("/v1/f", 401, "unauthenticated", None),
        ("/v1/g", 401, "unauthenticated", None),
        ("/v1/h", 401, "unauthenticated", None),
        ("/nowhere", 404, "no-route", None),
        ("/open/i", 200, "forwarded", None),
        ("/v1/j", 401, "unauthenticated", None),
        ("/v1/m", 401, "unauthenticated", None),
    ]
    assert by_path["/v1/e"]["upstream_ms"] is None and by_path["/v1/e"]["quota_ms"] > 0
    # No quota to check: on a route without one, before authentication, on a replay.
    assert by_path["/open/i"]["quota_ms"] is None and by_path["/v1/f"]["quota_ms"] is None
    assert [line["quota_ms"] for line in lines if line["path"] == "/v1/c"][1] is None
    logged = out + "".join(gateway.log_lines)
    assert [json.loads(line) for line in gateway.log_lines]  # stderr is JSON too
    found = {name for name, secret in secrets.items() if secret in logged}
    assert found == set(), found
    assert "\\u00ff" not in logged and "\\xff" not in logged  # no raw byte, even escaped


def _request(target: str, headers: dict[str, str] | None = None) -> Request:
    return Request(
        "GET", target, (1, 1), CIMultiDictProxy(CIMultiDict(headers or {})), "10.0.0.9",
        "http", None, False, cast(Connection, None),
    )  # fmt: skip


def test_client_strings_are_escaped_into_valid_json() -> None:
    stream = io.StringIO()
    log = AccessLog(LineBuffer(stream), trusted=TrustedProxies([]), clock=lambda: 1.5)
    outcome = Outcome()
    outcome.tenant = 'ten"ant\\'
    path = '/a"b\\c\u00e9\udcff\x7f/%0A'
    trace = 'x"\\\x01' + "y" * 100
    log.write(_request(path + "?q=1", {"traceparent": trace}), "r1", "api", Response(200),
              outcome, 0.0015)  # fmt: skip
    log.flush()
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    parsed = json.loads(line)
    assert (parsed["path"], parsed["tenant"]) == (path, 'ten"ant\\')
    assert (parsed["traceparent"], parsed["ts"], parsed["total_ms"]) == (
        trace[:64], "1970-01-01T00:00:01.500Z", 1.5,
    )  # fmt: skip


def test_the_client_behind_a_trusted_proxy_is_the_forwarded_one() -> None:
    from ipaddress import ip_network

    stream = io.StringIO()
    log = AccessLog(LineBuffer(stream), trusted=TrustedProxies([ip_network("10.0.0.0/8")]))
    request = _request("/", {"X-Forwarded-For": '203.0.113.7, "evil'})
    log.write(request, "r1", "api", Response(200), Outcome(), 0.001)
    log.flush()
    assert json.loads(stream.getvalue())["client"] == '"evil'  # what the proxy reported, quoted


async def test_text_format_and_the_off_switch(
    make_gateway: MakeGateway, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    text = await make_gateway(gateway_config(upstream.url, logging={"format": "text"}))
    off = await make_gateway(gateway_config(upstream.url, logging={"access_log": False}))
    assert ACCESS_LOG not in off.app  # type: ignore[operator]
    async with aiohttp.ClientSession() as client:
        for gateway in (text, off):
            url = f"http://127.0.0.1:{gateway.port}/download?bytes=200000&chunked=1"
            async with client.get(url, headers={"traceparent": TRACEPARENT}) as resp:
                assert len(await resp.read()) == 200_000
    assert text.app is not None
    text.app[ACCESS_LOG].flush()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines  # the switched-off gateway wrote none
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO gateway\.access: \"127\.0\.0\.1\" GET "
        r"\"/download\" 200 forwarded route=all tenant=- request_id=[0-9a-f]{32} "
        rf"traceparent=\"{TRACEPARENT}\" quota_ms=- upstream_ms=[\d.]+ total_ms=[\d.]+ "
        r"bytes_in=0 bytes_out=200000",
        lines[0],
    ), lines[0]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_process_log_takes_the_configured_format(fmt: Literal["json", "text"]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure(LoggingConfig(format=fmt, level="warning"), stream)
        logging.getLogger("gateway.test").info("not at this level")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("gateway.test").exception('it "failed"\non two lines')
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    out = stream.getvalue()
    if fmt == "json":
        (line,) = out.splitlines()
        record = json.loads(line)
        assert {k: record[k] for k in ("level", "logger", "message")} == {
            "level": "error", "logger": "gateway.test", "message": 'it "failed"\non two lines',
        }  # fmt: skip
        assert record["exc"].endswith("ValueError: boom")
    else:
        first = out.splitlines()[0]
        assert re.fullmatch(r"\S+Z ERROR gateway\.test: it \"failed\"", first), first
        assert out.rstrip().endswith("ValueError: boom")
