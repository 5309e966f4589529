"""The local spool: charges the counter store could not take, kept on disk until it does.

Under `fail_open` a request served while Redis is unreachable is charged (and
its usage event recorded) only once Redis answers again; until then its
charge waits in the process. With `usage.spool_dir` it also waits in a file,
so a process killed meanwhile loses nothing: the next process to start on the
same directory replays what the dead one left, in order, under the original
operation ids (so nothing is applied twice while Redis still remembers them).

One file per process, locked while the process lives (see journal.py): an
unlocked file belongs to a dead process. Lines are `A <json>` (a pending
write), `V <json>` (a void: a refused request whose check may still run late
and must charge nothing) and `D <op id>` (applied).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.ledger.events import EventContext
from gateway.quota.gcra import RateLimit
from gateway.quota.journal import DeadFile, dead_files, own_file
from gateway.quota.periods import Period
from gateway.quota.rules import MeterLimit
from gateway.quota.store import Adjustment, ChargeRequest, MeterCharge

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

    @property
    def entries(self) -> int:
        """Writes and voids in the file not applied yet."""
        return self._open

    def add(self, entry: Spooled) -> None:
        """Persist a pending write (flushed to the OS: it survives the process)."""
        self._file.write(f"A {json.dumps(_encode(entry), separators=(',', ':'))}\n")
        self._file.flush()
        self._open += 1

    def void(self, request: ChargeRequest, wall_time: float) -> None:
        """Persist a pending void (see PendingCharges.void)."""
        line = json.dumps(_encode_void(request, wall_time), separators=(",", ":"))
        self._file.write(f"V {line}\n")
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
    voids: list[tuple[float, ChargeRequest]]  # (when spooled, request) pending voids

    @property
    def path(self) -> Path:
        return self.file.path

    def release(self) -> None:
        """Delete the file once its entries are safe in this process's spool."""
        self.file.release()


def orphans(directory: Path) -> list[Orphan]:
    """The spool files of dead processes, oldest first."""
    return [Orphan(dead, *_pending(dead.text)) for dead in dead_files(directory, SPOOL)]


def _pending(text: str) -> tuple[list[Spooled], list[tuple[float, ChargeRequest]]]:
    entries: dict[str, Spooled] = {}
    voids: dict[str, tuple[float, ChargeRequest]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        try:
            if kind == "A":
                entry = _decode(json.loads(rest))
                entries[entry.operation_id] = entry
            elif kind == "V":
                wall_time, request = _decode_void(json.loads(rest))
                voids[request.request_id] = (wall_time, request)
            elif kind == "D":
                entries.pop(rest, None)
                voids.pop(rest, None)
        except (ValueError, KeyError, TypeError):
            # A line cut short by the crash that left this file: it was never acknowledged.
            log.error("unreadable spool line skipped: %r", line[:200])
    return list(entries.values()), list(voids.values())


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


def _period(data: list[str]) -> Period:
    return Period(datetime.fromisoformat(data[0]), datetime.fromisoformat(data[1]))


def _encode_void(request: ChargeRequest, wall_time: float) -> dict[str, Any]:
    return {
        "t": wall_time,
        "op": request.request_id,
        "tenant": request.tenant,
        "meters": [
            [m.limit.meter, m.limit.kind, m.limit.limit, m.limit.hard, list(m.limit.warn_at),
             m.cost, m.needs_remaining,
             [[p.start.isoformat(), p.end.isoformat()] for p in m.periods], list(m.credits)]
            for m in request.meters
        ],
        "rates": [[r.name, r.rate, r.per_s, r.burst, scope] for r, scope in request.rate_limits],
        "ctx": [request.context.route, request.context.method, request.context.request_id,
                request.context.status],
    }  # fmt: skip


def _decode_void(data: dict[str, Any]) -> tuple[float, ChargeRequest]:
    meters = tuple(
        MeterCharge(MeterLimit(str(name), kind, int(limit), bool(hard), tuple(warn_at)),
                    int(cost), bool(needs), tuple(_period(p) for p in periods),
                    tuple(int(c) for c in credits))
        for name, kind, limit, hard, warn_at, cost, needs, periods, credits in data["meters"]
    )  # fmt: skip
    rates = tuple(
        (RateLimit(str(name), int(rate), float(per_s), int(burst)), str(scope))
        for name, rate, per_s, burst, scope in data["rates"]
    )
    route, method, rid, status = data["ctx"]
    context = EventContext(str(route), str(method), str(rid), int(status))
    request = ChargeRequest(str(data["tenant"]), str(data["op"]), meters, rates, context)
    return float(data["t"]), request
