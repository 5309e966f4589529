"""Running the listeners of one gateway process, and stopping them gracefully."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from gateway.admin import Readiness, create_admin_app
from gateway.app import create_app
from gateway.config.models import GatewayConfig, TLSConfig
from gateway.lifecycle import run_loop
from gateway.services import StartupError

log = logging.getLogger("gateway")


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS for the public listener."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


class Gateway:
    """The public and admin listeners of one process."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.readiness = Readiness()
        self._runners: list[web.AppRunner] = []
        self.port = 0
        self.admin_port = 0
        self.app: web.Application | None = None  # the public application, once started

    async def start(self) -> None:
        """Listen on both ports; port 0 picks a free one (see `port`)."""
        server = self.config.server
        public_app = self.app = create_app(self.config, self.registry)
        public = web.AppRunner(
            public_app, access_log=None, shutdown_timeout=server.shutdown_timeout_s
        )
        token = os.environ.get(self.config.admin.token_env)
        admin = web.AppRunner(
            create_admin_app(self.registry, self.readiness, public_app, token),
            access_log=None,
            shutdown_timeout=1,
        )
        for runner in (public, admin):
            await runner.setup()
            self._runners.append(runner)
        ssl_ctx = server_ssl_context(server.tls) if server.tls else None
        site = web.TCPSite(public, server.host, server.port, ssl_context=ssl_ctx, backlog=1024)
        admin_site = web.TCPSite(admin, self.config.admin.host, self.config.admin.port)
        for what, where, listener in (
            ("server", (server.host, server.port), site),
            ("admin", (self.config.admin.host, self.config.admin.port), admin_site),
        ):
            try:
                await listener.start()
            except OSError as exc:
                await self.stop()
                raise StartupError(
                    f"cannot listen on {where[0]}:{where[1]} ({exc.strerror or exc}): another "
                    f"process holds it, or set another {what}.port"
                ) from None
        self.port, self.admin_port = public.addresses[0][1], admin.addresses[0][1]
        self.readiness.ready = True

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the shutdown timeout)."""
        self.readiness.ready = False
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()


async def serve(config: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    gateway = Gateway(config)
    await gateway.start()
    # Everything allocated so far lives as long as the process; freezing it
    # keeps the collector from rescanning it on every full collection.
    gc.collect()
    gc.freeze()
    scheme = "https" if config.server.tls else "http"
    log.info(
        "gateway listening on %s://%s:%d (admin on http://%s:%d)",
        scheme, config.server.host, gateway.port, config.admin.host, gateway.admin_port,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("draining requests in flight")
        await gateway.stop()


def run(config: GatewayConfig) -> None:
    """Blocking entry point: uvloop where available."""
    # Every counter would otherwise also export a `_created` series that
    # doubles the scrape and that no dashboard uses.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    run_loop(serve(config))
