"""`gateway worker`: moves usage events from the shard streams into the ledger.

Each round reads a batch from every shard, writes it in one ledger
transaction (idempotent: a redelivered event is a duplicate, not a second
charge) and acknowledges the entries only after the commit. A batch the
ledger refuses (Postgres down) is retried as it is until it commits; nothing
is acknowledged meanwhile, so a worker killed at any point loses nothing.
Housekeeping runs every few seconds: reclaim entries left by dead consumers,
trim the streams, create next month's partition and drop expired ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from gateway.clock import month_start, months_after
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.events import wire_row
from gateway.ledger.usage_ledger import UsageLedger, Written
from gateway.lifecycle import pause
from gateway.metrics import WorkerMetrics
from gateway.usage.quarantine import LedgerRefused, Quarantine, write_isolating
from gateway.usage.streams import Entry, UsageStreams

log = logging.getLogger("gateway.usage")

BATCH_EVENTS = 5000  # per shard and round
STALE_MS = 30_000  # an entry unacknowledged this long belongs to a dead consumer
HOUSEKEEPING_S = 5.0
RETRY_S = 0.5
RETRY_UNEXPECTED_S = 5.0


@dataclass
class Settings:
    batch_events: int = BATCH_EVENTS
    stale_ms: int = STALE_MS
    housekeeping_s: float = HOUSEKEEPING_S
    idle_sleep_s: float = 0.05
    # A round that found fewer events than this waits `linger_s` before the
    # next read, so that a steady trickle is written in batches: each round
    # costs a read and an acknowledgement per shard and a ledger transaction,
    # whatever its size. The ledger then lags the traffic by at most this.
    linger_below_events: int = 1000
    linger_s: float = 0.05
    retention_months: int = 24


class Worker:
    """One consumer of the `ledger` group on every shard."""

    def __init__(
        self,
        streams: UsageStreams,
        ledger: UsageLedger,
        metrics: WorkerMetrics,
        settings: Settings | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.streams = streams
        self.ledger = ledger
        self.metrics = metrics
        self.settings = settings or Settings()
        self.quarantine = quarantine or Quarantine(ledger.db, "worker")
        self._stopping = asyncio.Event()
        self._lost_reads = False
        self._last_housekeeping = 0.0

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`."""
        self._stopping.set()

    async def run(self) -> None:
        """Until stopped: this consumer's own pending entries first, then new ones.

        The next batch is read while the current one is being written, so the
        ledger's work and ours overlap; entries read but not yet written stay
        pending for this consumer, and a restart reads them again first.
        """
        await self._until_done(self.streams.ensure_groups)
        await self._drain_pending()
        reading: asyncio.Task[list[Entry]] | None = asyncio.create_task(self._read())
        try:
            while not self._stopping.is_set():
                entries = await reading if reading is not None else await self._read()
                reading = None
                if self._lost_reads:
                    # A read failed after Redis may have delivered it: its entries are
                    # pending for this consumer, and only a read of those finds them.
                    await self.write(entries)
                    await self._drain_pending()
                    entries = []
                busy = len(entries) >= self.settings.linger_below_events
                if busy:  # read the next batch while this one is written
                    reading = asyncio.create_task(self._read())
                await self.write(entries)
                if not self._lost_reads:  # every shard read, and what was read written
                    self.metrics.last_success.set_to_current_time()
                if time.monotonic() - self._last_housekeeping > self.settings.housekeeping_s:
                    await self.housekeeping()
                if not busy:
                    await self._pause(
                        self.settings.linger_s if entries else self.settings.idle_sleep_s
                    )
        finally:
            if reading is not None:
                reading.cancel()

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless stopped meanwhile."""
        await pause(self._stopping, seconds)

    async def _drain_pending(self) -> None:
        self._lost_reads = False
        while not self._stopping.is_set() and await self.round(pending=True):
            pass

    async def round(self, pending: bool = False) -> int:
        """Read one batch from every shard and write it; the number of entries handled."""
        entries = await self._read(pending)
        await self.write(entries)
        return len(entries)

    async def _read(self, pending: bool = False) -> list[Entry]:
        try:
            reads = await asyncio.gather(
                *(
                    self.streams.read(shard, self.settings.batch_events, pending)
                    for shard in range(self.streams.shards)
                )
            )
        except (RedisError, OSError) as exc:
            self.metrics.errors.labels("queue").inc()
            self._lost_reads = True
            if "NOGROUP" in str(exc):
                # Redis lost its data (the streams went with it): start again.
                log.warning("usage consumer group missing (Redis lost its data?); recreating")
                await self._until_done(self.streams.ensure_groups)
                return []
            log.warning("usage streams unreadable (%s); retrying", exc)
            await asyncio.sleep(RETRY_S)
            return []
        return [entry for batch in reads for entry in batch]

    async def write(self, entries: Sequence[Entry]) -> None:
        """Write the entries' events, then acknowledge them; retried until it commits.
        An entry the ledger refuses for good is quarantined (and acknowledged), never
        left to hold back the ones after it."""
        if not entries:
            return
        rows: list[tuple[str, tuple[Any, ...]]] = []
        malformed: list[str] = []
        for entry in entries:
            line = _text(entry.raw)
            try:
                rows.append((line, wire_row(entry.raw)))
            except ValueError:
                self.metrics.errors.labels("malformed").inc()
                malformed.append(line)
        if malformed:
            # Acknowledged once set aside: a malformed entry can never be written, and
            # left pending it would stop the stream from ever being trimmed.
            await self._until_written(
                functools.partial(self.quarantine.put, malformed, "malformed entry")
            )
        single_failures = 0
        while True:
            try:
                isolated = await write_isolating(self._write_rows, rows, single_failures)
                break
            except LedgerUnavailable as exc:
                self.metrics.errors.labels("ledger").inc()
                log.warning("ledger unavailable (%s); retrying %d events", exc, len(rows))
                await asyncio.sleep(RETRY_S)
            except LedgerRefused as exc:
                # The ledger refuses the whole batch: its fault, not the entries' (nothing
                # is acknowledged); a worker that died would stop all ingest instead.
                self.metrics.errors.labels("unexpected").inc()
                single_failures += 1
                log.error("writing %d usage events failed (%s); retrying", len(rows), exc)
                await asyncio.sleep(RETRY_UNEXPECTED_S)
        for (line, _), error in isolated.refused:
            await self._until_written(functools.partial(self.quarantine.put, [line], error))
        written = isolated.written
        self.metrics.batch.observe(len(rows))
        self.metrics.written.inserted.inc(written.inserted)
        self.metrics.written.duplicates.inc(written.duplicates)
        by_shard: dict[int, list[bytes | str]] = {}
        for entry in entries:
            by_shard.setdefault(entry.shard, []).append(entry.entry_id)
        # Committed: a failure to acknowledge only means a redelivery, which
        # the ledger recognises.
        await self._until_done(
            lambda: asyncio.gather(*(self.streams.ack(s, ids) for s, ids in by_shard.items()))
        )

    async def _write_rows(self, items: Sequence[tuple[str, tuple[Any, ...]]]) -> Written:
        return await self.ledger.write_rows([row for _, row in items])

    async def _until_written(self, call: Callable[[], Awaitable[Any]]) -> None:
        while True:
            try:
                await call()
                return
            except LedgerUnavailable as exc:
                self.metrics.errors.labels("ledger").inc()
                log.warning("ledger unavailable (%s); retrying", exc)
                await asyncio.sleep(RETRY_S)

    async def housekeeping(self) -> None:
        """Reclaim stale entries, trim, keep partitions ahead and expire old ones; metrics."""
        self._last_housekeeping = time.monotonic()
        try:
            for shard in range(self.streams.shards):
                stale = await self.streams.claim_stale(
                    shard, self.settings.stale_ms, self.settings.batch_events
                )
                if stale:
                    log.info("reclaimed %d stale usage entries on shard %d", len(stale), shard)
                    await self.write(stale)
                await self.streams.trim(shard)
            lag = [await self.streams.lag(shard) for shard in range(self.streams.shards)]
            self.metrics.lag.set(sum(lag))
        except (RedisError, OSError) as exc:
            self.metrics.errors.labels("queue").inc()
            log.warning("usage stream housekeeping failed (%s)", exc)
        try:
            this_month = month_start(datetime.now(UTC))
            await self.ledger.ensure_partitions([this_month, months_after(this_month, 1)])
            cutoff = months_after(this_month, -self.settings.retention_months)
            for name in await self.ledger.drop_partitions_before(cutoff):
                log.info("dropped usage partition %s (past usage.retention_months)", name)
        except LedgerUnavailable as exc:
            self.metrics.errors.labels("ledger").inc()
            log.warning("ledger housekeeping failed (%s)", exc)

    async def _until_done(self, call: Callable[[], Awaitable[Any]]) -> None:
        while True:
            try:
                await call()
                return
            except (RedisError, OSError) as exc:
                self.metrics.errors.labels("queue").inc()
                log.warning("usage streams unavailable (%s); retrying", exc)
                await asyncio.sleep(RETRY_S)


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
