"""The console's tenant page: its meters and charts, notifications, API keys, and the
actions that change it (through the same operations as the admin API)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from gateway.app import RUNTIME
from gateway.clock import iso_utc, utc_now
from gateway.config.types import MAX_QUANTITY
from gateway.console.common import PUBLIC, engine_of, render, see_other, services_of
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.ledger.usage_ledger import UsageLedger
from gateway.quota.periods import meter_period
from gateway.quota.view import current_period, reset_meter, set_gauge, usage_view
from gateway.signals.anomaly import HOUR
from gateway.signals.refusals import recent_refusals
from gateway.signals.store import SignalStore
from gateway.tenant_ops import TenantChangeError, TenantOps, parse_changes

CONTEXT = EventContext("_console", "POST")  # the usage events of a console change


async def _tenant(request: web.Request) -> Tenant:
    tenant = await services_of(request).ledger.get_tenant(request.match_info["id"])
    if tenant is None:
        raise web.HTTPNotFound(text="no such tenant")
    return tenant


async def tenant_page(request: web.Request, **extra: Any) -> web.Response:
    """GET /console/tenants/{id}"""
    tenant = await _tenant(request)
    services = services_of(request)
    engine = engine_of(request)
    usage = (
        await usage_view(engine, tenant, UsageLedger(services.ledger.db), recorded=False)
        if engine is not None
        else None
    )
    store = SignalStore(services.ledger.db)
    config = request.app[PUBLIC][RUNTIME].config
    return render(
        request, "tenant.html", tenant=tenant, usage=usage,
        notifications=await store.recent(tenant.id, "", 20),
        refusals=await recent_refusals(services.ledger.db, tenant.id, utc_now()),
        keys=await services.ledger.list_api_keys(tenant.id),
        plans=sorted(config.plans), meters=config.meters,
        request_done=request.query.get("done", "")[:300], **extra,
    )  # fmt: skip


async def usage_json(request: web.Request) -> web.Response:
    """GET /console/tenants/{id}/usage.json?meter=: the chart of one counter: cumulative
    usage per hour over the previous and the current period, its limit, its forecast."""
    tenant = await _tenant(request)
    engine = engine_of(request)
    meter = request.query.get("meter", "")
    if engine is None or meter not in engine.config.meters:
        raise web.HTTPNotFound(text="no such meter")
    period = current_period(engine, tenant, meter)
    if period is None:
        raise web.HTTPNotFound(text="a gauge has no history chart")
    now = engine.clock()
    spec = engine.config.meters[meter]
    previous = meter_period(spec, period.start - timedelta(seconds=1), tenant.billing_anchor)
    assert previous is not None
    usage = UsageLedger(services_of(request).ledger.db)
    series: list[dict[str, Any]] = []
    for p in (previous, period):
        total = 0
        points = []
        for hour, quantity, _ in await usage.hourly(tenant.id, meter, p.start, min(p.end, now)):
            total += quantity
            # At the hour's end, or now for the hour under way.
            points.append([int(min(hour + HOUR, now).timestamp()), total])
        series.append({"start": iso_utc(p.start), "end": iso_utc(p.end), "points": points})
    view = await usage_view(engine, tenant, usage, recorded=False)
    item = view["meters"][meter]
    return web.json_response(
        {
            "meter": meter,
            "limit": item["limit"],
            "used": item["used"],
            "now": int(now.timestamp()),
            "periods": series,
            "forecast": item.get("forecast"),
        }
    )


async def act(request: web.Request) -> web.Response:
    """POST /console/tenants/{id}/actions/{action}: change the tenant, show the result."""
    tenant = await _tenant(request)
    form = await request.post()
    action = request.match_info["action"]
    field = {k: str(v) for k, v in form.items() if k != "csrf"}
    try:
        done = await _apply(request, tenant, action, field)
    except (TenantChangeError, ValueError) as exc:
        return await tenant_page(request, error=f"{action}: {exc}")
    if isinstance(done, str):
        page = f"/console/tenants/{quote(tenant.id, safe='')}"
        return see_other(f"{page}?{urlencode({'done': done})}")
    return await tenant_page(request, created_key=done)


async def _apply(
    request: web.Request, tenant: Tenant, action: str, field: dict[str, str]
) -> str | dict[str, str]:
    """What was done (a message), or the key just created (shown once, never stored)."""
    services = services_of(request)
    config = request.app[PUBLIC][RUNTIME].config
    ops = TenantOps(config, services.ledger, services.bus)
    if action in ("plan", "status"):
        await ops.put(tenant.id, parse_changes({action: field.get(action, "")}))
        return f"{action} set to {field.get(action)}"
    if action == "create-key":
        created = await ops.create_key(tenant.id, field.get("name") or None)
        assert created is not None
        key, record = created
        return {"key": key, "prefix": record.prefix}
    if action == "revoke-key":
        if not await ops.revoke_key(field.get("prefix", "")):
            raise ValueError("no active key with that prefix")
        return f"key {field.get('prefix')} revoked"
    engine = engine_of(request)
    meter = field.get("meter", "")
    if engine is None or meter not in config.meters:
        raise ValueError(f"unknown meter {meter!r}")
    if action == "credit":
        quantity = _number(field.get("quantity", ""), -MAX_QUANTITY)
        if quantity == 0 or await ops.credit(tenant.id, meter, quantity) is None:
            raise ValueError("expected a non-zero whole number")
        return f"{meter} credited {quantity:+d} this period"
    if action == "gauge":
        await set_gauge(engine, tenant, meter, _number(field.get("value", ""), 0), CONTEXT)
        return f"{meter} set to {field.get('value')}"
    if action == "reset":
        await reset_meter(engine, tenant, meter, CONTEXT)
        return f"{meter} reset for this period"
    raise ValueError("unknown action")


def _number(text: str, low: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not low <= value <= MAX_QUANTITY:
        raise ValueError(f"expected {low} to {MAX_QUANTITY}")
    return value


def add_routes(app: web.Application) -> None:
    app.router.add_get("/console/tenants/{id}", tenant_page)
    app.router.add_get("/console/tenants/{id}/usage.json", usage_json)
    app.router.add_post("/console/tenants/{id}/actions/{action}", act)
