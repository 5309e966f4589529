"""The config as requests read it: each route compiled once into its forwarding plan and
its charges, the router, the forwarder and the upstreams, swapped as one on reload."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.models import GatewayConfig
from gateway.headers import TrustedProxies, request_skip
from gateway.metrics import ProxyMetrics
from gateway.pipeline.forwarding import Forwarder, RoutePlan, Upstreams
from gateway.quota.policy import RouteCharges
from gateway.routing import Router

# Handled by the gateway itself (the listener answers `100 Continue` to the client).
_GATEWAY_HANDLED = ("Expect",)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """All a request on one route needs, built once per config: how to forward, what to charge."""

    plan: RoutePlan
    charges: RouteCharges


@dataclass(slots=True)
class Runtime:
    """Everything a request reads from the config, swapped as one on reload."""

    config: GatewayConfig
    router: Router
    forwarder: Forwarder
    upstreams: Upstreams
    routes: list[CompiledRoute]  # by the router's route index

    @classmethod
    def build(cls, config: GatewayConfig, metrics: ProxyMetrics) -> Runtime:
        upstreams = Upstreams(config.upstreams)
        tenant_header = config.auth.forward_tenant_header
        routes = []
        credentials = ["Authorization"]
        if config.auth.api_keys.enabled:
            # The upstream never needs the gateway's own API keys.
            credentials.append(config.auth.api_keys.header)
        for route in config.routes:
            upstream = upstreams[route.upstream]
            drop = [tenant_header, *_GATEWAY_HANDLED, *credentials[1:]]
            # Only a credential the gateway verified goes on (DESIGN 6a), unless the
            # upstream asks for the client's own (`always`) or for none (`never`).
            mode = upstream.config.authorization
            unverified = drop if mode == "always" else [*drop, "Authorization"]
            verified = [*drop, "Authorization"] if mode == "never" else drop
            limit = route.max_body_bytes
            plan = RoutePlan(
                name=route.name,
                upstream=upstream,
                max_body_bytes=config.server.max_body_bytes if limit is None else limit,
                skip_headers=request_skip(unverified),
                bearer_skip=request_skip(verified),
                # A preflight goes on without its body, so without its framing either.
                preflight_skip=request_skip([*drop, *credentials, "Content-Length"]),
                websocket=route.websocket,
                auth_required=route.auth == "required",
                preflight=route.cors or route.auth == "none",
            )
            routes.append(CompiledRoute(plan, RouteCharges.compile(route, config.meters)))
        return cls(
            config=config,
            router=Router(config.routes),
            forwarder=Forwarder(TrustedProxies(config.server.trusted_proxies), metrics),
            upstreams=upstreams,
            routes=routes,
        )
