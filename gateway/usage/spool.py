"""The local spool: charges the counter store could not take, kept on disk until it does.

Under `fail_open` a request served while Redis is unreachable is charged (and
its usage event recorded) only once Redis answers again; until then its
charge waits in the process. With `usage.spool_dir` it also waits in a file,
so a process killed meanwhile loses nothing: the next process to start on the
same directory replays what the dead one left, in order, under the original
operation ids (so nothing is applied twice while Redis still remembers them).

One file per process, locked while the process lives (see journal.py): an
unlocked file belongs to a dead process. Lines are `A <json>` (pending) and
`D <op id>` (applied).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.quota.periods import Period
from gateway.quota.store import Adjustment
from gateway.usage.events import EventContext
from gateway.usage.journal import DeadFile, dead_files, own_file

log = logging.getLogger("gateway.usage")
SPOOL = "spool"  # the files' name prefix


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
        self.path, self._file = own_file(directory, SPOOL)
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

    file: DeadFile
    entries: list[Spooled]  # pending, in the order they were spooled

    @property
    def path(self) -> Path:
        return self.file.path

    def release(self) -> None:
        """Delete the file once its entries are safe in this process's spool."""
        self.file.release()


def orphans(directory: Path) -> list[Orphan]:
    """The spool files of dead processes, oldest first."""
    return [Orphan(dead, _pending(dead.text)) for dead in dead_files(directory, SPOOL)]


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
