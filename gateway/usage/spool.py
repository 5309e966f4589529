"""The local spool: charges the counter store could not take, kept on disk until it does.

Under `fail_open` a request served while Redis is unreachable is charged (and
its usage event recorded) only once Redis answers again; until then its
charge waits in the process. With `usage.spool_dir` it also waits in a file,
so a process killed meanwhile loses nothing: the next process to start on the
same directory replays what the dead one left, in order, under the original
operation ids (so nothing is applied twice while Redis still remembers them).

One file per process, locked while the process lives: an unlocked file
belongs to a dead process. Lines are `A <json>` (pending) and `D <op id>` (applied).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from gateway.quota.periods import Period
from gateway.quota.store import Adjustment
from gateway.usage.events import EventContext

log = logging.getLogger("gateway.usage")


@dataclass(frozen=True, slots=True)
class Spooled:
    wall_time: float  # when it was first spooled (time.time())
    operation_id: str
    tenant: str
    adjustments: list[Adjustment]
    context: EventContext


class Spool:
    """This process's spool file."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"spool-{os.getpid()}-{time.time_ns()}.log"
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._open = 0  # entries added and not done

    def add(self, entry: Spooled) -> None:
        """Persist a pending write (flushed to the OS: it survives the process)."""
        self._file.write(f"A {json.dumps(_encode(entry), separators=(',', ':'))}\n")
        self._file.flush()
        self._open += 1

    def done(self, operation_id: str) -> None:
        self._file.write(f"D {operation_id}\n")
        self._file.flush()
        self._open -= 1

    def close(self) -> None:
        """Close; the file goes when nothing in it is pending, else the next start replays it."""
        self._file.close()
        if self._open <= 0:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%d spooled charges left in %s for the next start", self._open, self.path)


@dataclass
class Orphan:
    """A dead process's spool file, locked by this process until `release`."""

    path: Path
    entries: list[Spooled]  # pending, in the order they were spooled
    _handle: IO[str]

    def release(self) -> None:
        """Delete the file once its entries are safe in this process's spool."""
        self.path.unlink(missing_ok=True)
        self._handle.close()


def orphans(directory: Path) -> list[Orphan]:
    """The spool files of dead processes, oldest first (a live process holds its lock)."""
    found = []
    for path in sorted(directory.glob("spool-*.log"), key=lambda p: p.stat().st_mtime):
        handle = path.open("r", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process's
            handle.close()
            continue
        found.append(Orphan(path, _pending(handle.read()), handle))
    return found


def _pending(text: str) -> list[Spooled]:
    entries: dict[str, Spooled] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        try:
            if kind == "A":
                entry = _decode(json.loads(rest))
                entries[entry.operation_id] = entry
            elif kind == "D":
                entries.pop(rest, None)
        except (ValueError, KeyError, TypeError):
            # A line cut short by the crash that left this file: it was never acknowledged.
            log.error("unreadable spool line skipped: %r", line[:200])
    return list(entries.values())


def _encode(entry: Spooled) -> dict[str, Any]:
    return {
        "t": entry.wall_time,
        "op": entry.operation_id,
        "tenant": entry.tenant,
        "adj": [
            [m, p.start.isoformat() if p else None, p.end.isoformat() if p else None, d]
            for m, p, d in entry.adjustments
        ],
        "ctx": [
            entry.context.route,
            entry.context.method,
            entry.context.request_id,
            entry.context.status,
        ],  # fmt: skip
    }


def _decode(data: dict[str, Any]) -> Spooled:
    adjustments: list[Adjustment] = [
        (str(m), Period(datetime.fromisoformat(s), datetime.fromisoformat(e)) if s else None,
         int(d))
        for m, s, e, d in data["adj"]
    ]  # fmt: skip
    route, method, rid, status = data["ctx"]
    return Spooled(float(data["t"]), str(data["op"]), str(data["tenant"]), adjustments,
                   EventContext(str(route), str(method), str(rid), int(status)))  # fmt: skip
