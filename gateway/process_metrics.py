"""A process's own metrics: its platform collectors, its config reloads, and the processes
of `gateway serve` under a supervisor."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)


def process_collectors(registry: CollectorRegistry) -> None:
    """The process's CPU, memory and file descriptors, Python's version and its
    garbage collector, on `registry` (prometheus_client puts them on its global one)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    if GC_COLLECTOR is not None:  # None where the interpreter has no gc.callbacks stats
        GCCollector(registry=registry)


class ConfigMetrics:
    """Reloads of the config file (SIGHUP, POST /admin/reload)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "gateway_config_reloads",
            "Config reloads, by result: success (swapped in), failure (the running config kept).",
            ["result"],
            registry=registry,
        )
        self.success = self.reloads.labels("success")
        self.failure = self.reloads.labels("failure")
        self.last_success = Gauge(
            "gateway_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded with success, at start or on reload (Unix time).",
            registry=registry,
        )


class SupervisorMetrics:
    """The processes of `gateway serve` with `server.workers` > 1."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = Counter(
            "gateway_server_process_restarts",
            "Gateway processes that exited on their own and were started again.",
            registry=registry,
        )
        self.running = Gauge(
            "gateway_server_processes_running",
            "Gateway processes running now (server.workers when all are up).",
            registry=registry,
        )
