"""The public listener's aiohttp application: route, then forward."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import access_log as access
from gateway.app_keys import (
    ACCESS_LOG,
    AUTH_METRICS,
    CLIENT_LIMITS,
    CONFIG,
    LIVE,
    METRICS,
    QUOTA,
    QUOTA_METRICS,
    REGISTRY,
    SERVICES,
    WATCHING,
    WEBHOOK_METRICS,
    WEBHOOKS,
)
from gateway.billing.run import Reporting, open_webhooks
from gateway.config.models import GatewayConfig
from gateway.headers import request_id
from gateway.http.message import BodyTimeout, ClientDisconnected, Handler, Request, Response
from gateway.ledger.events import EventContext
from gateway.ledger.usage_ledger import UsageLedger
from gateway.lifecycle import stop_task, watch_lag
from gateway.metrics import (
    GATEWAY,
    UNMATCHED,
    AuthMetrics,
    LedgerMetrics,
    LedgerWrites,
    ProxyMetrics,
    QuotaMetrics,
    StoreMetrics,
    WebhookMetrics,
)
from gateway.own_paths import authenticator, gateway_endpoint
from gateway.pipeline import idempotency, websocket
from gateway.pipeline.admission import admit
from gateway.pipeline.client_limits import ClientLimits
from gateway.pipeline.forwarding import (
    RoutePlan,
)
from gateway.pipeline.runtime import CompiledRoute, Live, Runtime
from gateway.problems import Refused, answer
from gateway.quota.engine import QuotaEngine, Restorer
from gateway.quota.metering import Metering
from gateway.quota.open import needs_quota, open_store
from gateway.routing import BadPath, parse_path
from gateway.services import Auth, Services, needs_services
from gateway.signals.refusals import RefusalTally
from gateway.signals.run import Watching
from gateway.signals.run import recorder as signal_recorder
from gateway.usage.quarantine import Quarantine, QuarantineMetrics
from gateway.usage.recorder import Recorder, journal_directory, replay_journals
from gateway.usage.restore import restore_shards

log = logging.getLogger("gateway.app")

# What a request whose client left mid-body counts as (nginx's "client closed request").
_GONE = Response(499, close=True)


async def _dispatch(
    app: web.Application, runtime: Runtime, request: Request, rid: str, outcome: access.Outcome
) -> tuple[str, Response]:
    """The route's name (for metrics) and the answer; the one place refusals become HTTP."""
    name = UNMATCHED
    try:
        try:
            path = parse_path(request.target)
            if path.reserved:
                name, outcome.decision = GATEWAY, access.GATEWAY_ENDPOINT
                return name, await gateway_endpoint(app, runtime, request, path.segments, rid)
            host = request.headers.get("Host", "")
            match = runtime.router.match_path(request.method, host, path)
        except BadPath as exc:
            raise Refused(400, "bad-path", str(exc)) from None
        if match is None:
            raise Refused(404, "no-route", "no route matches this request")
        route = runtime.routes[match.route.index]
        name = route.plan.name
        return name, await _serve(app, request, runtime, route, rid, outcome)
    except Refused as refused:
        return name, answer(refused, rid, outcome)
    except BodyTimeout:
        timeout = Refused(408, "body-timeout", "the request body stopped arriving", close=True)
        return name, answer(timeout, rid, outcome)
    except ClientDisconnected:
        outcome.decision = access.CLIENT_GONE
        return name, _GONE
    except Exception:
        # A bug, not the client's fault: logged with its traceback, answered as a
        # problem like every other answer of the gateway's own.
        log.exception("request %s on route %s failed", rid, name)
        failed = Refused(500, "internal-error", "the gateway failed")
        return name, answer(failed, rid, outcome)


async def _serve(
    app: web.Application,
    request: Request,
    runtime: Runtime,
    route: CompiledRoute,
    rid: str,
    outcome: access.Outcome,
) -> Response:
    """Admit, claim the Idempotency-Key, meter, forward; settle in one `finally`."""
    plan = route.plan
    client_limits = app[CLIENT_LIMITS]
    if not plan.auth_required or _is_preflight(request):
        client_limits.unauthenticated(request)  # no tenant to charge: the address is
    if _is_preflight(request):
        # Browsers send preflights without credentials; they are never charged, and
        # go on bare (no body, no credentials) only where the route allows CORS.
        if not plan.preflight:
            raise Refused(
                403, "cors-not-allowed", f"route {plan.name!r} does not allow CORS (cors: true)"
            )
        return await runtime.forwarder.forward(
            request, plan, rid, skip=plan.preflight_skip, data=b"", outcome=outcome
        )
    if not plan.auth_required:
        return await _forward(request, runtime, plan, rid, outcome, plan.skip_headers)
    with client_limits.authenticating(request):
        admitted = await admit(
            request.headers, authenticator(runtime), app[SERVICES], runtime.config
        )
    tenant = admitted.tenant
    outcome.tenant = tenant.id
    upstream_extra = {runtime.config.auth.forward_tenant_header: tenant.id}
    warning = [("X-Quota-Warning", admitted.warning)] if admitted.warning else []
    skip = plan.bearer_skip if admitted.bearer else plan.skip_headers
    engine, policies = app.get(QUOTA), runtime.policies
    if engine is None or policies is None:
        return await _forward(request, runtime, plan, rid, outcome, skip, upstream_extra, warning)
    context = EventContext(plan.name, request.method, rid)
    metering = Metering(engine, policies, tenant, route.charges, context)
    claim: idempotency.Claim | None = None
    response: Response | None = None
    try:
        claimed = await idempotency.claim(
            request, engine.store, tenant.id, plan.max_body_bytes, engine.fail_open
        )
        if isinstance(claimed, idempotency.Replay):
            outcome.decision = access.IDEMPOTENT_REPLAY
            return idempotency.replay(claimed.stored, rid)
        claim = claimed
        checking = time.perf_counter()
        try:
            await metering.check()
        finally:  # refused or not: how long the counter store took to answer
            outcome.quota_s = time.perf_counter() - checking
        response = await _forward(
            request, runtime, plan, rid, outcome, skip, upstream_extra,
            warning + metering.headers, claim.body.chunks() if claim is not None else None,
        )  # fmt: skip
        return response
    finally:
        # Also when the forward failed unexpectedly: the charge is settled (refunded,
        # nothing was served) and the key released, not left in flight for minutes.
        try:
            await metering.finish(
                response.status if response else None, response.headers if response else {}
            )
        finally:
            if claim is not None:
                await idempotency.finish(engine.store, claim, response)


async def _forward(
    request: Request,
    runtime: Runtime,
    plan: RoutePlan,
    rid: str,
    outcome: access.Outcome,
    skip: frozenset[str],
    upstream_extra: dict[str, str] | None = None,
    response_extra: list[tuple[str, str]] | None = None,
    data: AsyncIterator[bytes] | None = None,
) -> Response:
    if plan.websocket and websocket.is_upgrade(request):
        headers = runtime.forwarder.headers(request, plan, rid, upstream_extra, skip)
        return await websocket.relay(request, plan.upstream, headers, rid, plan.max_body_bytes)
    return await runtime.forwarder.forward(
        request, plan, rid, upstream_extra=upstream_extra, response_extra=response_extra or (),
        skip=skip, data=data, outcome=outcome,
    )  # fmt: skip


def _is_preflight(request: Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


async def handle(app: web.Application, request: Request) -> Response:
    """Every request on the public listener."""
    metrics = app[METRICS]
    started = time.perf_counter()
    rid = request_id(request.headers)
    outcome = access.Outcome()
    runtime = app[LIVE].runtime  # this request's, whatever a reload swaps in meanwhile
    runtime.active += 1
    metrics.in_flight.inc()
    try:
        route, response = await _dispatch(app, runtime, request, rid, outcome)
    finally:
        metrics.in_flight.dec()
        runtime.leave()
    elapsed_s = time.perf_counter() - started
    metrics.observe(route, request.method, response.status, elapsed_s)
    if (access_log := app.get(ACCESS_LOG)) is not None:
        access_log.write(request, rid, route, response, outcome, elapsed_s)
    if response is _GONE:
        raise ClientDisconnected  # the listener drops the connection, answering nothing
    return response


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    if (access_log := app.get(ACCESS_LOG)) is not None:
        access_log.flush()  # the listener has stopped: these are the last lines


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    watching = asyncio.create_task(watch_lag(app[METRICS].loop_lag.observe), name="loop-lag")
    yield
    await stop_task(watching)


async def _quota_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not needs_quota(config):
        yield
        return
    services = app.get(SERVICES)
    usage = UsageLedger(services.ledger.db) if services is not None else None
    journal_dir = None
    quarantined = QuarantineMetrics(app[REGISTRY]) if usage is not None else None
    if usage is not None and config.storage.embedded:
        journal_dir = journal_directory(config.usage.spool_dir, config.storage.ledger)
        if journal_dir is not None:
            # What a killed process journaled goes into the ledger before the
            # restore (engine.prepare) reads it back.
            await replay_journals(journal_dir, usage, quarantined)
    opened = await open_store(config, usage is not None, journal_dir, StoreMetrics(app[REGISTRY]))
    store, sink = opened.store, opened.sink
    restorer: Restorer | None = None
    recorder = None
    if usage is not None:

        def restorer(shards: Sequence[int]) -> Awaitable[None]:
            # The meters of the config live now (a reload may have added some).
            live = app.get(LIVE)
            meters = live.runtime.config.meters if live is not None else config.meters
            return restore_shards(store, usage, meters, shards, unrecorded=sink.unrecorded,
                                  expected=config.storage.embedded)  # fmt: skip

        if sink.local is not None:
            interval_s = config.usage.flush_interval_ms / 1000
            writes = LedgerWrites(app[REGISTRY])
            quarantine = Quarantine(usage.db, "recorder", quarantined)
            recorder = Recorder(sink.local, usage, interval_s, sink.journal, writes, quarantine)
            recorder.start()
    engine = QuotaEngine(config, store, restorer, app[QUOTA_METRICS])
    await engine.prepare()
    app[QUOTA] = engine
    signals = watching = refusals = None
    if services is not None:
        signals = engine.signals = signal_recorder(config, services.ledger.db, app[REGISTRY])
        refusals = engine.refusals = RefusalTally(services.ledger.db)
        if config.storage.embedded:  # no `gateway worker` runs: this process delivers
            watching = app[WATCHING] = Watching.start(
                config, services.ledger.db, app[REGISTRY], "serve"
            )
    yield
    await engine.close()
    if signals is not None:
        await signals.flush()
    if refusals is not None:
        await refusals.close()
    if watching is not None:
        await watching.close()
    if recorder is not None:
        await recorder.close()


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if not needs_services(config):
        yield
        return
    services = await Services.open(config, LedgerMetrics(app[REGISTRY]))
    app[SERVICES] = services
    app[AUTH_METRICS] = AuthMetrics(app[REGISTRY])  # the JWKS fetches of every runtime
    yield
    await services.close()


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    """The first runtime, once the services and the quota engine it refers to are open."""
    config = app[CONFIG]
    services, engine = app.get(SERVICES), app.get(QUOTA)
    auth = None
    if services is not None:
        auth = await Auth.open(config.auth, services.directory, app[AUTH_METRICS])
    policies = engine.policies_for(config) if engine is not None else None
    app[LIVE] = Live(Runtime.build(config, app[METRICS], auth, policies))
    yield
    await app[LIVE].runtime.close()  # a reload's previous ones are the reloader's


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    services = app.get(SERVICES)
    if config.stripe is None or services is None:
        yield
        return
    webhooks, api = open_webhooks(config, services, app[WEBHOOK_METRICS])
    app[WEBHOOKS] = webhooks
    reporting = None
    if config.storage.embedded:
        # Embedded: no `gateway worker` runs, so this process reports its own usage.
        reporting = Reporting.start(config, services.ledger.db, app[REGISTRY], "serve")
    yield
    if reporting is not None:
        await reporting.close()
    if api is not None:
        await api.close()


def create_app(config: GatewayConfig, registry: CollectorRegistry) -> web.Application:
    """The public application for `config`, its metrics on `registry`: it holds the
    resources (opened and closed by its cleanup contexts); requests reach it
    through `public_handler` on the gateway's own HTTP listener."""
    app = web.Application(handler_args={"auto_decompress": False})
    metrics = ProxyMetrics(registry)
    app[METRICS] = metrics
    tenant_top = config.metrics.tenant_label_top if config.metrics.tenant_label else 0
    app[QUOTA_METRICS] = QuotaMetrics(registry, tenant_top)
    app[WEBHOOK_METRICS] = WebhookMetrics(registry)
    app[REGISTRY] = registry
    app[CONFIG] = config
    app[CLIENT_LIMITS] = ClientLimits.for_config(config.server, metrics)
    if config.logging.access_log:
        app[ACCESS_LOG] = access.AccessLog.for_config(config)
    app.cleanup_ctx.append(_access_log_ctx)
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_services_ctx)
    app.cleanup_ctx.append(_quota_ctx)
    app.cleanup_ctx.append(_runtime_ctx)
    app.cleanup_ctx.append(_webhooks_ctx)
    return app


def public_handler(app: web.Application) -> Handler:
    """The public listener's handler for `app` (its resources live in the app's contexts)."""
    return functools.partial(handle, app)
