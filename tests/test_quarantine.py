"""Usage entries the ledger refuses for good are quarantined, counted and replayable; every
entry after them is still written, and a start never fails on one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.clock import to_us
from gateway.ledger.events import UsageEvent
from gateway.ledger.store import Ledger
from gateway.ledger.usage_ledger import UsageLedger, Written
from gateway.metrics import WorkerMetrics
from gateway.quota import keyspace
from gateway.quota.journal import JOURNAL
from gateway.usage.quarantine import (
    LedgerRefused,
    Quarantine,
    QuarantineMetrics,
    write_isolating,
)
from gateway.usage.recorder import Recorder, replay_journals
from gateway.usage.streams import UsageStreams
from gateway.usage.worker import Settings, Worker
from tests.conftest import gateway_config
from tests.procs import write_config
from tests.servers import RedisServer

NOW = datetime.now(UTC)
MONTH = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
POISON = 2**63  # fits no ledger's integer column


def event(n: int, quantity: int = 1, tenant: str = "acme") -> UsageEvent:
    return UsageEvent(f"e{n}", tenant, "calls", quantity, to_us(NOW) + n, to_us(MONTH), "charge")


async def total(ledger: Ledger) -> int:
    return await UsageLedger(ledger.db).total("acme", "calls", MONTH)


async def test_isolating_keeps_the_good_and_tells_a_poisoned_batch_from_a_broken_ledger() -> None:
    async def write(items: Sequence[int]) -> Written:
        if 13 in items:
            raise ValueError("13 is refused")
        return Written(len(items), 0)

    isolated = await write_isolating(write, list(range(40)))
    assert isolated.written == Written(39, 0)
    assert isolated.refused == [(13, "ValueError: 13 is refused")]

    async def broken(items: Sequence[int]) -> Written:
        raise RuntimeError("permission denied for table usage_events")

    with pytest.raises(LedgerRefused):  # nothing went in: nothing is quarantined
        await write_isolating(broken, list(range(40)))
    with pytest.raises(LedgerRefused):  # a single entry: not at its first failure
        await write_isolating(broken, [1])
    alone = await write_isolating(broken, [1], single_failures=2)
    assert [item for item, _ in alone.refused] == [1]


async def test_the_recorder_writes_past_an_entry_the_ledger_refuses(ledger: Ledger) -> None:
    registry = CollectorRegistry()
    metrics = QuarantineMetrics(registry)
    quarantine = Quarantine(ledger.db, "recorder", metrics)
    events = [event(1), event(2, POISON), event(3)]
    recorder = Recorder(events, UsageLedger(ledger.db), 0.01, quarantine=quarantine)
    await recorder.flush()
    assert events == [] and await total(ledger) == 2
    held = await quarantine.entries()
    assert [(q.source, q.line) for q in held] == [("recorder", event(2, POISON).encode())]
    assert "OverflowError" in held[0].error or "out of" in held[0].error
    assert (
        registry.get_sample_value("gateway_usage_quarantined_events_total", {"source": "recorder"})
        == 1
    )
    events.append(event(4))  # and it keeps going
    await recorder.flush()
    assert await total(ledger) == 3


async def test_a_journal_with_a_refused_and_an_unreadable_line_replays_the_rest(
    ledger: Ledger, tmp_path: Path
) -> None:
    lines = [event(1).encode(), "garbage\x1fline", event(2, POISON).encode(), event(3).encode()]
    (tmp_path / f"{JOURNAL}-dead.log").write_text("".join(f"{line}\n" for line in lines))
    assert await replay_journals(tmp_path, UsageLedger(ledger.db)) == 2
    assert await total(ledger) == 2
    held = await Quarantine(ledger.db, "journal").entries()
    assert sorted(q.line for q in held) == sorted([lines[1], lines[2]])
    assert {q.source for q in held} == {"journal"}


async def test_the_worker_quarantines_and_acknowledges_what_it_cannot_write(
    redis_server: RedisServer, pg_ledger: tuple[str, Ledger]
) -> None:
    _, ledger = pg_ledger
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        streams = UsageStreams(client, 4, "w1")
        registry = CollectorRegistry()
        quarantine = Quarantine(ledger.db, "worker", QuarantineMetrics(registry))
        worker = Worker(streams, UsageLedger(ledger.db), WorkerMetrics(registry),
                        Settings(idle_sleep_s=0.01), quarantine)  # fmt: skip
        await streams.ensure_groups()
        stream = keyspace.shard_stream(keyspace.shard_of("acme", 4))
        raws = [event(1).encode(), "not an event", event(2, POISON).encode(), event(3).encode()]
        for raw in raws:
            await client.xadd(stream, {"e": raw})
        assert await worker.round(pending=False) == 4
        assert await total(ledger) == 2
        held = await quarantine.entries()
        assert sorted(q.line for q in held) == sorted([raws[1], raws[2]])
        assert await streams.lag(keyspace.shard_of("acme", 4)) == 0  # all acknowledged
        assert (
            registry.get_sample_value(
                "gateway_usage_quarantined_events_total", {"source": "worker"}
            )
            == 2
        )
    finally:
        await client.aclose()


async def test_the_quarantine_command_replays_what_the_ledger_takes_now(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = await Ledger.open(url)
    await ledger.migrate()
    quarantine = Quarantine(ledger.db, "worker")
    await quarantine.put([event(7).encode()], "refused while a migration was half done")
    await quarantine.put([event(8, POISON).encode()], "OverflowError")
    await ledger.close()
    config = write_config(tmp_path / "gateway.yaml", gateway_config("http://127.0.0.1:1",
                          storage={"ledger": url}))  # fmt: skip
    command = [sys.executable, "-m", "gateway", "quarantine", "-c", str(config)]
    listed = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 1 and "2 quarantined, 0 written now, 2 kept" in listed.stdout
    replayed = await asyncio.to_thread(
        subprocess.run, [*command, "--replay"], capture_output=True, text=True, timeout=60
    )
    assert replayed.returncode == 1, replayed.stderr
    assert "2 quarantined, 1 written now, 1 kept" in replayed.stdout
    ledger = await Ledger.open(url)
    try:
        assert await total(ledger) == 1
        assert [q.line for q in await Quarantine(ledger.db, "x").entries()] == [
            event(8, POISON).encode()
        ]
    finally:
        await ledger.close()
