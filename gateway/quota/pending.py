"""Counter-store writes that could not be made yet, retried under their operation ids."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.ledger.events import EventContext
from gateway.quota import keyspace
from gateway.quota.spool import Spool, Spooled
from gateway.quota.store import Adjustment, ChargeRequest, CounterStore

log = logging.getLogger("gateway.quota")


class PendingCharges:
    """Writes the store could not take (fail_open, or a failed settlement), retried.

    Each carries its operation id, so a write that did reach the store before
    its call timed out is not applied twice. With a spool, writes and voids
    (refused requests whose late check must charge nothing) are also on disk
    until applied, and a crash loses none of them.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        spool: Spool | None = None,
        on_dropped: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._spool = spool
        self._on_dropped = on_dropped  # counts a write given up (a metric)
        self._pending: dict[str, tuple[float, str, list[Adjustment], EventContext]] = {}
        self._voids: dict[str, tuple[float, ChargeRequest]] = {}

    def void(self, request: ChargeRequest, wall_time: float | None = None) -> None:
        wall = time.time() if wall_time is None else wall_time
        self._voids[request.request_id] = (self._monotonic(wall), request)
        if self._spool is not None:
            self._spool.void(request, wall)

    def add(
        self,
        operation_id: str,
        tenant: str,
        adjustments: list[Adjustment],
        context: EventContext,
        wall_time: float | None = None,  # when first spooled, for one adopted from a file
    ) -> None:
        wall = time.time() if wall_time is None else wall_time
        self._pending[operation_id] = (self._monotonic(wall), tenant, adjustments, context)
        if self._spool is not None:
            self._spool.add(Spooled(wall, operation_id, tenant, adjustments, context))

    def _monotonic(self, wall_time: float) -> float:
        """A wall-clock time (from a spool file, perhaps another process's) on `clock`."""
        return self._clock() - (time.time() - wall_time)

    def __len__(self) -> int:
        return len(self._pending) + len(self._voids)

    async def flush(self, store: CounterStore) -> None:
        """Apply what is pending; stops at the first failure (the rest stays)."""
        self._expire()
        for request_id in list(self._voids):
            await store.void(self._voids[request_id][1])
            del self._voids[request_id]
            if self._spool is not None:
                self._spool.done(request_id)
        for operation_id in list(self._pending):
            _, tenant, adjustments, context = self._pending[operation_id]
            await store.apply_once(tenant, operation_id, adjustments, context)
            del self._pending[operation_id]
            if self._spool is not None:
                self._spool.done(operation_id)

    def _expire(self) -> None:
        # Past the store's memory of operation ids, a retry could count twice
        # (or a void find nothing to undo): drop them and say so, which keeps
        # the stated bound instead of a silent wrong count.
        oldest = self._clock() - keyspace.MEMO_TTL_MS / 1000
        for table in (self._pending, self._voids):
            for operation_id in [op for op, entry in table.items() if entry[0] < oldest]:
                del table[operation_id]
                if self._on_dropped is not None:
                    self._on_dropped()
                if self._spool is not None:
                    self._spool.done(operation_id)
                log.error("dropped pending counter-store write %s after %ds", operation_id,
                          keyspace.MEMO_TTL_MS // 1000)  # fmt: skip
