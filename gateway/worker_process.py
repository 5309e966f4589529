"""The `gateway worker` process: the usage worker, its metrics and its signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from gateway.billing.run import Reporting
from gateway.clock import iso_utc
from gateway.config.models import GatewayConfig
from gateway.headers import own_headers
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.store import Ledger
from gateway.ledger.usage_ledger import UsageLedger
from gateway.lifecycle import stop_task
from gateway.metrics import LedgerMetrics, WorkerMetrics
from gateway.process_metrics import process_collectors
from gateway.quota.redis_client import Client, close_client, redis_client
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import StoreUnavailable
from gateway.services import StartupError, open_ledger
from gateway.signals.run import Watching
from gateway.usage.quarantine import Quarantine, QuarantineMetrics
from gateway.usage.reconcile import reconcile
from gateway.usage.streams import UsageStreams
from gateway.usage.worker import Settings, Worker

log = logging.getLogger("gateway.usage")
RECONCILE_S = 300.0


def _metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)  # off the worker's loop
        return web.Response(body=body, content_type="text/plain")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.on_response_prepare.append(own_headers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def _needs_redis(config: GatewayConfig, what: str) -> None:
    if not config.storage.counters.startswith(("redis:", "rediss:")):
        raise StartupError(
            f"storage.counters is memory://: its counters and usage live in the `gateway serve` "
            f"process, so there is nothing for {what} to do (the admin usage view shows "
            f"`used` beside `recorded`)"
        )


async def run_reconcile(config: GatewayConfig, fail_on_drift: bool) -> int:
    """`gateway reconcile`: print every counter that differs from the ledger."""
    _needs_redis(config, "`gateway reconcile`")
    ledger = await open_ledger(config, migrate=False)
    store = await RedisStore.open(
        config.storage.counters, config.storage.shards, 5000, config.storage.redis_cluster,
        record=False,
    )  # fmt: skip
    try:
        compared, drifts = await reconcile(config, store, ledger, UsageLedger(ledger.db))
    except StoreUnavailable as exc:
        raise StartupError(f"storage.counters: {exc}") from None
    finally:
        await store.close()
        await ledger.close()
    if drifts:
        print(f"{'tenant':<24} {'meter':<16} {'period start':<26} {'counter':>10} "
              f"{'ledger':>10} {'drift':>8}")  # fmt: skip
    for d in drifts:
        print(f"{d.tenant:<24} {d.meter:<16} {iso_utc(d.period_start):<26} {d.counter:>10} "
              f"{d.ledger:>10} {d.difference:>+8}")  # fmt: skip
    total = sum(abs(d.difference) for d in drifts)
    print(f"{compared} counters compared, {len(drifts)} drifting by {total} in all "
          f"(events still queued for the worker count as drift until written)")  # fmt: skip
    return 1 if drifts and fail_on_drift else 0


async def _reconcile_forever(
    config: GatewayConfig, ledger: Ledger, client: Client, metrics: WorkerMetrics
) -> None:
    store = RedisStore(client, config.storage.shards, 5.0, record=False)
    while True:
        try:
            _, drifts = await reconcile(config, store, ledger, UsageLedger(ledger.db))
            metrics.drifting.set(len(drifts))
            metrics.drift.set(sum(abs(d.difference) for d in drifts))
        except (StoreUnavailable, LedgerUnavailable) as exc:
            log.warning("reconciliation failed (%s)", exc)
        await asyncio.sleep(RECONCILE_S)


def _no_reload() -> None:
    log.warning("SIGHUP: gateway worker reads its config only at start; restart it for a change")


async def run_worker(config: GatewayConfig, consumer: str | None = None) -> None:
    """Move usage events from the queue into the ledger until SIGTERM or SIGINT."""
    _needs_redis(config, "a worker")
    registry = CollectorRegistry()
    process_collectors(registry)
    ledger = await open_ledger(config, migrate=False, metrics=LedgerMetrics(registry))
    client = await redis_client(config.storage.queue_url, config.storage.redis_cluster)
    counters = client
    if config.storage.separate_queue is not None:
        counters = await redis_client(config.storage.counters, config.storage.redis_cluster)
    streams = UsageStreams(client, config.storage.shards, consumer or socket.gethostname())
    settings = Settings(retention_months=config.usage.retention_months)
    quarantine = Quarantine(ledger.db, "worker", QuarantineMetrics(registry))
    worker = Worker(streams, UsageLedger(ledger.db), WorkerMetrics(registry), settings, quarantine)
    runner = web.AppRunner(_metrics_app(registry), access_log=None)
    await runner.setup()
    host = config.metrics.host or config.admin.host
    await web.TCPSite(runner, host, config.usage.worker_port).start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    # A SIGHUP meant for the gateway processes (a reload) must not end the worker, whose
    # config is read at start only.
    loop.add_signal_handler(signal.SIGHUP, _no_reload)
    log.info(
        "usage worker %s: %d shards -> %s (metrics on http://%s:%d/metrics)",
        streams.consumer, streams.shards, config.storage.ledger.split("@")[-1],
        host, runner.addresses[0][1],
    )  # fmt: skip
    reconciling = asyncio.create_task(_reconcile_forever(config, ledger, counters, worker.metrics))
    reporting = None
    watching = Watching.start(config, ledger.db, registry, streams.consumer)
    try:
        if config.stripe is not None:
            reporting = Reporting.start(config, ledger.db, registry, streams.consumer)
            log.info("reporting usage to Stripe (%s) every %.0fs", config.stripe.mode,
                     config.stripe.report_interval_s)  # fmt: skip
        await worker.run()
    finally:
        if reporting is not None:
            await reporting.close()
        await watching.close()
        await stop_task(reconciling)
        await runner.cleanup()
        await close_client(client)
        if counters is not client:
            await close_client(counters)
        await ledger.close()
        log.info("usage worker stopped")
