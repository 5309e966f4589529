"""Starting the signal side of a process: the recorder in `serve`, the notifier wherever
notifications are delivered from (`gateway worker`, or an embedded `serve`)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from gateway.config.models import GatewayConfig
from gateway.ledger.db import Database
from gateway.lifecycle import stop_task
from gateway.signals.notifier import Notifier, NotifierMetrics, endpoints
from gateway.signals.recorder import SignalMetrics, SignalRecorder

log = logging.getLogger("gateway.signals")
STOP_TIMEOUT_S = 5.0


class Delivering:
    """The notifier on its own task beside whatever else the process does."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._task = asyncio.create_task(notifier.run(), name="notifier")

    @classmethod
    def start(
        cls, config: GatewayConfig, db: Database, registry: CollectorRegistry, holder: str
    ) -> Delivering | None:
        """None when no webhook is configured."""
        if not config.notifications.webhooks:
            return None
        notifier = Notifier(db, config.notifications, holder, NotifierMetrics(registry))
        log.info("delivering notifications to %d webhooks", len(notifier.endpoints))
        return cls(notifier)

    async def close(self) -> None:
        """Let the deliveries in flight finish (their rows are marked), then stop."""
        self.notifier.stop()
        try:
            async with asyncio.timeout(self.notifier.config.timeout_s + STOP_TIMEOUT_S):
                await asyncio.shield(self._task)
        except TimeoutError:
            await stop_task(self._task)


def recorder(
    config: GatewayConfig, db: Database, registry: CollectorRegistry
) -> SignalRecorder | None:
    """The serving process's signal recorder; None when nobody would be notified."""
    if not config.notifications.webhooks:
        return None
    endpoints(config.notifications)  # a missing secret stops the start, not a delivery
    return SignalRecorder(db, config.notifications, SignalMetrics(registry))
