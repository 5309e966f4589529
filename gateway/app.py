"""The public listener's aiohttp application: route, then forward."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import websocket
from gateway.config.models import GatewayConfig
from gateway.headers import TrustedProxies, request_id
from gateway.metrics import GATEWAY, UNMATCHED, ProxyMetrics
from gateway.problems import problem
from gateway.proxy import ForwardContext, Forwarder, Upstreams
from gateway.routing import RESERVED_PREFIX, BadPath, Router, split_path


@dataclass(slots=True)
class Runtime:
    """Everything a request reads from the config, swapped as one on reload."""

    config: GatewayConfig
    router: Router
    forwarder: Forwarder
    upstreams: Upstreams

    @classmethod
    def build(cls, config: GatewayConfig, metrics: ProxyMetrics) -> Runtime:
        return cls(
            config=config,
            router=Router(config.routes),
            forwarder=Forwarder(TrustedProxies(config.server.trusted_proxies), metrics),
            upstreams=Upstreams(config.upstreams),
        )


RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", ProxyMetrics)


async def _dispatch(request: web.Request, rid: str) -> tuple[str, web.StreamResponse]:
    runtime = request.app[RUNTIME]
    config = runtime.config
    path = request.raw_path.split("?", 1)[0]
    if path.startswith(RESERVED_PREFIX):
        return GATEWAY, problem(404, "not-found", "no such gateway endpoint", request_id=rid)
    try:
        segments = split_path(path)
    except BadPath as exc:
        return UNMATCHED, problem(400, "bad-path", str(exc), request_id=rid)
    match = runtime.router.match(request.method, request.headers.get("Host", ""), segments)
    if match is None:
        return UNMATCHED, problem(404, "no-route", "no route matches this request", request_id=rid)
    route = match.route.config
    upstream = runtime.upstreams[route.upstream]
    drop = [config.auth.forward_tenant_header]
    if not upstream.config.forward_authorization:
        drop.append("Authorization")
    ctx = ForwardContext(
        route=route.name,
        request_id=rid,
        max_body_bytes=route.max_body_bytes
        if route.max_body_bytes is not None
        else config.server.max_body_bytes,
        drop_headers=tuple(drop),
    )
    if route.websocket and websocket.is_upgrade(request):
        headers = runtime.forwarder.headers(request, upstream, ctx)
        return route.name, await websocket.relay(request, upstream, headers, rid)
    return route.name, await runtime.forwarder.forward(request, upstream, ctx)


async def handle(request: web.Request) -> web.StreamResponse:
    """Every request on the public listener."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    rid = request_id(request.headers)
    metrics.in_flight.inc()
    try:
        route, response = await _dispatch(request, rid)
    finally:
        metrics.in_flight.dec()
    metrics.observe(route, request.method, response.status, time.perf_counter() - started)
    return response


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[RUNTIME].upstreams.close()


def create_app(config: GatewayConfig, registry: CollectorRegistry) -> web.Application:
    """The public application for `config`, its metrics on `registry`."""
    app = web.Application(handler_args={"auto_decompress": False})
    metrics = ProxyMetrics(registry)
    app[METRICS] = metrics
    app[RUNTIME] = Runtime.build(config, metrics)
    app.cleanup_ctx.append(_upstreams_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
