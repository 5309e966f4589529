"""The admin API under /admin/: tenants and API keys, behind a bearer token."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.app import QUOTA, RUNTIME, SERVICES
from gateway.clock import iso_utc
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.ledger.usage_ledger import UsageLedger
from gateway.openapi import openapi_document
from gateway.problems import problem
from gateway.quota.engine import QuotaEngine
from gateway.quota.view import current_period, usage_view
from gateway.services import Services
from gateway.tenant_ops import (
    TenantChangeError,
    TenantOps,
    api_key_json,
    parse_changes,
    tenant_json,
)

ADMIN_TOKEN = web.AppKey("admin_token", str)
PUBLIC_APP = web.AppKey("public_app", web.Application)  # it owns the services


def _services(request: web.Request) -> Services:
    services = request.app[PUBLIC_APP].get(SERVICES)
    if services is None:
        raise web.HTTPNotFound(
            body=problem(
                404, "no-tenants",
                "this gateway keeps no tenants: configure auth.jwt or auth.api_keys",
            ).body,
            content_type="application/problem+json",
        )  # fmt: skip
    return services


def _ops(request: web.Request) -> TenantOps:
    services = _services(request)
    config = request.app[PUBLIC_APP][RUNTIME].config
    return TenantOps(config, services.ledger, services.bus)


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /admin/ path needs `Authorization: Bearer <token_env's value>`."""
    if not request.path.startswith("/admin/"):
        return await handler(request)
    expected = request.app.get(ADMIN_TOKEN)
    if not expected:
        return problem(403, "admin-disabled", "the admin token's environment variable is not set")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Bytes: compare_digest refuses non-ASCII str, and a 500 is not an answer.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        return problem(
            401, "unauthenticated", "the admin API needs the admin bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
        )  # fmt: skip
    return await handler(request)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            body=problem(400, "bad-json", "the body is not JSON").body,
            content_type="application/problem+json",
        ) from None


def _invalid(exc: TenantChangeError) -> web.Response:
    return problem(422, "invalid-change", str(exc))


async def list_tenants(request: web.Request) -> web.Response:
    """GET /admin/tenants?limit=&after="""
    services = _services(request)
    try:
        limit = min(int(request.query.get("limit", "100")), 1000)
    except ValueError:
        return problem(400, "bad-query", "limit must be an integer")
    tenants = await services.ledger.list_tenants(limit=limit, after=request.query.get("after"))
    following = tenants[-1].id if len(tenants) == limit else None
    return web.json_response({"tenants": [tenant_json(t) for t in tenants], "next": following})


async def get_tenant(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}"""
    tenant_id = request.match_info["id"]
    tenant = await _services(request).ledger.get_tenant(tenant_id)
    if tenant is None:
        return problem(404, "tenant-unknown", f"tenant {tenant_id!r} is not known")
    return web.json_response(tenant_json(tenant))


async def put_tenant(request: web.Request) -> web.Response:
    """PUT /admin/tenants/{id}: create, or change the fields given."""
    ops = _ops(request)
    try:
        tenant, created = await ops.put(
            request.match_info["id"], parse_changes(await _json(request))
        )
    except TenantChangeError as exc:
        return _invalid(exc)
    return web.json_response(tenant_json(tenant), status=201 if created else 200)


async def delete_tenant(request: web.Request) -> web.Response:
    """DELETE /admin/tenants/{id}: disables the tenant."""
    tenant_id = request.match_info["id"]
    tenant = await _ops(request).disable(tenant_id)
    if tenant is None:
        return problem(404, "tenant-unknown", f"tenant {tenant_id!r} is not known")
    return web.json_response(tenant_json(tenant))


async def create_api_key(request: web.Request) -> web.Response:
    """POST /admin/tenants/{id}/api-keys -> {key} (shown once)."""
    tenant_id = request.match_info["id"]
    body = await _json(request) if request.can_read_body else {}
    name = body.get("name") if isinstance(body, dict) else None
    if name is not None and not isinstance(name, str):
        return problem(422, "invalid-change", "name: expected a string")
    created = await _ops(request).create_key(tenant_id, name)
    if created is None:
        return problem(404, "tenant-unknown", f"tenant {tenant_id!r} is not known")
    key, record = created
    return web.json_response({"key": key, **api_key_json(record)}, status=201)


async def list_api_keys(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}/api-keys"""
    keys = await _services(request).ledger.list_api_keys(request.match_info["id"])
    return web.json_response({"api_keys": [api_key_json(k) for k in keys]})


async def revoke_api_key(request: web.Request) -> web.Response:
    """DELETE /admin/api-keys/{prefix}"""
    prefix = request.match_info["prefix"]
    if not await _ops(request).revoke_key(prefix):
        return problem(404, "api-key-unknown", f"no active API key has prefix {prefix!r}")
    return web.json_response({"prefix": prefix, "revoked": True})


def _engine(request: web.Request) -> QuotaEngine:
    engine = request.app[PUBLIC_APP].get(QUOTA)
    if engine is None:
        raise web.HTTPNotFound(
            body=problem(404, "no-quotas", "no route charges and no plan rate-limits").body,
            content_type="application/problem+json",
        )
    return engine


async def _tenant_and_meter(request: web.Request) -> tuple[Tenant, str] | web.Response:
    tenant_id, meter = request.match_info["id"], request.match_info.get("meter", "")
    tenant = await _services(request).ledger.get_tenant(tenant_id)
    if tenant is None:
        return problem(404, "tenant-unknown", f"tenant {tenant_id!r} is not known")
    if meter and meter not in _engine(request).config.meters:
        return problem(404, "meter-unknown", f"meter {meter!r} is not in the config")
    return tenant, meter


async def get_usage(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}/usage"""
    found = await _tenant_and_meter(request)
    if isinstance(found, web.Response):
        return found
    ledger = UsageLedger(_services(request).ledger.db)
    return web.json_response(await usage_view(_engine(request), found[0], ledger))


HISTORY_MAX = timedelta(days=93)


async def get_hourly(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}/usage/{meter}/hourly?since=&until= (ISO 8601; default 24 h)"""
    found = await _tenant_and_meter(request)
    if isinstance(found, web.Response):
        return found
    tenant, meter = found
    now = datetime.now(UTC)
    try:
        until = _instant(request.query.get("until")) or now
        since = _instant(request.query.get("since")) or until - timedelta(hours=24)
    except ValueError as exc:
        return problem(400, "bad-query", str(exc))
    if not since < until or until - since > HISTORY_MAX:
        return problem(400, "bad-query", "since must be before until, at most 93 days apart")
    ledger = UsageLedger(_services(request).ledger.db)
    hours = await ledger.hourly(tenant.id, meter, since, until)
    return web.json_response(
        {
            "tenant": tenant.id,
            "meter": meter,
            "since": iso_utc(since),
            "until": iso_utc(until),
            "hours": [{"hour": iso_utc(h), "quantity": q, "events": n} for h, q, n in hours],
        }
    )


def _instant(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return moment.astimezone(UTC)


async def put_gauge(request: web.Request) -> web.Response:
    """PUT /admin/tenants/{id}/gauges/{meter} {"value": N}"""
    found = await _tenant_and_meter(request)
    if isinstance(found, web.Response):
        return found
    tenant, meter = found
    engine = _engine(request)
    if engine.config.meters[meter].type != "gauge":
        return problem(422, "invalid-change", f"{meter} is a counter; reset it instead")
    body = await _json(request)
    value = body.get("value") if isinstance(body, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return problem(422, "invalid-change", "value: expected a non-negative integer")
    await engine.store.set_level(tenant.id, meter, None, value, _admin_context(request))
    return web.json_response(await usage_view(engine, tenant))


def _admin_context(request: web.Request) -> EventContext:
    """The usage events of an admin change: route `_admin`, the admin request's method."""
    return EventContext("_admin", request.method, request.headers.get("X-Request-Id", ""))


async def reset_meter(request: web.Request) -> web.Response:
    """POST /admin/tenants/{id}/meters/{meter}/reset: the current period starts again from 0."""
    found = await _tenant_and_meter(request)
    if isinstance(found, web.Response):
        return found
    tenant, meter = found
    engine = _engine(request)
    period = current_period(engine, tenant, meter)
    await engine.store.set_level(tenant.id, meter, period, 0, _admin_context(request))
    return web.json_response(await usage_view(engine, tenant))


async def add_credit(request: web.Request) -> web.Response:
    """POST /admin/tenants/{id}/credits {"meter": M, "quantity": N}: this period's quota + N."""
    tenant_id = request.match_info["id"]
    body = await _json(request)
    meter = body.get("meter") if isinstance(body, dict) else None
    quantity = body.get("quantity") if isinstance(body, dict) else None
    if not isinstance(meter, str):
        return problem(422, "invalid-change", "meter: expected a meter name")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity == 0:
        return problem(422, "invalid-change", "quantity: expected a non-zero integer")
    try:
        credit = await _ops(request).credit(tenant_id, meter, quantity)
    except TenantChangeError as exc:
        return _invalid(exc)
    if credit is None:
        return problem(404, "tenant-unknown", f"tenant {tenant_id!r} is not known")
    tenant = await _services(request).ledger.get_tenant(tenant_id)
    assert tenant is not None
    return web.json_response(
        {
            "tenant": tenant_id,
            "meter": meter,
            "quantity": quantity,
            "period": {"start": iso_utc(credit.period_start), "end": iso_utc(credit.period_end)},
            "credited": tenant.credited(meter, credit.period_start),
        },
        status=201,
    )


async def openapi(request: web.Request) -> web.Response:
    """GET /admin/openapi.json"""
    return web.json_response(openapi_document())


def add_admin_routes(app: web.Application) -> None:
    """The /admin/ routes on the admin application."""
    app.router.add_get("/admin/tenants", list_tenants)
    app.router.add_get("/admin/tenants/{id}", get_tenant)
    app.router.add_put("/admin/tenants/{id}", put_tenant)
    app.router.add_delete("/admin/tenants/{id}", delete_tenant)
    app.router.add_post("/admin/tenants/{id}/api-keys", create_api_key)
    app.router.add_get("/admin/tenants/{id}/api-keys", list_api_keys)
    app.router.add_delete("/admin/api-keys/{prefix}", revoke_api_key)
    app.router.add_get("/admin/tenants/{id}/usage", get_usage)
    app.router.add_get("/admin/tenants/{id}/usage/{meter}/hourly", get_hourly)
    app.router.add_put("/admin/tenants/{id}/gauges/{meter}", put_gauge)
    app.router.add_post("/admin/tenants/{id}/meters/{meter}/reset", reset_meter)
    app.router.add_post("/admin/tenants/{id}/credits", add_credit)
    app.router.add_get("/admin/openapi.json", openapi)
