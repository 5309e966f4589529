"""The console's login, logout and tenants table."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.clock import EPOCH, utc_now
from gateway.console.common import (
    SESSIONS,
    THROTTLE,
    client_address,
    quota_of,
    render,
    runtime_of,
    see_other,
    services_of,
)
from gateway.console.session import COOKIE
from gateway.ledger.records import Tenant, credited_in
from gateway.ledger.tenant_search import TENANT_SORTS, TenantQuery, TenantSearch
from gateway.quota.engine import QuotaEngine
from gateway.quota.periods import Period, meter_period
from gateway.quota.policy import Policies
from gateway.quota.rules import credited, meter_state
from gateway.quota.store import StoreUnavailable
from gateway.quota.view import usage_view
from gateway.services import Services
from gateway.signals.crossings import ANOMALY, EXHAUSTION_FORECAST
from gateway.signals.store import SignalStore

PAGE_SIZE = 50
STATES = ("warning", "exhausted", "overage")
VIEW_CONCURRENCY = 16
# Usage older than this is in no current period (the longest is a month; "none" periods
# start at the epoch and are read apart).
ACTIVE_SINCE = timedelta(days=62)
STATUSES = ("active", "trialing", "past_due", "unpaid", "canceled", "paused", "incomplete",
            "incomplete_expired")  # fmt: skip


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html")


async def login(request: web.Request) -> web.StreamResponse:
    throttle = request.app[THROTTLE]
    address = client_address(request)
    wait_s = throttle.retry_after_s(address)
    if wait_s:
        response = render(
            request, "login.html", status=429,
            error=f"too many wrong tokens from your address; try again in {wait_s} s",
        )  # fmt: skip
        response.headers["Retry-After"] = str(wait_s)
        return response
    form = await request.post()
    given = form.get("token")
    sessions = request.app[SESSIONS]
    cookie = sessions.login(given if isinstance(given, str) else "")
    if cookie is None:
        throttle.failed(address)
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
    runtime = runtime_of(request)
    quota = quota_of(request, runtime)
    query, page = _query(request)
    state = request.query.get("state", "")
    offset = (page - 1) * PAGE_SIZE
    if state in STATES and quota is not None:
        total, found, views = await _in_state(services, quota, query, state, offset)
    else:
        state = ""
        total, found = await TenantSearch(services.ledger.db).page(query, offset, PAGE_SIZE)
        found = await services.ledger.with_credits(found)
        views = await views_of(quota, found) if quota is not None else []
    ids = [t.id for t in found]
    store = SignalStore(services.ledger.db)
    flags = await store.flags(ids, (ANOMALY, EXHAUSTION_FORECAST), utc_now()) if ids else {}
    config = runtime.config
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
        statuses=STATUSES, sorts=TENANT_SORTS, states=STATES, state=state,
    )  # fmt: skip


async def views_of(
    quota: tuple[QuotaEngine, Policies], tenants: list[Tenant]
) -> list[dict[str, Any]]:
    """The usage views of many tenants, a few at a time: the counter store's timeout is
    set for the request path, where calls come spread out, not all at once."""
    slots = asyncio.Semaphore(VIEW_CONCURRENCY)

    async def one(tenant: Tenant) -> dict[str, Any]:
        async with slots:
            try:
                return await usage_view(*quota, tenant)
            except StoreUnavailable:  # a timeout on a busy loop: once more, then a 503
                return await usage_view(*quota, tenant)

    return list(await asyncio.gather(*(one(t) for t in tenants)))


async def _in_state(
    services: Services,
    quota: tuple[QuotaEngine, Policies],
    query: TenantQuery,
    state: str,
    offset: int,
) -> tuple[int, list[Tenant], list[dict[str, Any]]]:
    """The page of tenants with a meter in `state`, judged by the ledger's totals of the
    current periods (seconds behind the counters, which the page's bars show): only a
    tenant with usage can be past a threshold, and reading the ledger's usage of every
    tenant the query selects in one statement is what lets this filter run over all."""
    engine, policies = quota
    now = engine.clock()
    usage = await TenantSearch(services.ledger.db).usage(query, now - ACTIVE_SINCE)
    credits = await services.ledger.current_credits(now)
    periods: dict[tuple[str, datetime | None], Period | None] = {}  # most share an anchor
    matches: list[str] = []
    for row in usage:
        if matches and matches[-1] == row.tenant_id:
            continue  # this tenant is in already (its rows come together)
        spec = policies.meters.get(row.meter)
        if spec is None:
            continue  # a meter the config no longer has
        key = (row.meter, row.billing_anchor)
        if key not in periods:
            periods[key] = meter_period(spec, now, row.billing_anchor)
        period = periods[key]
        if row.period_start != (period.start if period else EPOCH):
            continue  # an earlier period's total
        limit = policies.limit_of(row.plan, row.overrides, row.meter)
        if period is not None and row.tenant_id in credits:
            credit = credited_in(credits[row.tenant_id], row.meter, period.start)
            limit = credited(limit, credit)
        if meter_state(limit, row.quantity) == state:
            matches.append(row.tenant_id)
    ids = matches[offset : offset + PAGE_SIZE]
    page = await services.ledger.with_credits(await TenantSearch(services.ledger.db).tenants(ids))
    return len(matches), page, await views_of(quota, page)
