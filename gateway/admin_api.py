"""The admin API under /admin/: tenants and API keys, behind a bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import admin_signals
from gateway.app import QUOTA, RUNTIME, SERVICES
from gateway.clock import iso_utc
from gateway.config.types import MAX_QUANTITY
from gateway.headers import request_id
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.ledger.usage_ledger import UsageLedger
from gateway.openapi import openapi_document
from gateway.problems import Refused, web_answer
from gateway.quota.engine import QuotaEngine
from gateway.quota.view import reset_meter as reset_meter_now
from gateway.quota.view import set_gauge, usage_view
from gateway.services import Services
from gateway.signals.store import SignalStore
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
        raise Refused(
            404, "no-tenants", "this gateway keeps no tenants: configure auth.jwt or auth.api_keys"
        )
    return services


def _ops(request: web.Request) -> TenantOps:
    services = _services(request)
    config = request.app[PUBLIC_APP][RUNTIME].config
    return TenantOps(config, services.ledger, services.bus)


@web.middleware
async def answer_refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin listener's one adapter: refusals become problem+json with X-Request-Id."""
    rid = request_id(request.headers)
    try:
        response = await handler(request)
    except Refused as refused:
        return web_answer(refused, rid)
    except TenantChangeError as exc:
        return web_answer(Refused(422, "invalid-change", str(exc)), rid)
    except web.HTTPException as exc:  # aiohttp's own: no route (404), wrong method (405), ...
        if exc.status < 400:
            raise
        kind = HTTPStatus(exc.status).phrase.lower().replace(" ", "-")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web_answer(Refused(exc.status, kind, exc.reason, headers=allow), rid)
    response.headers.setdefault("X-Request-Id", rid)
    return response


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /admin/ path needs `Authorization: Bearer <token_env's value>`."""
    if not request.path.startswith("/admin/"):
        return await handler(request)
    expected = request.app.get(ADMIN_TOKEN)
    if not expected:
        raise Refused(403, "admin-disabled", "the admin token's environment variable is not set")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Bytes: compare_digest refuses non-ASCII str, and a 500 is not an answer; header
    # bytes that are not UTF-8 arrive as surrogates, which only this encoding takes.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        raise Refused(
            401, "unauthenticated", "the admin API needs the admin bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
        )  # fmt: skip
    return await handler(request)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise Refused(400, "bad-json", "the body is not JSON") from None


async def _object(request: web.Request) -> dict[str, Any]:
    """The JSON object in the body (none: {}); 422 for JSON that is not an object."""
    body = await _json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise Refused(422, "invalid-change", "body: expected a JSON object")
    return body


def _quantity(value: object, name: str, low: int) -> int:
    """`value` as an integer from `low` to MAX_QUANTITY: 422 for another type, 400 out of
    range (the stores hold int64, the scripts' doubles are exact to 2**53)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(422, "invalid-change", f"{name}: expected an integer")
    if not low <= value <= MAX_QUANTITY:
        raise Refused(
            400, "out-of-range", f"{name}: expected an integer from {low} to {MAX_QUANTITY}"
        )
    return value


def _unknown_tenant(tenant_id: str) -> Refused:
    return Refused(404, "tenant-unknown", f"tenant {tenant_id!r} is not known")


async def list_tenants(request: web.Request) -> web.Response:
    """GET /admin/tenants?limit=&after="""
    services = _services(request)
    limit = admin_signals.query_limit(request)
    tenants = await services.ledger.list_tenants(limit=limit, after=request.query.get("after"))
    following = tenants[-1].id if len(tenants) == limit else None
    return web.json_response({"tenants": [tenant_json(t) for t in tenants], "next": following})


async def get_tenant(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}"""
    tenant_id = request.match_info["id"]
    tenant = await _services(request).ledger.get_tenant(tenant_id)
    if tenant is None:
        raise _unknown_tenant(tenant_id)
    return web.json_response(tenant_json(tenant))


async def put_tenant(request: web.Request) -> web.Response:
    """PUT /admin/tenants/{id}: create, or change the fields given."""
    ops = _ops(request)
    tenant, created = await ops.put(request.match_info["id"], parse_changes(await _json(request)))
    return web.json_response(tenant_json(tenant), status=201 if created else 200)


async def delete_tenant(request: web.Request) -> web.Response:
    """DELETE /admin/tenants/{id}: disables the tenant."""
    tenant_id = request.match_info["id"]
    tenant = await _ops(request).disable(tenant_id)
    if tenant is None:
        raise _unknown_tenant(tenant_id)
    return web.json_response(tenant_json(tenant))


async def create_api_key(request: web.Request) -> web.Response:
    """POST /admin/tenants/{id}/api-keys -> {key} (shown once)."""
    tenant_id = request.match_info["id"]
    name = (await _object(request)).get("name")
    if name is not None and not isinstance(name, str):
        raise Refused(422, "invalid-change", "name: expected a string")
    created = await _ops(request).create_key(tenant_id, name)
    if created is None:
        raise _unknown_tenant(tenant_id)
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
        raise Refused(404, "api-key-unknown", f"no active API key has prefix {prefix!r}")
    return web.json_response({"prefix": prefix, "revoked": True})


def _engine(request: web.Request) -> QuotaEngine:
    engine = request.app[PUBLIC_APP].get(QUOTA)
    if engine is None:
        raise Refused(404, "no-quotas", "no route charges and no plan rate-limits")
    return engine


async def _tenant_and_meter(request: web.Request) -> tuple[Tenant, str]:
    tenant_id, meter = request.match_info["id"], request.match_info.get("meter", "")
    tenant = await _services(request).ledger.get_tenant(tenant_id)
    if tenant is None:
        raise _unknown_tenant(tenant_id)
    if meter and meter not in _engine(request).config.meters:
        raise Refused(404, "meter-unknown", f"meter {meter!r} is not in the config")
    return tenant, meter


async def get_usage(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}/usage"""
    tenant, _ = await _tenant_and_meter(request)
    ledger = UsageLedger(_services(request).ledger.db)
    return web.json_response(await usage_view(_engine(request), tenant, ledger))


HISTORY_MAX = timedelta(days=93)
# The ledger's hours and partitions are computed around the range: keep it far
# from the calendar's edges (year 1 and 9999), where that arithmetic overflows.
HISTORY_FIRST = datetime(1970, 1, 1, tzinfo=UTC)
HISTORY_LAST = datetime(9999, 1, 1, tzinfo=UTC)


async def get_hourly(request: web.Request) -> web.Response:
    """GET /admin/tenants/{id}/usage/{meter}/hourly?since=&until= (ISO 8601; default 24 h)"""
    tenant, meter = await _tenant_and_meter(request)
    now = datetime.now(UTC)
    try:
        until = _instant(request.query.get("until")) or now
        since = _instant(request.query.get("since")) or until - timedelta(hours=24)
    except ValueError as exc:
        raise Refused(400, "bad-query", str(exc)) from None
    except OverflowError:  # until=0001-01-01T00:00:00Z: the default since is no date
        raise Refused(400, "bad-query", "until is at the calendar's start") from None
    if not HISTORY_FIRST <= since < until <= HISTORY_LAST or until - since > HISTORY_MAX:
        raise Refused(
            400, "bad-query",
            "since must be before until, at most 93 days apart, both in 1970 to 9998",
        )  # fmt: skip
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
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:30+01:00 is before the calendar's start
        raise ValueError(f"{value!r} is outside the calendar") from None


async def put_gauge(request: web.Request) -> web.Response:
    """PUT /admin/tenants/{id}/gauges/{meter} {"value": N}"""
    tenant, meter = await _tenant_and_meter(request)
    engine = _engine(request)
    value = _quantity((await _object(request)).get("value"), "value", 0)
    try:
        await set_gauge(engine, tenant, meter, value, _admin_context(request))
    except ValueError as exc:
        raise Refused(422, "invalid-change", str(exc)) from None
    return web.json_response(await usage_view(engine, tenant))


def _admin_context(request: web.Request) -> EventContext:
    """The usage events of an admin change: route `_admin`, the admin request's method."""
    return EventContext("_admin", request.method, request.headers.get("X-Request-Id", ""))


async def reset_meter(request: web.Request) -> web.Response:
    """POST /admin/tenants/{id}/meters/{meter}/reset: the current period starts again from 0."""
    tenant, meter = await _tenant_and_meter(request)
    engine = _engine(request)
    await reset_meter_now(engine, tenant, meter, _admin_context(request))
    return web.json_response(await usage_view(engine, tenant))


async def add_credit(request: web.Request) -> web.Response:
    """POST /admin/tenants/{id}/credits {"meter": M, "quantity": N}: this period's quota + N."""
    tenant_id = request.match_info["id"]
    body = await _object(request)
    meter = body.get("meter")
    if not isinstance(meter, str):
        raise Refused(422, "invalid-change", "meter: expected a meter name")
    quantity = _quantity(body.get("quantity"), "quantity", -MAX_QUANTITY)
    if quantity == 0:
        raise Refused(422, "invalid-change", "quantity: expected a non-zero integer")
    credit = await _ops(request).credit(tenant_id, meter, quantity)
    if credit is None:
        raise _unknown_tenant(tenant_id)
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
    app.router.add_get("/admin/anomalies", _on_signals(admin_signals.list_anomalies))
    app.router.add_get("/admin/notifications", _on_signals(admin_signals.list_notifications))
    app.router.add_post("/admin/notifications/{signal}/requeue", _on_signals(admin_signals.requeue))
    app.router.add_get("/admin/openapi.json", openapi)


def _on_signals(
    handler: Callable[[web.Request, SignalStore], Awaitable[dict[str, Any]]],
) -> Handler:
    async def on_signals(request: web.Request) -> web.StreamResponse:
        store = SignalStore(_services(request).ledger.db)
        return web.json_response(await handler(request, store))

    return on_signals
