"""Running the listeners of one gateway process, and stopping them gracefully."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
from contextlib import suppress
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from gateway import reload
from gateway.admin import Readiness, create_admin_app, create_metrics_app, metric_samples
from gateway.app import create_app, public_handler
from gateway.app_keys import BEHIND_SUPERVISOR, METRICS
from gateway.config.models import GatewayConfig, TLSConfig
from gateway.http.server import HttpServer, Limits
from gateway.lifecycle import run_loop
from gateway.merged_metrics import SAMPLES_PATH
from gateway.process_metrics import process_collectors
from gateway.services import StartupError

log = logging.getLogger("gateway")


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS for the public listener."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


@dataclass(frozen=True)
class Placement:
    """Where a process run by `gateway.supervisor` listens (`server.workers` > 1)."""

    port: int  # the public port the supervisor reserved, shared by SO_REUSEPORT
    admin_socket: str  # this process's admin listener: a Unix socket the supervisor reads


class Gateway:
    """The public and admin listeners of one process.

    The public listener is the gateway's own HTTP/1.1 server (`gateway.http`);
    its resources live in the public aiohttp application's cleanup contexts,
    set up here without a site of their own. The admin listener is aiohttp's.
    """

    def __init__(
        self,
        config: GatewayConfig,
        registry: CollectorRegistry | None = None,
        config_path: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path  # the file `config` came from: reloads read it again
        self.placement = placement
        if registry is None:
            registry = CollectorRegistry()
            process_collectors(registry)
        self.registry = registry
        self.readiness = Readiness()
        self._runners: list[web.AppRunner] = []
        self._listener: HttpServer | None = None
        self.port = 0
        self.admin_port = 0
        self.metrics_port = 0  # with `metrics.port` set
        self.app: web.Application | None = None  # the public application, once started

    async def start(self) -> None:
        """Listen on both ports; port 0 picks a free one (see `port`)."""
        server = self.config.server
        public_app = self.app = create_app(self.config, self.registry)
        if self.config_path is not None:
            reload.attach(public_app, self.config_path, self.registry)
        public = web.AppRunner(public_app, handle_signals=False)
        token = os.environ.get(self.config.admin.token_env)
        admin_app = create_admin_app(self.registry, self.readiness, public_app, token)
        if self.placement is not None:  # served on the private socket only
            admin_app.router.add_get(SAMPLES_PATH, metric_samples)
            admin_app[BEHIND_SUPERVISOR] = True
        admin = web.AppRunner(admin_app, access_log=None, shutdown_timeout=1)
        for runner in (public, admin):
            await runner.setup()  # the public one opens the stores, the ledger, the caches
            self._runners.append(runner)
        ssl_ctx = server_ssl_context(server.tls) if server.tls else None
        self._listener = HttpServer(
            public_handler(public_app),
            scheme="https" if ssl_ctx else "http",
            limits=Limits(**server.limits.listener()),
            on_shed=public_app[METRICS].request_shed,
        )
        placement = self.placement
        admin_site: web.BaseSite
        if placement is None:
            admin_site = web.TCPSite(admin, self.config.admin.host, self.config.admin.port)
        else:
            admin_site = web.UnixSite(admin, placement.admin_socket)
        port = server.port if placement is None else placement.port
        try:
            self.port = await self._listener.start(
                server.host, port, ssl=ssl_ctx, backlog=1024, reuse_port=placement is not None
            )
        except OSError as exc:
            await self.stop()
            raise StartupError(port_taken("server", server.host, port, exc)) from None
        try:
            await admin_site.start()
        except OSError as exc:
            await self.stop()
            raise StartupError(
                port_taken("admin", self.config.admin.host, self.config.admin.port, exc)
            ) from None
        if placement is None:
            self.admin_port = admin.addresses[0][1]
            # Under a supervisor, it serves metrics.port with every process's metrics.
            if self.config.metrics.port is not None:
                self.metrics_port = await self._start_metrics(self.config.metrics.port)
        self.readiness.ready = True

    async def _start_metrics(self, port: int) -> int:
        host = self.config.metrics.host or self.config.admin.host
        runner = web.AppRunner(
            create_metrics_app(self.registry, self.readiness), access_log=None, shutdown_timeout=1
        )
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await self.stop()
            raise StartupError(port_taken("metrics", host, port, exc)) from None
        log.info("metrics on http://%s:%d", host, runner.addresses[0][1])
        return int(runner.addresses[0][1])

    async def drain(self, hurry: asyncio.Event | None = None) -> None:
        """Report not ready at once, keep serving `server.drain_delay_s` (cut short when
        `hurry` is set) so that load balancers stop sending, then stop."""
        self.readiness.ready = False
        delay_s = self.config.server.drain_delay_s
        if delay_s > 0:
            log.info("not ready; serving %.1f s more before draining", delay_s)
            with suppress(TimeoutError):
                await asyncio.wait_for((hurry or asyncio.Event()).wait(), delay_s)
        log.info("draining requests in flight")
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the shutdown timeout)."""
        self.readiness.ready = False
        if self._listener is not None:
            await self._listener.stop(self.config.server.shutdown_timeout_s)
            self._listener = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.placement is not None:
            _remove_socket(self.placement.admin_socket)


def _remove_socket(path: str) -> None:
    """The last process out takes the supervisor's socket directory with it: also
    when the supervisor was killed and cannot."""
    with suppress(OSError):
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def port_taken(what: str, host: str, port: int, exc: OSError) -> str:
    """The one line a listener that cannot bind its port says."""
    return (
        f"cannot listen on {host}:{port} ({exc.strerror or exc}): another "
        f"process holds it, or set another {what}.port"
    )


async def serve(
    config: GatewayConfig, config_path: str | None = None, placement: Placement | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then drain (a second signal skips the drain delay);
    reload `config_path` on SIGHUP."""
    gateway = Gateway(config, config_path=config_path, placement=placement)
    await gateway.start()
    # Everything allocated so far lives as long as the process; freezing it
    # keeps the collector from rescanning it on every full collection.
    gc.collect()
    gc.freeze()
    scheme = "https" if config.server.tls else "http"
    if placement is None:
        log.info(
            "gateway listening on %s://%s:%d (admin on http://%s:%d)",
            scheme, config.server.host, gateway.port, config.admin.host, gateway.admin_port,
        )  # fmt: skip
    else:
        log.info(
            "gateway process %d serving %s://%s:%d (admin on %s)",
            os.getpid(), scheme, config.server.host, gateway.port, placement.admin_socket,
        )  # fmt: skip
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    assert gateway.app is not None
    loop.add_signal_handler(signal.SIGHUP, reload.reload_in_background, gateway.app)
    try:
        await stop.wait()
    finally:
        await gateway.drain(hurry)


def run(
    config: GatewayConfig, config_path: str | None = None, placement: Placement | None = None
) -> None:
    """Blocking entry point: uvloop where available."""
    # Every counter would otherwise also export a `_created` series that
    # doubles the scrape and that no dashboard uses.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    run_loop(serve(config, config_path, placement))
