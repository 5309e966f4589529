"""The usage console: a session from the admin token, CSRF on every change, security
headers, the tenants table's figures, a tenant page's actions; in a real browser
(Debian's chromium driven by Playwright, no browser download) and over plain HTTP."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import async_playwright

from gateway.app import QUOTA
from gateway.clock import to_us
from gateway.ledger.events import UsageEvent
from gateway.ledger.store import Ledger
from gateway.ledger.usage_ledger import UsageLedger
from gateway.server import Gateway
from gateway.signals.refusals import RefusalTally
from tests.conftest import gateway_config
from tests.test_auth_gateway import ADMIN_TOKEN, admin
from tests.upstream import Upstream

CHROMIUM = shutil.which("chromium")
PAGE_SIZE = 50
# Screenshots of each run; the README's copies come from one of them.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
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


def seeded_usage(i: int) -> int:
    """What tenant i has used this month before the gateway starts: free tenants (odd,
    limit 10) spread over 0 to 11, pro ones (even, limit 1000) over 0 to 1099."""
    return i % 12 if i % 2 else (i * 37) % 1100


def exhausted() -> set[str]:
    return {f"t{i:04d}" for i in range(TENANTS) if seeded_usage(i) >= (10 if i % 2 else 1000)}


async def seed(url: str, hours_of: str = "t0008") -> None:
    """The month's usage of every tenant, in the ledger the gateway restores its counters
    from; `hours_of` used an hour at a time over the last 30 hours (one point each)."""
    ledger = await Ledger.open(url)
    try:
        await ledger.migrate()
        now = datetime.now(UTC)
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        events = [
            UsageEvent(f"seed-{i}", f"t{i:04d}", "api_calls", seeded_usage(i), to_us(now),
                       to_us(month), "charge")
            for i in range(TENANTS) if seeded_usage(i) and f"t{i:04d}" != hours_of
        ]  # fmt: skip
        hours = [now - timedelta(hours=h) for h in range(30)]
        events += [
            UsageEvent(f"hour-{h}", hours_of, "api_calls", 1, to_us(at), to_us(month), "charge")
            for h, at in enumerate(hours) if at >= month
        ]  # fmt: skip
        await UsageLedger(ledger.db).write(events)
    finally:
        await ledger.close()


@pytest.fixture
async def console(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gateway: Any
) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    await seed(f"sqlite:///{tmp_path / 'ledger.db'}")
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


async def logged_in(gateway: Gateway, source: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A session logged in from the `source` address (the login throttle counts by it)."""
    client = aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        connector=aiohttp.TCPConnector(local_addr=(source, 0)),
    )
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
        for _ in range(4):
            async with anonymous.post(f"{base}/login", data={"token": "wrong"}) as r:
                assert r.status == 401
        async with anonymous.post(f"{base}/login", data={"token": ADMIN_TOKEN}) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) > 0  # even the right one
    client = await logged_in(console, "127.0.0.2")
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
        row = page.split('data-tenant="t0009"')[1].split("</tr>")[0]
        assert 'data-meter="api_calls" data-state="warning"' in row  # 9 of 10
        assert '<span class="used">9</span> / <span class="limit">10</span>' in row
        found: list[str] = []
        for number in (1, 2, 3):
            async with client.get(base, params={"state": "exhausted", "page": str(number)}) as r:
                found += re.findall(r'data-tenant="([^"]+)"', await r.text())
        assert sorted(found) == sorted(exhausted()) and len(found) > PAGE_SIZE
        async with client.get(base, params={"sort": "id", "desc": "1", "page": "20"}) as r:
            page = await r.text()
        assert re.findall(r'data-tenant="([^"]+)"', page)[-1] == "t0000"


async def proxied(gateway: Gateway, key: str) -> int:
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{gateway.port}/v1/x"
        async with client.get(url, headers={"X-API-Key": key}) as r:
            return r.status


async def test_in_a_browser_figures_bars_charts_and_actions(console: Gateway) -> None:
    assert CHROMIUM is not None, "scripts/test installs Debian's chromium"
    ARTIFACTS.mkdir(exist_ok=True)
    base = f"http://127.0.0.1:{console.admin_port}/console"
    _, created = await admin(console, "POST", "/admin/tenants/t0011/api-keys", {})
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            await page.goto(f"{base}/tenants")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("form.login button")
            await page.wait_for_url(f"{base}/tenants")
            # A sample of tenants shows what the counters hold.
            for tenant, used, state in (
                ("t0001", "1", "ok"),
                ("t0009", "9", "warning"),
                ("t0011", "11", "exhausted"),
                ("t0002", "74", "ok"),
            ):
                bar = page.locator(f'tr[data-tenant="{tenant}"] [data-meter="api_calls"]')
                assert await bar.get_attribute("data-state") == state, tenant
                assert await bar.locator(".used").inner_text() == used, tenant
            await calls(console, "t0001", 7)
            await page.reload()
            bar = page.locator('tr[data-tenant="t0001"] [data-meter="api_calls"]')
            assert await bar.get_attribute("data-state") == "warning"  # 8 of 10: past 80%
            assert await bar.locator(".used").inner_text() == "8"
            await page.screenshot(path=str(ARTIFACTS / "console-tenants.png"))
            # One point per hour of recorded usage, and the limit.
            async with page.expect_response(lambda r: "usage.json" in r.url) as answer:
                await page.goto(f"{base}/tenants/t0008")
            chart = await (await answer.value).json()
            assert len(chart["periods"][1]["points"]) == hours_this_month(30)
            assert chart["limit"] == 1000
            await page.locator(".chart canvas").first.wait_for()
            await page.screenshot(path=str(ARTIFACTS / "console-tenant.png"), full_page=True)
            # A plan change reaches the tenant and the next proxied request.
            assert await proxied(console, created["key"]) == 402
            assert await proxied(console, created["key"]) == 402
            await console_refusals_flushed(console)
            await page.goto(f"{base}/tenants/t0011")
            refused = page.locator("table.refusals tbody tr").first
            assert await refused.locator("td.count").inner_text() == "2"  # the two 402s
            await page.select_option('form[action$="/actions/plan"] select', "pro")
            await page.click('form[action$="/actions/plan"] button')
            await page.locator(".done").wait_for()
            assert "plan set to pro" in await page.locator(".done").inner_text()
            _, tenant = await admin(console, "GET", "/admin/tenants/t0011")
            assert tenant["plan"] == "pro"
            assert await proxied(console, created["key"]) == 200
            bar = page.locator('.meter-detail [data-meter="api_calls"]')
            assert await bar.locator(".limit").inner_text() == "1,000"
            assert errors == []  # no CSP violation, no script error
            # A page of another site posts a form to the console: the session cookie
            # does not go with it (SameSite=Strict) and it has no CSRF token.
            evil = await forging_site(f"{base}/tenants/t0011/actions/plan")
            try:
                await page.goto(evil.url)
                await page.click("button")
                await page.wait_for_load_state()
                assert "/console/login" in page.url or "CSRF" in await page.content()
            finally:
                await evil.close()
            _, tenant = await admin(console, "GET", "/admin/tenants/t0011")
            assert tenant["plan"] == "pro"  # unchanged
        finally:
            await browser.close()


async def console_refusals_flushed(gateway: Gateway) -> None:
    """The refusal counts reach the ledger every few seconds; now, for the test."""
    engine = gateway.app[QUOTA] if gateway.app is not None else None
    assert engine is not None and isinstance(engine.refusals, RefusalTally)
    await engine.refusals.flush()


class Site:
    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self.runner, self.url = runner, url

    async def close(self) -> None:
        await self.runner.cleanup()


async def forging_site(action: str) -> Site:
    """Another origin (another port) serving a form that posts to the console."""
    html = (
        f'<form method="post" action="{action}"><input type="hidden" name="plan" '
        f'value="free"><button type="submit">win a prize</button></form>'
    )

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # 127.0.0.2: another site, not only another port (a cookie ignores ports).
    await web.TCPSite(runner, "127.0.0.2", 0).start()
    return Site(runner, f"http://127.0.0.2:{runner.addresses[0][1]}/")


def hours_this_month(hours: int) -> int:
    """How many of the last `hours` hours (the current one included) are in this month."""
    now = datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return sum(1 for h in range(hours) if now - timedelta(hours=h) >= month)
