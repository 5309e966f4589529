"""The embedded usage queue: events of the memory store written into the ledger by `serve`.

The memory store appends an event in the same step as the charge; every
`usage.flush_interval_ms` the recorder writes what accumulated in one ledger
transaction. A batch the ledger refuses stays queued, in order, for the next
round; stopping writes everything left. A SIGKILLed process loses at most the
events of the last flush interval.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.usage import UsageLedger
from gateway.lifecycle import stop_task
from gateway.usage.events import UsageEvent

log = logging.getLogger("gateway.usage")
MAX_BATCH = 20_000


class Recorder:
    """Drains an in-process event list into the ledger."""

    def __init__(self, events: list[UsageEvent], ledger: UsageLedger, interval_s: float) -> None:
        self._events = events  # the store appends; only this class removes
        self._ledger = ledger
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="usage-recorder")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except LedgerUnavailable as exc:
                log.warning("ledger unavailable (%s); %d usage events wait", exc, len(self._events))

    async def flush(self) -> None:
        """Write every queued event; LedgerUnavailable leaves the rest queued."""
        while self._events:
            batch = self._events[:MAX_BATCH]
            written = await self._ledger.write(batch)
            # Only now: a failed write keeps the batch for the next round.
            del self._events[: len(batch)]
            self.written += written.inserted

    async def close(self) -> None:
        """Stop the loop and write what is left (retried briefly if the ledger is down)."""
        await stop_task(self._task)
        for attempt in range(10):
            try:
                await self.flush()
                return
            except LedgerUnavailable as exc:
                log.warning("ledger unavailable at shutdown (%s), attempt %d", exc, attempt + 1)
                await asyncio.sleep(0.5)
        log.error("%d usage events could not be written before shutdown", len(self._events))
