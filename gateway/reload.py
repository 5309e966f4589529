"""Reloading the config file a process started with (SIGHUP, `POST /admin/reload`).

The new file is validated as at start (the same loader and support checks), then
everything requests read from the config is built anew as one `Runtime` and
swapped in by one assignment. Requests in flight finish on the runtime they
started on; its upstream pools and JWKS refresher are closed once they are done.
What the process bound at start (listeners, storage, logging, ...) is refused by
name: a file that changes it is a failed reload, and the running config is kept.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from gateway.app_keys import AUTH_METRICS, CONFIG, LIVE, METRICS, QUOTA, SERVICES, WATCHING
from gateway.config.loader import ConfigError, Issue, load
from gateway.config.models import GatewayConfig
from gateway.pipeline.runtime import Runtime
from gateway.process_metrics import ConfigMetrics
from gateway.quota.open import needs_quota
from gateway.services import Auth, StartupError, needs_services, seed

log = logging.getLogger("gateway.reload")

# What a reload may change: the rest is bound at start. Listed rather than excluded,
# so that a key added later is refused until someone makes it reloadable.
RELOADABLE = frozenset(
    {
        "server.max_body_bytes",
        "server.trusted_proxies",
        "auth",
        "upstreams",
        "meters",
        "billing",
        "plans",
        "subscription",
        "routes",
        "tenants",
    }
)
RESTART = "cannot change on reload; restart the gateway"


def restart_only(old: GatewayConfig, new: GatewayConfig) -> list[Issue]:
    """The keys whose change needs a restart, each by its deepest path that differs."""
    issues: list[Issue] = []
    _compare(old, new, "", issues)
    return issues


def _compare(old: object, new: object, at: str, issues: list[Issue]) -> None:
    if at in RELOADABLE or old == new:
        return
    if isinstance(old, BaseModel) and type(old) is type(new):
        for name in type(old).model_fields:
            path = f"{at}.{name}" if at else name
            _compare(getattr(old, name), getattr(new, name), path, issues)
        return
    issues.append((at, RESTART))


def _opened_at_start(app: web.Application, new: GatewayConfig) -> list[Issue]:
    """Tenants and quotas need the ledger and the counter store, opened only at start."""
    issues: list[Issue] = []
    if SERVICES not in app and needs_services(new):
        auth = new.auth
        at = "auth.jwt" if auth.jwt else "auth.api_keys.enabled" if auth.api_keys.enabled else ""
        issues.append(
            (at or "tenants", "tenants need the ledger, opened only at start; restart the gateway")
        )
    if QUOTA not in app and needs_quota(new):
        charged = [f"routes[{i}].charge" for i, route in enumerate(new.routes) if route.charge]
        limited = [f"plans.{name}.rate_limits" for name, p in new.plans.items() if p.rate_limits]
        at = (charged + limited)[0]
        issues.append(
            (at, "quotas need the counter store, opened only at start; restart the gateway")
        )
    return issues


def _ca_files(new: GatewayConfig) -> list[Issue]:
    """CA files that exist but hold no certificate (the loader checked that they exist;
    at start, the same file fails the start with the TLS library's error)."""
    issues: list[Issue] = []
    for name, upstream in new.upstreams.items():
        if upstream.ca_file is not None and upstream.url.startswith("https:"):
            try:
                ssl.create_default_context(cafile=str(upstream.ca_file))
            except (ssl.SSLError, OSError) as exc:
                issues.append((f"upstreams.{name}.ca_file", f"cannot be used: {exc}"))
    return issues


class Reloader:
    """Reloads one public application's config from its file, one reload at a time."""

    def __init__(self, app: web.Application, path: str, metrics: ConfigMetrics) -> None:
        self.app = app
        self.path = path
        self.metrics = metrics
        self._lock = asyncio.Lock()
        # Runtimes replaced but maybe still serving, oldest first, with their successors.
        self._retiring: list[tuple[Runtime, Runtime]] = []
        self._closer: asyncio.Task[None] | None = None
        self._closed = False  # the application is stopping: nothing more is swapped in
        metrics.last_success.set(time.time())  # the start loaded it

    async def reload(self) -> dict[str, Any]:
        """Load, check and swap in the file; its summary. ConfigError (logged once,
        counted) when it cannot be used: the running config is kept."""
        async with self._lock:
            try:
                runtime = await self._reload()
            except ConfigError as exc:
                self.metrics.failure.inc()
                log.error(
                    "config not reloaded, the running one is kept: %s", "; ".join(exc.lines())
                )
                raise
            except Exception:
                self.metrics.failure.inc()
                log.exception("config not reloaded, the running one is kept")
                raise
            self.metrics.success.inc()
            self.metrics.last_success.set(time.time())
        config = runtime.config
        summary = {
            "file": self.path,
            "routes": len(config.routes),
            "upstreams": len(config.upstreams),
            "plans": len(config.plans),
            "meters": len(config.meters),
            "tenants": len(config.tenants),
        }
        log.info(
            "config reloaded from %s (%d routes, %d upstreams, %d plans)",
            self.path, summary["routes"], summary["upstreams"], summary["plans"],
        )  # fmt: skip
        return summary

    async def _reload(self) -> Runtime:
        app = self.app
        new = load(self.path)
        live = app[LIVE]
        current = live.runtime
        issues = restart_only(app[CONFIG], new) + _opened_at_start(app, new) + _ca_files(new)
        if issues:
            raise ConfigError(self.path, issues)
        services, engine = app.get(SERVICES), app.get(QUOTA)
        auth = None
        try:
            if services is not None:
                auth = await Auth.open(
                    new.auth, services.directory, app[AUTH_METRICS], previous=current.auth
                )
                # Before the swap: the first request on the new config finds them.
                for tenant_id in await seed(new, services.ledger):
                    # Other processes (and this one) may have cached them as unknown.
                    await services.bus.publish("tenant", tenant_id)
        except StartupError as exc:
            if auth is not None and auth is not current.auth:
                await auth.close()
            raise ConfigError(self.path, [("", str(exc))]) from None
        policies = engine.policies_for(new) if engine is not None else None
        try:
            runtime = Runtime.build(new, app[METRICS], auth, policies, previous=current)
        except BaseException:
            if auth is not None and auth is not current.auth:
                await auth.close()  # its JWKS refresher would outlive the failed reload
            raise
        if self._closed:  # stopped while this reload opened its parts: nothing will serve
            await runtime.close(current)
            raise ConfigError(self.path, [("", "the gateway is stopping")])
        live.runtime = runtime  # the swap: new requests start on the new config from here
        if (watching := app.get(WATCHING)) is not None:
            watching.watch.use(new)  # forecasts against the new plans' limits
        self._retire(current, runtime)
        return runtime

    def _retire(self, old: Runtime, successor: Runtime) -> None:
        self._retiring.append((old, successor))
        if self._closer is None or self._closer.done():
            self._closer = asyncio.create_task(self._close_retired(), name="config-retire")

    async def _close_retired(self) -> None:
        # Oldest first: a pool two runtimes share is closed by the later one, once
        # the earlier one's requests are done too.
        while self._retiring:
            old, successor = self._retiring[0]
            await old.idle()
            try:
                await old.close(successor)
            except Exception:
                log.exception("closing the previous config's upstreams failed")
            self._retiring.pop(0)

    async def close(self) -> None:
        """At shutdown, after the listener stopped: close what replaced runtimes still hold
        (and the live one, if a reload swapped it in after the application closed its own)."""
        self._closed = True
        if self._closer is not None:
            self._closer.cancel()
            await asyncio.gather(self._closer, return_exceptions=True)
        for old, successor in self._retiring:
            await old.close(successor)
        self._retiring.clear()
        if (live := self.app.get(LIVE)) is not None:
            await live.runtime.close()


RELOADER = web.AppKey("reloader", Reloader)


def attach(app: web.Application, path: str, registry: CollectorRegistry) -> Reloader:
    """Make the public application `app` reloadable from `path` (before it starts)."""
    reloader = app[RELOADER] = Reloader(app, path, ConfigMetrics(registry))

    async def close(_: web.Application) -> None:
        await reloader.close()

    app.on_cleanup.append(close)
    return reloader


def reload_in_background(app: web.Application) -> None:
    """SIGHUP: reload soon (a failure is logged and counted, nothing more)."""
    reloader = app.get(RELOADER)
    if reloader is None:
        log.warning("SIGHUP ignored: this gateway was not started from a config file")
        return

    async def run() -> None:
        try:
            await reloader.reload()
        except Exception:  # noqa: S110 - logged and counted by `reload`
            pass

    task = asyncio.create_task(run(), name="config-reload")
    _running.add(task)
    task.add_done_callback(_running.discard)


_running: set[asyncio.Task[None]] = set()  # a task nobody holds may be collected mid-run
