"""The embedded usage queue: events of the memory store written into the ledger by `serve`.

The memory store appends an event in the same step as the charge, in memory
and in the process's journal (journal.py); every `usage.flush_interval_ms` the
recorder writes what accumulated in one ledger transaction, then deletes the
journal segments that held it. A batch the ledger refuses stays queued, in
order, for the next round; stopping writes everything left. A SIGKILLed
process loses nothing: the next start writes its journal into the ledger
before it restores the counters from there.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from gateway.ledger.db import LedgerUnavailable, sqlite_path
from gateway.ledger.events import UsageEvent, decode
from gateway.ledger.usage_ledger import UsageLedger
from gateway.lifecycle import stop_task
from gateway.metrics import LedgerWrites
from gateway.quota.journal import JOURNAL, EventJournal, Segment, dead_files, wire_lines
from gateway.usage.quarantine import (
    SINGLE_ATTEMPTS,
    LedgerRefused,
    Quarantine,
    QuarantineMetrics,
    write_isolating,
)

log = logging.getLogger("gateway.usage")
MAX_BATCH = 20_000


class Recorder:
    """Drains an in-process event list into the ledger."""

    def __init__(
        self,
        events: list[UsageEvent],
        ledger: UsageLedger,
        interval_s: float,
        journal: EventJournal | None = None,
        metrics: LedgerWrites | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self._events = events  # the store appends; only this class removes
        self._quarantine = quarantine or Quarantine(ledger.db, "recorder")
        self._single_failures = 0
        self._ledger = ledger
        self._interval_s = interval_s
        self._journal = journal  # the same events on disk
        self._sealed: list[Segment] = []  # segments whose events are all in `events` or written
        self._task: asyncio.Task[None] | None = None
        self._metrics = metrics

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="usage-recorder")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except LedgerUnavailable as exc:
                log.warning("ledger unavailable (%s); %d usage events wait", exc, len(self._events))
            except LedgerRefused as exc:
                log.error("the ledger refuses usage (%s); %d events wait", exc, len(self._events))
            except Exception:  # never die: every later event would wait for nothing
                log.exception("writing usage failed; %d events wait", len(self._events))

    async def flush(self) -> None:
        """Write every queued event; LedgerUnavailable leaves the rest queued."""
        if self._journal is not None and (segment := self._journal.seal()) is not None:
            self._sealed.append(segment)
        while self._events:
            batch = self._events[:MAX_BATCH]
            try:
                isolated = await write_isolating(self._ledger.write, batch, self._single_failures)
            except LedgerRefused:
                self._single_failures = self._single_failures + 1 if len(batch) == 1 else 0
                raise
            self._single_failures = 0
            for event, error in isolated.refused:
                await self._quarantine.put([event.encode()], error)
            written = isolated.written
            # Only now: a failed write keeps the batch for the next round.
            del self._events[: len(batch)]
            if self._metrics is not None:
                self._metrics.inserted.inc(written.inserted)
                self._metrics.duplicates.inc(written.duplicates)
        for segment in self._sealed:
            EventJournal.discard(segment)
        self._sealed.clear()

    async def close(self) -> None:
        """Stop the loop and write what is left (retried briefly if the ledger is down)."""
        await stop_task(self._task)
        for attempt in range(10):
            try:
                await self.flush()
                break
            except LedgerUnavailable as exc:
                log.warning("ledger unavailable at shutdown (%s), attempt %d", exc, attempt + 1)
                await asyncio.sleep(0.5)
        else:
            log.error("%d usage events could not be written before shutdown", len(self._events))
        if self._journal is not None:
            self._journal.close(self._sealed)


def journal_directory(spool_dir: Path | None, ledger_url: str) -> Path | None:
    """Where the embedded journal lives: `usage.spool_dir`, else beside a SQLite ledger's
    file (None for an in-memory SQLite ledger: there is nothing durable to protect)."""
    if spool_dir is not None:
        return spool_dir
    if not ledger_url.startswith("sqlite:"):
        return None
    path = sqlite_path(ledger_url)
    return None if path == ":memory:" else Path(f"{path}-usage")


async def replay_journals(
    directory: Path, ledger: UsageLedger, metrics: QuarantineMetrics | None = None
) -> int:
    """Write what dead processes' journals hold into the ledger (before a restore reads it);
    returns how many events were new there."""
    inserted = 0
    quarantine = Quarantine(ledger.db, "journal", metrics)
    for dead in dead_files(directory, JOURNAL):
        events = []
        for wire in wire_lines(dead.text):
            try:
                events.append(decode(wire))
            except ValueError:
                await quarantine.put([wire], f"unreadable journal line in {dead.path.name}")
        new = 0
        for start in range(0, len(events), MAX_BATCH):
            # A start never fails on an entry the ledger refuses: it is set aside at once.
            isolated = await write_isolating(
                ledger.write, events[start : start + MAX_BATCH], SINGLE_ATTEMPTS
            )
            for event, error in isolated.refused:
                await quarantine.put([event.encode()], error)
            new += isolated.written.inserted
        dead.release()
        inserted += new
        log.warning("%d usage events from %s written to the ledger (%d new)", len(events),
                    dead.path, new)  # fmt: skip
    return inserted
