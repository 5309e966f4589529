"""The `gateway worker` process: the usage worker, its metrics and its signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from gateway.config.models import GatewayConfig
from gateway.ledger.usage import UsageLedger
from gateway.quota.redis_store import close_client, redis_client
from gateway.services import StartupError, open_ledger
from gateway.usage.streams import UsageStreams
from gateway.usage.worker import Settings, Worker, WorkerMetrics

log = logging.getLogger("gateway.usage")


def _metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def run_worker(config: GatewayConfig, consumer: str | None = None) -> None:
    """Move usage events from the queue into the ledger until SIGTERM or SIGINT."""
    counters = config.storage.counters
    if not counters.startswith(("redis:", "rediss:")):
        raise StartupError(
            "storage.counters is memory://: `gateway serve` writes usage into the ledger "
            "itself, so there is nothing for a worker to do"
        )
    ledger = await open_ledger(config, migrate=False)
    client = await redis_client(counters, config.storage.redis_cluster)
    registry = CollectorRegistry()
    streams = UsageStreams(client, config.storage.shards, consumer or socket.gethostname())
    settings = Settings(retention_months=config.usage.retention_months)
    worker = Worker(streams, UsageLedger(ledger.db), WorkerMetrics(registry), settings)
    runner = web.AppRunner(_metrics_app(registry), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.admin.host, config.usage.worker_port).start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info(
        "usage worker %s: %d shards -> %s (metrics on http://%s:%d/metrics)",
        streams.consumer, streams.shards, config.storage.ledger.split("@")[-1],
        config.admin.host, runner.addresses[0][1],
    )  # fmt: skip
    try:
        await worker.run()
    finally:
        await runner.cleanup()
        await close_client(client)
        await ledger.close()
        log.info("usage worker stopped")
