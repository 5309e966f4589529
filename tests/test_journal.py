"""The event journal: what a killed process wrote reaches the ledger once, nothing twice."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.ledger import Ledger
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.events import UsageEvent
from gateway.ledger.usage_ledger import UsageLedger, Written
from gateway.quota.journal import JOURNAL, EventJournal, dead_files, wire_lines
from gateway.usage.recorder import Recorder, journal_directory, replay_journals
from tests.test_usage_ledger import PERIOD, event

PERIOD_START = datetime(2026, 1, 15, tzinfo=UTC)


def files(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def test_a_sealed_segment_is_deleted_once_its_events_are_safe(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    assert journal.seal() is None  # nothing written: no file either
    journal.append([event(1).encode(), event(2).encode()])
    sealed = journal.seal()
    assert sealed is not None and sealed.events == 2
    journal.append([event(3).encode()])  # a new segment
    assert len(files(tmp_path)) == 2
    assert dead_files(tmp_path, JOURNAL) == []  # both locked by this live process
    EventJournal.discard(sealed)
    journal.close()  # the unsaved segment stays for the next start
    (left,) = dead_files(tmp_path, JOURNAL)
    assert wire_lines(left.text) == [event(3).encode()]
    left.release()
    assert files(tmp_path) == []


def test_a_line_cut_short_by_the_crash_is_left_out() -> None:
    whole = event(1).encode()
    assert wire_lines(f"{whole}\n{event(2).encode()[:20]}") == [whole]
    assert wire_lines("") == []


async def test_dead_journals_reach_the_ledger_once(ledger: Ledger, tmp_path: Path) -> None:
    tmp_path = tmp_path / "journal"  # beside the SQLite ledger's own files
    usage = UsageLedger(ledger.db)
    await usage.write([event(1)])  # written before the process died, and still journaled
    for batch in ([event(1), event(2)], [event(2), event(3)]):  # two dead processes
        journal = EventJournal(tmp_path)
        journal.append(e.encode() for e in batch)
        journal.close()
    (tmp_path / f"{JOURNAL}-1-1.log").write_text("not an event\n")
    assert await replay_journals(tmp_path, usage) == 2
    assert await usage.total("acme", "api_calls", PERIOD_START) == 3
    assert files(tmp_path) == []
    assert await replay_journals(tmp_path / "missing", usage) == 0


class FlakyLedger(UsageLedger):
    """A ledger whose writes fail while `down`."""

    down = False

    async def write(self, events: Sequence[UsageEvent]) -> Written:
        if self.down:
            raise LedgerUnavailable("down for the test")
        return await super().write(events)


async def test_the_recorder_keeps_segments_until_the_ledger_has_their_events(
    ledger: Ledger, tmp_path: Path
) -> None:
    tmp_path = tmp_path / "journal"  # beside the SQLite ledger's own files
    usage = FlakyLedger(ledger.db)
    journal = EventJournal(tmp_path)
    events = [event(1)]
    journal.append([events[0].encode()])
    recorder = Recorder(events, usage, 60, journal)
    await recorder.flush()
    assert events == [] and files(tmp_path) == []
    usage.down = True
    events.append(event(2))
    journal.append([events[0].encode()])
    with pytest.raises(LedgerUnavailable):
        await recorder.flush()
    events.append(event(3))
    journal.append([events[1].encode()])
    assert len(events) == 2 and len(files(tmp_path)) == 2
    usage.down = False
    await recorder.close()
    assert events == [] and files(tmp_path) == []
    assert await usage.total("acme", "api_calls", PERIOD_START) == 3
    assert event(3).period_start_us == PERIOD


def test_the_journal_lives_in_the_spool_dir_or_beside_a_sqlite_ledger(tmp_path: Path) -> None:
    assert journal_directory(tmp_path, "postgresql://db/gateway") == tmp_path
    assert journal_directory(None, "sqlite:///./data/gateway.db") == Path("./data/gateway.db-usage")
    assert journal_directory(None, "sqlite:///:memory:") is None
    assert journal_directory(None, "postgresql://db/gateway") is None
