"""The gateway side of signals: seen in a charge's answer, written to the ledger off the
request path.

A request never waits for the ledger: `saw` only queues. While the ledger is
unreachable the queue is kept (up to `MAX_QUEUED`, then the oldest are
dropped and counted) and retried with backoff; a process stopped meanwhile
loses what it held, which is a notification, never usage.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter

from gateway.clock import utc_now
from gateway.config.models import NotificationsConfig
from gateway.ledger.db import Database, LedgerError
from gateway.lifecycle import stop_task
from gateway.quota.store import ChargeRequest, ChargeResult
from gateway.signals.crossings import Signal, crossings
from gateway.signals.store import SignalStore

log = logging.getLogger("gateway.signals")
MAX_QUEUED = 10_000
BATCH = 200
RETRY_MAX_S = 30.0


class SignalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.seen = Counter(
            "gateway_signals_total",
            "Signals this process saw in a charge's answer and wrote to the ledger, by type "
            "(a signal another process wrote first is not counted)",
            ["type"],
            registry=registry,
        )
        self.dropped = Counter(
            "gateway_signals_dropped_total",
            "Signals given up while the ledger was unreachable (the queue was full)",
            registry=registry,
        )


def endpoints_by_type(config: NotificationsConfig) -> dict[str, list[str]]:
    """Signal type -> the webhook URLs that asked for it."""
    out: dict[str, list[str]] = {}
    for hook in config.webhooks:
        for kind in hook.events:
            out.setdefault(kind, []).append(hook.url)
    return out


class SignalRecorder:
    """Queues the signals of allowed charges and writes them to the ledger in batches."""

    def __init__(
        self,
        db: Database,
        config: NotificationsConfig,
        metrics: SignalMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = SignalStore(db)
        self.endpoints = endpoints_by_type(config)
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[Signal] = deque()
        self._task: asyncio.Task[None] | None = None

    def saw(self, request: ChargeRequest, result: ChargeResult) -> None:
        """Queue whatever signals an allowed charge gives rise to; never waits."""
        for signal in crossings(request, result):
            if len(self._queue) >= MAX_QUEUED:
                self._queue.popleft()
                if self._metrics is not None:
                    self._metrics.dropped.inc()
            self._queue.append(signal)
            if self._task is None:
                self._task = asyncio.create_task(self._write(), name="signals")

    async def _write(self) -> None:
        failures = 0
        try:
            while self._queue:
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
                try:
                    await self._record(batch)
                except LedgerError as exc:
                    failures += 1
                    delay_s = min(RETRY_MAX_S, 0.5 * 2**failures) * random.uniform(0.5, 1)
                    if failures == 1:
                        log.warning("cannot write signals to the ledger (%s); retrying", exc)
                    await asyncio.sleep(delay_s)
                    continue
                failures = 0
                # The queue may have dropped some of the batch meanwhile: only its own go.
                written = {id(s) for s in batch}
                while self._queue and id(self._queue[0]) in written:
                    self._queue.popleft()
        finally:
            self._task = None

    async def _record(self, batch: Sequence[Signal]) -> None:
        pairs = [(s, self.endpoints.get(s.type, ())) for s in batch]
        for signal in await self.store.record(pairs, self._clock()):
            if self._metrics is not None:
                self._metrics.seen.labels(signal.type).inc()
            log.info(
                "signal %s: tenant %s, %s at %d of %d",
                signal.type, signal.tenant, signal.meter, signal.used, signal.limit,
            )  # fmt: skip

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (at stop), giving up after `timeout_s`."""
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("%d signals not written to the ledger at stop", len(self._queue))
            await stop_task(task)
