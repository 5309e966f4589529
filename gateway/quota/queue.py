"""A usage queue on another Redis than the counters (`storage.queue`).

With one Redis, the script that charges appends the usage event to its
shard's stream in the same step. With a separate queue the scripts return
their events instead, and the gateway appends them to the same shard stream
on the queue's Redis before it answers the request (calls from concurrent
requests go together in one pipeline). When that Redis cannot take them, or
not within `storage.timeout_ms`, they wait in the process, and with
`usage.spool_dir` also in its journal on disk, and are appended in order when
it is back; later events queue up behind them. A timed-out append that did
land is appended again: the ledger keeps one row per event id.

A counter store restored after losing its data counts, besides the ledger's
totals, what the queue still holds and what waits here (`unrecorded`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gateway.batching import Coalescer
from gateway.ledger.events import tenant_of
from gateway.lifecycle import stop_task
from gateway.metrics import StoreMetrics
from gateway.quota import keyspace
from gateway.quota.journal import JOURNAL, EventJournal, Segment, dead_files, wire_lines
from gateway.quota.store import StoreUnavailable

log = logging.getLogger("gateway.usage")
RETRY_S = 1.0  # how often waiting events try the queue again
CHUNK = 5_000  # events per pipeline when catching up, or per page when reading back
CATCH_UP_TIMEOUT_S = 10.0


class EventQueue:
    """Appends usage events to the shard streams of the queue's Redis."""

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis or RedisCluster
        shards: int,
        timeout_s: float,
        journal: EventJournal | None = None,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self.client = client
        self._metrics = metrics
        self._latency = metrics.duration.labels("queue_append") if metrics is not None else None
        if metrics is not None:
            metrics.queue_waiting.set_function(lambda: len(self))
        self._shards = shards
        self._timeout_s = timeout_s
        self._journal = journal
        self._appends: Coalescer[tuple[str, list[str]], None] = Coalescer(
            self._append, "usage-queue"
        )
        self._waiting: list[tuple[str, str]] = []  # (stream, event) the queue has not taken
        self._sealed: list[Segment] = []
        self._retry: asyncio.Task[None] | None = None

    def adopt(self, directory: Path) -> int:
        """Take over what dead processes' journals hold (appended with the next retry)."""
        adopted = 0
        for dead in dead_files(directory, JOURNAL):
            wires = wire_lines(dead.text)
            for wire in wires:
                try:
                    tenant = tenant_of(wire)
                    self._wait(
                        keyspace.shard_stream(keyspace.shard_of(tenant, self._shards)), [wire]
                    )
                except ValueError:
                    log.error("unreadable journal line skipped in %s: %r", dead.path, wire[:200])
            dead.release()  # only now: its events are in this process's journal
            adopted += len(wires)
            log.warning("%d usage events from %s wait for the queue", len(wires), dead.path)
        return adopted

    def __len__(self) -> int:
        """Events waiting for the queue."""
        return len(self._waiting)

    def put(self, stream: str, wires: list[str]) -> asyncio.Future[None]:
        """Append events to a shard's stream, or keep them for later. The future is done
        once they are in the queue or kept (on disk with a journal); it never fails."""
        if self._waiting:  # the queue is behind: in order, after what waits
            self._wait(stream, wires)
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future
        return self._appends.submit((stream, wires))

    async def _append(self, batch: list[tuple[str, list[str]]]) -> list[None]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._send([(stream, wire) for stream, wires in batch for wire in wires])
        except (RedisError, OSError, TimeoutError) as exc:
            if self._metrics is not None:
                self._metrics.failed("queue_append", exc)
            log.warning("usage queue unreachable (%r); events wait in the process", exc)
            for stream, wires in batch:
                self._wait(stream, wires)
        finally:
            if self._latency is not None:
                self._latency.observe(time.perf_counter() - started)
        return [None] * len(batch)

    async def _send(self, events: Sequence[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for stream, wire in events:
            pipe.xadd(stream, {"e": wire})
        await pipe.execute()

    def _wait(self, stream: str, wires: list[str]) -> None:
        self._waiting += [(stream, wire) for wire in wires]
        if self._journal is not None:
            self._journal.append(wires)
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_waiting(), name="usage-queue-retry")

    async def _retry_waiting(self) -> None:
        while self._waiting:
            await asyncio.sleep(RETRY_S)
            try:
                await self.catch_up()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("usage queue still unreachable (%r); %d events wait", exc,
                            len(self._waiting))  # fmt: skip

    async def catch_up(self) -> None:
        """Append what waits, in order; raises if the queue fails (the rest still waits)."""
        if self._journal is not None and (segment := self._journal.seal()) is not None:
            self._sealed.append(segment)
        while self._waiting:
            chunk = self._waiting[:CHUNK]
            async with asyncio.timeout(CATCH_UP_TIMEOUT_S):
                await self._send(chunk)
            del self._waiting[: len(chunk)]
        for segment in self._sealed:
            EventJournal.discard(segment)
        self._sealed.clear()
        log.info("usage queue caught up")

    async def unrecorded(self, shards: Sequence[int]) -> list[str]:
        """The events of `shards` in the queue's streams (the ledger may hold some of them
        already) and those still waiting here."""
        found, streams = [], {keyspace.shard_stream(shard) for shard in shards}
        for stream in sorted(streams):
            start = "-"
            while True:
                try:
                    page = await self.client.xrange(stream, min=start, count=CHUNK)
                except (RedisError, OSError) as exc:
                    # Restoring without them could hand out what they charged again.
                    raise StoreUnavailable(f"usage queue unreachable: {exc!r}") from exc
                found += [fields[b"e"].decode() for _, fields in page if b"e" in fields]
                if len(page) < CHUNK:
                    break
                start = "(" + page[-1][0].decode()
        return found + [wire for stream, wire in self._waiting if stream in streams]

    async def close(self) -> None:
        """Append what waits if the queue takes it; otherwise it stays in the journal."""
        await stop_task(self._retry)
        await self._appends.drain()
        if self._waiting:
            try:
                await self.catch_up()
            except (RedisError, OSError, TimeoutError) as exc:
                log.error("usage queue unreachable at shutdown (%r): %d events %s", exc,
                          len(self._waiting), "left in the journal" if self._journal
                          else "lost (set usage.spool_dir to keep them)")  # fmt: skip
        if self._journal is not None:
            if not self._waiting:
                self._sealed += filter(None, [self._journal.seal()])
                for segment in self._sealed:
                    EventJournal.discard(segment)
                self._sealed.clear()
            self._journal.close(self._sealed)
