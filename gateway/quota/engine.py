"""Quotas on the request path: check through the store, apply the failure policy, settle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.clock import Clock, utc_now
from gateway.config.models import GatewayConfig
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.events import EventContext
from gateway.ledger.records import Tenant
from gateway.lifecycle import stop_task
from gateway.metrics import QuotaMetrics
from gateway.quota.pending import PendingCharges
from gateway.quota.periods import Period, meter_period
from gateway.quota.plan import Costs
from gateway.quota.policy import Policies, RouteCharges
from gateway.quota.rules import Decision
from gateway.quota.spool import Spool, orphans
from gateway.quota.store import (
    Adjustment,
    ChargeRequest,
    ChargeResult,
    CounterStore,
    StoreLost,
    StoreUnavailable,
    plan_of,
)
from gateway.quota.tally import DecisionTally, Tallies

log = logging.getLogger("gateway.quota")
Restorer = Callable[[Sequence[int]], Awaitable[None]]  # rebuilds lost shards from the ledger
RETRY_PENDING_S = 1.0


@dataclass(frozen=True, slots=True)
class Charged:
    """What a forwarded request was charged, for settling it."""

    tenant: str
    operation_id: str  # the charge's request id; settlement writes derive from it
    costs: Costs  # meter -> (period, cost) charged (read only: may be its plan's)
    response_periods: dict[str, Period | None]  # meters to charge from the response
    route: RouteCharges
    context: EventContext  # for the usage events of its settlement


def succeeded(status: int) -> bool:
    """A response that did what was asked: 2xx, 3xx, or a switch to WebSocket."""
    return 200 <= status < 400 or status == 101


def kept(status: int, charge_on: str) -> bool:
    """Whether a charge stands for a response status (`charge_on`)."""
    if charge_on == "always":
        return True
    if charge_on == "not_server_error":
        return status < 500
    return succeeded(status)


class SignalSink(Protocol):
    """Whoever wants to hear what an allowed charge says about its tenant (signals)."""

    def saw(self, request: ChargeRequest, result: ChargeResult) -> None: ...


class RefusalSink(Protocol):
    """Whoever counts the quota and rate-limit refusals (the console shows them)."""

    def refused(self, tenant: str, status: int, name: str) -> None: ...


class QuotaEngine:
    """Turns a config into per-request charges against one counter store."""

    def __init__(
        self,
        config: GatewayConfig,
        store: CounterStore,
        restorer: Restorer | None = None,
        metrics: QuotaMetrics | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._restorer = restorer
        self._restoring: asyncio.Task[None] | None = None
        self._lost: set[int] = set()
        self.fail_open = config.storage.on_counter_store_error == "fail_open"
        spool_dir = config.usage.spool_dir
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        dropped = metrics.pending_dropped.inc if metrics is not None else None
        self.pending = PendingCharges(spool=self._spool, on_dropped=dropped)
        tallies = Tallies(metrics) if metrics is not None else None
        self._tallies = tallies
        self._tenant_tallies = tallies.tenants if tallies is not None else None
        if metrics is not None:
            metrics.pending.set_function(lambda: len(self.pending))
            spool = self._spool
            metrics.spooled.set_function(lambda: spool.entries if spool is not None else 0)
        self._retry_task: asyncio.Task[None] | None = None
        self._closing = False
        self.signals: SignalSink | None = None  # set by the application that has a ledger
        self.refusals: RefusalSink | None = None  # likewise

    def policies_for(self, config: GatewayConfig) -> Policies:
        """The quota side of `config` (the start's, then each reload's), counted on this
        engine's metrics; requests pass theirs to each call (the engine keeps none)."""
        return Policies(config, self.clock, self._tallies)

    def request(
        self, policies: Policies, tenant: Tenant, route: RouteCharges, context: EventContext
    ) -> ChargeRequest | None:
        """The charge request of a request on a route, or None if nothing is checked."""
        prepared = self.prepared(policies, tenant, route, context)
        return prepared[0] if prepared is not None else None

    def prepared(
        self, policies: Policies, tenant: Tenant, route: RouteCharges, context: EventContext
    ) -> tuple[ChargeRequest, DecisionTally | None] | None:
        """The charge request and where its decision is counted; None: nothing is checked."""
        compiled = policies.charge_plan(tenant, route, context.route)
        plan = compiled.plan
        if plan is None:
            return None
        # A fresh id per request: the store's memo makes a retry of this call
        # idempotent, and a client's X-Request-Id may repeat.
        request_id = fresh_id()
        request = ChargeRequest(
            plan.tenant, request_id, plan.meters, plan.rate_limits, context, plan
        )
        return request, compiled.tally

    def decided(
        self, tally: DecisionTally | None, tenant: str, decision: Decision, shadow: bool
    ) -> None:
        """Count what the store decided, per meter (and per tenant when asked)."""
        if tally is not None:
            tally.decided(decision, shadow)
            if self._tenant_tallies is not None:
                self._tenant_tallies.tally(tenant, tally.meters).decided(decision, shadow)

    def failed(self, tally: DecisionTally | None, tenant: str) -> None:
        """Count a check the store did not answer: `fail_open` or `fail_closed`."""
        if tally is not None:
            outcome = "fail_open" if self.fail_open else "fail_closed"
            tally.count(outcome)
            if self._tenant_tallies is not None:
                self._tenant_tallies.tally(tenant, tally.meters).count(outcome)

    async def check(self, request: ChargeRequest) -> ChargeResult:
        """The store's decision; StoreUnavailable is the caller's to handle."""
        try:
            result = await self.store.check_and_charge(request)
        except StoreLost as exc:
            self._schedule_restore(exc.shard)
            raise
        # Answered: nothing is sent under this id again (a shadow charge has its own),
        # so its memo need not wait out its TTL in the store (Redis: ~190 B a request).
        self.store.forget(request.tenant, request.request_id)
        return result

    async def prepare(self) -> None:
        """Before serving: restore the shards the store lost (a new process's memory
        store, an emptied Redis); if that fails, the first request on each tries again."""
        self._adopt_spools()
        try:
            lost = await self.store.lost()
        except StoreUnavailable as exc:
            log.warning("counter store unreachable at start (%s)", exc)
            return
        for shard in lost:
            self._schedule_restore(shard)
        if self._restoring is not None:
            await asyncio.shield(self._restoring)

    def _adopt_spools(self) -> None:
        """Take over what dead processes left in the spool directory, in order."""
        directory = self.config.usage.spool_dir
        if directory is None:
            return
        for orphan in orphans(directory):
            for wall_time, request in orphan.voids:
                self.pending.void(request, wall_time)
            for entry in orphan.entries:
                self.pending.add(entry.operation_id, entry.tenant, entry.adjustments,
                                 entry.context, wall_time=entry.wall_time)  # fmt: skip
            orphan.release()
            if orphan.entries or orphan.voids:
                log.warning("replaying %d spooled charges and %d voids left in %s",
                            len(orphan.entries), len(orphan.voids), orphan.path)  # fmt: skip
        if len(self.pending):
            self._schedule_retry()

    def _schedule_restore(self, shard: int) -> None:
        # Closed: a request still in flight must not start a task that outlives the engine.
        if self._restorer is None or self._closing:
            return
        self._lost.add(shard)
        if self._restoring is None or self._restoring.done():
            self._restoring = asyncio.create_task(self._restore(), name="quota-restore")

    async def _restore(self) -> None:
        assert self._restorer is not None
        while self._lost and not self._closing:
            shards = sorted(self._lost)
            try:
                await self._restorer(shards)
            except (StoreUnavailable, LedgerUnavailable) as exc:
                log.warning("restoring counter store shards failed (%s); retrying", exc)
                await asyncio.sleep(RETRY_PENDING_S)
                continue
            except Exception:
                # Not an outage we know, yet giving up would leave the shards lost
                # (every request refused or unchecked) until a restart.
                log.exception("restoring counter store shards %s failed; retrying", shards)
                await asyncio.sleep(RETRY_PENDING_S)
                continue
            self._lost.difference_update(shards)
            # Charges still waiting (spooled under fail_open) go in right behind the
            # restored totals, not a retry interval later.
            if len(self.pending):
                with contextlib.suppress(StoreUnavailable):
                    await self.pending.flush(self.store)

    def charged(
        self,
        policies: Policies,
        tenant: Tenant,
        route: RouteCharges,
        request: ChargeRequest | None,
        result: ChargeResult | None,
        context: EventContext,
    ) -> Charged:
        """What to settle later; `result` None when the store was down (fail_open)."""
        periods = result.periods if result is not None else {}
        costs = plan_of(request).charged_costs(periods) if request is not None else {}
        response_periods: dict[str, Period | None] = {}
        if route.from_response:
            now = self.clock()
            for meter in route.from_response:
                response_periods[meter] = periods.get(meter) or meter_period(
                    policies.meters[meter], now, tenant.billing_anchor
                )
        operation_id = request.request_id if request is not None else fresh_id()
        return Charged(tenant.id, operation_id, costs, response_periods, route, context)

    def void(self, request: ChargeRequest) -> None:
        """fail_closed after a failed check: undo it if it ran, or stop it from running."""
        self.pending.void(request)
        self._schedule_retry()

    def spool(self, charged: Charged) -> None:
        """fail_open: apply the charges when the store is back, under the request's own
        id, so that a check_and_charge which did run after its timeout is not doubled."""
        adjustments = [(m, p, cost) for m, (p, cost) in charged.costs.items()]
        self.pending.add(charged.operation_id, charged.tenant, adjustments, charged.context)
        if self.metrics is not None:
            self.metrics.held.inc()
        self._schedule_retry()

    async def settle(self, charged: Charged, status: int, headers: Mapping[str, str]) -> None:
        """After the response: refunds, negative gauge deltas, response-derived charges."""
        adjustments: list[Adjustment] = []
        if kept(status, charged.route.keep) and not succeeded(status):
            # A gauge is a level, not a charge: a member the upstream did not
            # add must not be counted, whatever charge_on keeps of the counters.
            gauges = charged.route.gauges
            adjustments += [(m, p, -cost) for m, (p, cost) in charged.costs.items() if m in gauges]
        if kept(status, charged.route.keep):
            for meter, header in charged.route.from_response.items():
                quantity = _quantity(headers.get(header))
                if quantity:
                    adjustments.append((meter, charged.response_periods[meter], quantity))
            if succeeded(status):
                # A gauge goes down only once the upstream did what lowers it.
                adjustments += [(m, None, d) for m, d in charged.route.after_success.items()]
        else:
            adjustments += [(m, p, -cost) for m, (p, cost) in charged.costs.items()]
        if adjustments:
            context = replace(charged.context, status=status)
            await self._apply(
                f"{charged.operation_id}:settle", charged.tenant, adjustments, context
            )

    async def charge_anyway(self, charged: Charged) -> None:
        """Shadow mode: charge what the store refused to, since it is served."""
        adjustments = [(m, p, c) for m, (p, c) in charged.costs.items()]
        await self._apply(
            f"{charged.operation_id}:shadow", charged.tenant, adjustments, charged.context
        )

    async def _apply(
        self, operation_id: str, tenant: str, adjustments: list[Adjustment], context: EventContext
    ) -> None:
        # One adjustment per meter and period: an event id is the operation's and the meter's.
        merged: dict[tuple[str, Period | None], int] = {}
        for meter, period, delta in adjustments:
            merged[meter, period] = merged.get((meter, period), 0) + delta
        adjustments = [(m, p, d) for (m, p), d in merged.items() if d]
        if not adjustments:
            return
        try:
            await self.store.apply_once(tenant, operation_id, adjustments, context)
        except StoreUnavailable as exc:
            if isinstance(exc, StoreLost):
                self._schedule_restore(exc.shard)
            self.pending.add(operation_id, tenant, adjustments, context)
            self._schedule_retry()
            return
        # Answered at the first try: never retried (a pending write keeps its memo, as
        # a spool replayed after a crash may send it again).
        self.store.forget(tenant, operation_id)

    def _schedule_retry(self) -> None:
        if self._closing:  # what is pending stays in the spool for the next process
            return
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_pending(), name="quota-pending")

    async def _retry_pending(self) -> None:
        while len(self.pending) and not self._closing:
            try:
                await self.pending.flush(self.store)
            except StoreUnavailable as exc:
                if isinstance(exc, StoreLost):
                    self._schedule_restore(exc.shard)
                await asyncio.sleep(RETRY_PENDING_S)

    async def close(self) -> None:
        self._closing = True
        await stop_task(self._retry_task)
        await stop_task(self._restoring)
        if len(self.pending):
            log.warning("%d pending charge(s) could not reach the counter store", len(self.pending))
        if self._spool is not None:
            self._spool.close()
        await self.store.close()


_IDS_PER_DRAW = 256
_fresh_ids: list[str] = []
# A forked child must not hand out its parent's ids still in the list.
os.register_at_fork(after_in_child=_fresh_ids.clear)


def fresh_id() -> str:
    """A new random id (128 bits, hex) from the OS's CSPRNG, drawn for many at once:
    one system call per `_IDS_PER_DRAW` requests instead of one each."""
    if not _fresh_ids:
        drawn = os.urandom(16 * _IDS_PER_DRAW).hex()
        _fresh_ids.extend(drawn[i : i + 32] for i in range(0, len(drawn), 32))
    return _fresh_ids.pop()


def _quantity(value: str | None) -> int:
    """A response header's quantity; anything but a non-negative integer counts as 0."""
    if value is None:
        return 0
    try:
        quantity = int(value.strip())
    except ValueError:
        log.warning("response quantity %r is not an integer; charged 0", value)
        return 0
    return max(0, quantity)
