"""The usage console: a session from the admin token, CSRF on every change, security
headers, the tenants table's figures, a tenant page's actions; in a real browser
(Debian's chromium driven by Playwright, no browser download) and over plain HTTP."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright

from gateway.server import Gateway
from tests.conftest import gateway_config
from tests.test_auth_gateway import ADMIN_TOKEN, admin
from tests.upstream import Upstream

CHROMIUM = shutil.which("chromium")
TENANTS = 1000


def console_config(upstream: Upstream, tmp_path: Path) -> dict[str, Any]:
    return gateway_config(
        upstream.url,
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
        auth={"api_keys": {"enabled": True}},
        meters={"api_calls": {"type": "counter", "period": "month"},
                "seats": {"type": "gauge"}},
        plans={
            "free": {"limits": {"api_calls": {"limit": 10, "warn_at": [0.8]},
                                "seats": {"limit": 3}}},
            "pro": {"limits": {"api_calls": {"limit": 1000, "warn_at": [0.8]},
                               "seats": {"limit": 50}}},
        },
        tenants=[{"id": f"t{i:04d}", "plan": "free" if i % 2 else "pro",
                  "stripe_customer": f"cus_{i:04d}"} for i in range(TENANTS)],
        routes=[{"name": "api", "match": {"path": "/v1/**"}, "upstream": "app",
                 "charge": {"api_calls": 1}}],
    )  # fmt: skip


@pytest.fixture
async def console(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gateway: Any
) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    yield await make_gateway(console_config(upstream, tmp_path))


async def calls(gateway: Gateway, tenant: str, n: int) -> None:
    """`n` metered requests of `tenant` through the proxy, all served."""
    status, created = await admin(gateway, "POST", f"/admin/tenants/{tenant}/api-keys", {})
    assert status == 201, created
    async with aiohttp.ClientSession() as client:
        for _ in range(n):
            async with client.get(
                f"http://127.0.0.1:{gateway.port}/v1/x", headers={"X-API-Key": created["key"]}
            ) as r:
                assert r.status == 200


async def logged_in(gateway: Gateway) -> aiohttp.ClientSession:
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    url = f"http://127.0.0.1:{gateway.admin_port}/console/login"
    async with client.post(url, data={"token": ADMIN_TOKEN}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/console/tenants"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie
    return client


async def test_pages_need_a_session_and_changes_a_csrf_token(console: Gateway) -> None:
    base = f"http://127.0.0.1:{console.admin_port}/console"
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{base}/tenants", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/console/login"
        async with anonymous.post(f"{base}/login", data={"token": "wrong"}) as r:
            assert r.status == 401 and "wrong admin token" in await r.text()
            csp = r.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
    client = await logged_in(console)
    async with client:
        async with client.get(f"{base}/tenants/t0001") as r:
            assert r.status == 200
            page = await r.text()
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token is not None
        action = f"{base}/tenants/t0001/actions/plan"
        async with client.post(action, data={"plan": "pro"}) as r:
            assert r.status == 403  # no CSRF token
        async with client.post(action, data={"plan": "pro", "csrf": "forged"}) as r:
            assert r.status == 403
        status, tenant = await admin(console, "GET", "/admin/tenants/t0001")
        assert tenant["plan"] == "free"
        async with client.post(action, data={"plan": "pro", "csrf": token.group(1)}) as r:
            assert r.status == 200 and "plan set to pro" in await r.text()
        status, tenant = await admin(console, "GET", "/admin/tenants/t0001")
        assert tenant["plan"] == "pro"
        async with client.post(f"{base}/logout", data={"csrf": token.group(1)}) as r:
            assert r.status == 200  # back on the login form
        async with client.get(f"{base}/tenants", allow_redirects=False) as r:
            assert r.status == 303


async def test_the_table_pages_filters_and_shows_the_counters(console: Gateway) -> None:
    await calls(console, "t0003", 9)  # free: 9 of 10, past warn_at
    client = await logged_in(console)
    base = f"http://127.0.0.1:{console.admin_port}/console/tenants"
    async with client:
        async with client.get(base) as r:
            page = await r.text()
        assert f">{TENANTS:,}<" in page and "page 1 of 20" in page
        async with client.get(base, params={"plan": "free", "q": "T000"}) as r:
            page = await r.text()
        assert re.findall(r'data-tenant="([^"]+)"', page) == ["t0001", "t0003", "t0005", "t0007",
                                                              "t0009"]  # fmt: skip
        row = page.split('data-tenant="t0003"')[1].split("</tr>")[0]
        assert 'data-meter="api_calls" data-state="warning"' in row
        assert '<span class="used">9</span> / <span class="limit">10</span>' in row
        async with client.get(base, params={"sort": "id", "desc": "1", "page": "20"}) as r:
            page = await r.text()
        assert re.findall(r'data-tenant="([^"]+)"', page)[-1] == "t0000"


async def test_in_a_browser_a_bar_turns_to_warning_and_an_action_shows_its_result(
    console: Gateway, tmp_path: Path
) -> None:
    assert CHROMIUM is not None, "scripts/test installs Debian's chromium"
    base = f"http://127.0.0.1:{console.admin_port}/console"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            await page.goto(f"{base}/tenants")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("form.login button")
            await page.wait_for_url(f"{base}/tenants")
            # A sample of tenants shows the figures the counters hold.
            row = page.locator('tr[data-tenant="t0005"]')
            await row.locator('[data-meter="api_calls"]').wait_for()
            assert await row.locator('[data-meter="api_calls"]').get_attribute("data-state") == "ok"
            await calls(console, "t0005", 8)
            await page.reload()
            bar = page.locator('tr[data-tenant="t0005"] [data-meter="api_calls"]')
            assert await bar.get_attribute("data-state") == "warning"
            assert (await bar.locator(".used").inner_text()) == "8"
            await page.click('a[href="/console/tenants/t0005"]')
            await page.wait_for_url(f"{base}/tenants/t0005")
            await page.locator(".chart canvas").first.wait_for()  # the chart was drawn
            await page.fill('form[action$="/actions/credit"] input[name="quantity"]', "5")
            await page.click('form[action$="/actions/credit"] button')
            await page.locator(".done").wait_for()
            assert "api_calls credited +5" in await page.locator(".done").inner_text()
            bar = page.locator('.meter-detail [data-meter="api_calls"]')
            assert await bar.locator(".limit").inner_text() == "15"
            assert await bar.get_attribute("data-state") == "ok"  # 8 of 15
            await page.screenshot(path=str(tmp_path / "tenant.png"), full_page=True)
            assert errors == []  # no CSP violation, no script error
        finally:
            await browser.close()
