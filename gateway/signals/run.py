"""Starting the signal side of a process: the recorder in `serve`; the watch (anomalies,
forecasts) and the notifier wherever the worker's work is done (`gateway worker`, or an
embedded `serve`)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from gateway.config.models import GatewayConfig
from gateway.ledger.db import Database
from gateway.lifecycle import stop_task
from gateway.signals.notifier import Notifier, NotifierMetrics, endpoints
from gateway.signals.recorder import SignalMetrics, SignalRecorder
from gateway.signals.watch import Watch, WatchMetrics

log = logging.getLogger("gateway.signals")
STOP_TIMEOUT_S = 5.0


class Watching:
    """The watch and the notifier, each on its own task beside the process's other work."""

    def __init__(self, watch: Watch, notifier: Notifier | None) -> None:
        self.watch = watch
        self.notifier = notifier
        self._tasks = [asyncio.create_task(watch.run(), name="signals-watch")]
        if notifier is not None:
            self._tasks.append(asyncio.create_task(notifier.run(), name="notifier"))

    @classmethod
    def start(
        cls, config: GatewayConfig, db: Database, registry: CollectorRegistry, holder: str
    ) -> Watching:
        top = config.metrics.tenant_label_top if config.metrics.tenant_label else 0
        watch = Watch(config, db, WatchMetrics(registry, top))
        notifier = None
        if config.notifications.webhooks:
            notifier = Notifier(db, config.notifications, holder, NotifierMetrics(registry))
            log.info("delivering notifications to %d webhooks", len(notifier.endpoints))
        return cls(watch, notifier)

    async def close(self) -> None:
        """Let the deliveries in flight finish (their rows are marked), then stop."""
        self.watch.stop()
        if self.notifier is not None:
            self.notifier.stop()
        wait_s = self.notifier.config.timeout_s if self.notifier is not None else 0.0
        for task in self._tasks:
            try:
                async with asyncio.timeout(wait_s + STOP_TIMEOUT_S):
                    await asyncio.shield(task)
            except TimeoutError:
                await stop_task(task)


def recorder(
    config: GatewayConfig, db: Database, registry: CollectorRegistry
) -> SignalRecorder | None:
    """The serving process's signal recorder; None when nobody would be notified."""
    if not config.notifications.webhooks:
        return None
    endpoints(config.notifications)  # a missing secret stops the start, not a delivery
    return SignalRecorder(db, config.notifications, SignalMetrics(registry))
