"""The console's login, logout and tenants table."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.app import RUNTIME
from gateway.clock import utc_now
from gateway.console.common import (
    PUBLIC,
    SESSIONS,
    engine_of,
    render,
    see_other,
    services_of,
)
from gateway.console.session import COOKIE
from gateway.ledger.store import TENANT_SORTS, TenantQuery
from gateway.quota.view import usage_view
from gateway.signals.crossings import ANOMALY, EXHAUSTION_FORECAST
from gateway.signals.store import SignalStore

PAGE_SIZE = 50
STATUSES = ("active", "trialing", "past_due", "unpaid", "canceled", "paused", "incomplete",
            "incomplete_expired")  # fmt: skip


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html")


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    given = form.get("token")
    sessions = request.app[SESSIONS]
    cookie = sessions.login(given if isinstance(given, str) else "")
    if cookie is None:
        return render(request, "login.html", status=401, error="wrong admin token")
    response = see_other("/console/tenants")
    response.set_cookie(
        COOKIE, cookie, max_age=int(sessions.lifetime_s), httponly=True, samesite="Strict",
        secure=request.secure, path="/console",
    )  # fmt: skip
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response = see_other("/console/login")
    response.del_cookie(COOKIE, path="/console")
    return response


def _query(request: web.Request) -> tuple[TenantQuery, int]:
    q = request.query
    sort = q.get("sort", "id")
    try:
        page = max(1, min(100_000, int(q.get("page", "1"))))
    except ValueError:
        page = 1
    query = TenantQuery(
        plan=q.get("plan", "")[:200],
        status=q.get("status", "")[:50],
        text=q.get("q", "")[:200],
        sort=sort if sort in TENANT_SORTS else "id",
        descending=q.get("desc") == "1",
    )
    return query, page


async def tenants(request: web.Request) -> web.Response:
    """The tenants table: a page of tenants with their meters' bars."""
    services = services_of(request)
    engine = engine_of(request)
    query, page = _query(request)
    total, found = await services.ledger.search_tenants(query, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    views = await asyncio.gather(*(usage_view(engine, t) for t in found)) if engine else []
    ids = [t.id for t in found]
    store = SignalStore(services.ledger.db)
    flags = await store.flags(ids, (ANOMALY, EXHAUSTION_FORECAST), utc_now()) if ids else {}
    config = request.app[PUBLIC][RUNTIME].config
    rows = []
    for i, tenant in enumerate(found):
        rows.append(
            {
                "tenant": tenant,
                "meters": views[i]["meters"] if views else {},
                "period_end": views[i]["period"]["end"] if views else None,
                "anomaly": (tenant.id, ANOMALY) in flags,
                "forecast": flags.get((tenant.id, EXHAUSTION_FORECAST)),
            }
        )
    return render(
        request, "tenants.html", rows=rows, total=total, page=page, page_size=PAGE_SIZE,
        pages=max(1, -(-total // PAGE_SIZE)), query=query, plans=sorted(config.plans),
        statuses=STATUSES,
        sorts=TENANT_SORTS,
    )  # fmt: skip
