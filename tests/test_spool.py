"""The local spool: what a dead process left is found, in order, and nothing twice."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.ledger.events import EventContext
from gateway.quota.gcra import RateLimit
from gateway.quota.memory import MemoryStore
from gateway.quota.pending import PendingCharges
from gateway.quota.periods import period_of, periods_around
from gateway.quota.rules import MeterLimit
from gateway.quota.spool import Spool, Spooled, orphans
from gateway.quota.store import ChargeRequest, MeterCharge
from tests.conftest import whole

PERIOD = period_of("month", datetime(2026, 11, 21, tzinfo=UTC))


def entry(n: int) -> Spooled:
    adjustments = [("api_calls", PERIOD, 1), ("team_members", None, -1)]
    return Spooled(time.time(), f"op-{n}", "acme", adjustments, EventContext("api", "GET", "r"))


def test_a_dead_process_leaves_its_pending_entries_for_the_next(tmp_path: Path) -> None:
    dead = Spool(tmp_path)
    for n in range(3):
        dead.add(entry(n))
    dead.done("op-1")
    live = Spool(tmp_path)
    live.add(entry(9))
    dead._file.write('A {"t": 1, "op": "op-cut')  # the line the crash cut short
    dead._file.close()  # killed: the lock goes with the process, the file stays
    found = orphans(tmp_path)
    assert [(o.path, [e.operation_id for e in o.entries]) for o in found] == [
        (dead.path, ["op-0", "op-2"])
    ]  # the live process's file is not an orphan
    assert found[0].entries[0] == Spooled(
        found[0].entries[0].wall_time, "op-0", "acme", entry(0).adjustments, entry(0).context
    )
    found[0].release()
    assert not dead.path.exists() and orphans(tmp_path) == []
    live.done("op-9")
    live.close()
    assert list(tmp_path.iterdir()) == []  # nothing pending: the file goes


def test_a_spool_closed_with_pending_entries_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.add(entry(1))
    spool.close()
    found = orphans(tmp_path)
    assert [[e.operation_id for e in o.entries] for o in found] == [["op-1"]]
    found[0].release()


async def test_a_void_left_by_a_dead_process_still_undoes_its_late_check(tmp_path: Path) -> None:
    store = await whole(MemoryStore())
    meter = MeterCharge(
        MeterLimit("api_calls", "counter", 5),
        cost=1,
        periods=periods_around("month", datetime.now(UTC)),
        credits=(0, 2, 0),
    )
    rate = (RateLimit("per_second", 5, 1.0, 5), "api")
    request = ChargeRequest("acme", "op-void", (meter,), (rate,), EventContext("api", "GET", "r"))
    dead = Spool(tmp_path)
    PendingCharges(spool=dead).void(request)  # its check timed out; the client got a 503
    dead._file.close()  # killed before the void reached the store
    assert (await store.check_and_charge(request)).decision.allowed  # the check ran late
    assert await store.level("acme", "api_calls", meter.periods[1]) == 1
    (orphan,) = orphans(tmp_path)
    assert [r for _, r in orphan.voids] == [request]  # read back whole
    spool = Spool(tmp_path / "next")
    pending = PendingCharges(spool=spool)
    for wall_time, found in orphan.voids:
        pending.void(found, wall_time)
    orphan.release()
    await pending.flush(store)
    assert await store.level("acme", "api_calls", meter.periods[1]) == 0
    assert len(pending) == 0
    spool.close()
    assert list((tmp_path / "next").iterdir()) == []  # the void is done: nothing left
