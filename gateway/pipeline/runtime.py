"""The config as requests read it: each route compiled once into its forwarding plan and
its charges, the router, the forwarder, the upstreams, the authenticator and the quota
policies, swapped as one on reload."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.config.models import GatewayConfig
from gateway.headers import TrustedProxies, request_skip
from gateway.metrics import ProxyMetrics
from gateway.pipeline.forwarding import Forwarder, RoutePlan, Upstreams
from gateway.quota.policy import Policies, RouteCharges
from gateway.routing import Router
from gateway.services import Auth

# Handled by the gateway itself (the listener answers `100 Continue` to the client).
_GATEWAY_HANDLED = ("Expect",)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """All a request on one route needs, built once per config: how to forward, what to charge."""

    plan: RoutePlan
    charges: RouteCharges


@dataclass(slots=True)
class Runtime:
    """Everything a request reads from the config, swapped as one on reload.

    A request takes the live runtime once, when it arrives, and counts itself in
    `active` until it is answered: a reload's previous runtime is closed only once
    its requests are done with it.
    """

    config: GatewayConfig
    router: Router
    forwarder: Forwarder
    upstreams: Upstreams
    routes: list[CompiledRoute]  # by the router's route index
    auth: Auth | None  # None: no tenants (no route needs credentials)
    policies: Policies | None  # None: nothing is metered (no quota engine)
    active: int = 0  # requests being handled on this runtime
    closed: bool = False
    _idle: asyncio.Event | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        config: GatewayConfig,
        metrics: ProxyMetrics,
        auth: Auth | None = None,
        policies: Policies | None = None,
        previous: Runtime | None = None,
    ) -> Runtime:
        """Compile `config`; upstreams that `previous` has unchanged are shared with it."""
        upstreams = Upstreams(config.upstreams, previous.upstreams if previous else None)
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
            auth=auth,
            policies=policies,
        )

    def leave(self) -> None:
        """A request on this runtime is answered."""
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Wait until no request is handled on this runtime (once no new one can start)."""
        while self.active:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def close(self, successor: Runtime | None = None) -> None:
        """Close the upstream pools and the JWKS refresher that `successor` does not share
        (once: closing again does nothing)."""
        if self.closed:
            return
        self.closed = True
        await self.upstreams.close(successor.upstreams if successor is not None else None)
        if self.auth is not None and (successor is None or successor.auth is not self.auth):
            await self.auth.close()


class Live:
    """The runtime new requests start on: a reload replaces it in one assignment."""

    __slots__ = ("runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
