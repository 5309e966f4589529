"""The admin listener: health, readiness and metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.admin_api import (
    ADMIN_TOKEN,
    PUBLIC_APP,
    add_admin_routes,
    answer_refusals,
    known_query,
    require_token,
)
from gateway.console.mount import setup_console
from gateway.headers import own_headers
from gateway.merged_metrics import encode


class Readiness:
    """Whether this process should receive traffic; false while it drains."""

    def __init__(self) -> None:
        self.ready = False


READINESS = web.AppKey("readiness", Readiness)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: listening and not draining."""
    if request.app[READINESS].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's registry, rendered in a thread: with many
    routes or tenants it takes a second, which would hold every request on this loop."""
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metric_samples(request: web.Request) -> web.Response:
    """The registry as JSON, for the supervisor to merge (gateway.merged_metrics); in a
    thread, as `metrics`."""
    body = await asyncio.to_thread(encode, request.app[REGISTRY])
    return web.Response(body=body, content_type="application/json")


def create_admin_app(
    registry: CollectorRegistry,
    readiness: Readiness,
    public_app: web.Application,
    token: str | None,
) -> web.Application:
    """The admin application; its metrics come from `registry`, tenants from `public_app`."""
    app = web.Application(middlewares=[answer_refusals, require_token, known_query])
    app.on_response_prepare.append(own_headers)
    app[REGISTRY] = registry
    app[READINESS] = readiness
    app[PUBLIC_APP] = public_app
    if token:
        app[ADMIN_TOKEN] = token
    add_admin_routes(app)
    setup_console(app, public_app, token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def create_metrics_app(registry: CollectorRegistry, readiness: Readiness) -> web.Application:
    """The metrics listener (`metrics.port`): what Prometheus and probes read, nothing else."""
    app = web.Application()
    app.on_response_prepare.append(own_headers)
    app[REGISTRY] = registry
    app[READINESS] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
