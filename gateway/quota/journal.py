"""Usage events kept on disk until they are safe in the ledger or the queue.

A process appends each event's wire form to its own segment file as the
charge is made, and flushes it to the operating system at once: a process
killed with SIGKILL loses nothing the kernel already holds. A segment is
sealed when what it holds is about to be written onward, and deleted once
that write succeeded; a write that fails leaves it for the next try, or, if
the process dies, for the next process to start on the same directory.
Replaying a segment twice is harmless: an event's id makes it one row.

Every file here (journal segments and the spool's files) is locked by the
process that writes it for as long as that process lives, so an unlocked
file belongs to a dead process and is the next process's to take over.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("gateway.usage")
JOURNAL = "events"  # the segments' file name prefix


def own_file(directory: Path, prefix: str) -> tuple[Path, IO[str]]:
    """A new file for this process alone, opened for appending and locked."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}-{os.getpid()}-{time.time_ns()}.log"
    handle = path.open("a", encoding="utf-8")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, handle


@dataclass
class DeadFile:
    """A dead process's file, locked by this process until `release`."""

    path: Path
    text: str
    _handle: IO[str] = field(repr=False)

    def release(self) -> None:
        """Delete the file once what it held is safe elsewhere."""
        self.path.unlink(missing_ok=True)
        self._handle.close()


def dead_files(directory: Path, prefix: str) -> list[DeadFile]:
    """The files of dead processes, oldest first (a live process holds its files' locks)."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob(f"{prefix}-*.log"), key=lambda p: p.stat().st_mtime):
        handle = path.open("r", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process's
            handle.close()
            continue
        found.append(DeadFile(path, handle.read(), handle))
    return found


def wire_lines(text: str) -> list[str]:
    """The events of a segment; a last line cut short by a crash is left out."""
    lines = text.split("\n")
    # Every complete line ends with a newline, so the last piece is "" unless cut short.
    if lines[-1]:
        log.error("incomplete journal line skipped: %r", lines[-1][:200])
    return [line for line in lines[:-1] if line]


@dataclass
class Segment:
    path: Path
    handle: IO[str] = field(repr=False)
    events: int = 0


class EventJournal:
    """This process's segments in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._current: Segment | None = None

    def append(self, wires: Iterable[str]) -> None:
        """Write events (wire forms) and hand them to the operating system."""
        if self._current is None:
            self._current = Segment(*own_file(self.directory, JOURNAL))
        segment = self._current
        for wire in wires:
            segment.handle.write(wire)
            segment.handle.write("\n")
            segment.events += 1
        segment.handle.flush()

    def seal(self) -> Segment | None:
        """End the current segment (None if it holds nothing): the next event starts another."""
        segment, self._current = self._current, None
        return segment

    @staticmethod
    def discard(segment: Segment) -> None:
        """Delete a sealed segment whose events are safe."""
        segment.path.unlink(missing_ok=True)
        segment.handle.close()

    def close(self, sealed: Iterable[Segment] = ()) -> None:
        """Unlock everything; files still holding unsaved events stay for the next start."""
        segments = [*sealed, *([self._current] if self._current else [])]
        self._current = None
        for segment in segments:
            segment.handle.close()
        if segments:
            log.warning("%d usage events left in %s for the next start",
                        sum(s.events for s in segments), self.directory)  # fmt: skip
