"""The Stripe reporter of `gateway worker`: ledger rollups -> outbox rows -> meter events.

Each round turns the rollups' changes into outbox rows (stored before they are
sent), leases the tenant/meter groups with rows due, sends each group's rows
in order (v1: one event a call; v2: the heads of up to 100 groups a call on
the meter event stream), and marks them sent. A failure leaves the row
pending with a jittered backoff kept in the ledger; a refusal marks it
rejected. A row whose first send is older than Stripe's dedupe window is
resent only once the meter's summary shows it missing. It runs beside the
ledger writer, on its own task, and never touches the proxy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from gateway.billing.outbox import EXPIRED, REJECTED, SENT, Outbox, OutboxRow
from gateway.billing.rules import (
    STRIPE_PAST,
    V2_EVENTS_PER_REQUEST,
    backoff_s,
    dedupe_trusted,
    sendable,
    summary_window,
)
from gateway.billing.stripe_api import ErrorReports, Meter, SendFailure, StripeAPI
from gateway.config.models import StripeConfig
from gateway.ledger.db import LedgerUnavailable
from gateway.lifecycle import Rounds
from gateway.metrics import StripeMetrics

log = logging.getLogger("gateway.billing")

GROUPS_PER_ROUND = 1000
V1_CONCURRENCY = 8  # groups sent at once (each group one call at a time)
METERS_REFRESH_S = 300.0
MISSING_METER_RETRY_S = 300.0
AMBIGUOUS_RETRY_S = 3600.0
# Rows sent this long before an error report's validation window (and after it) may be
# among its refusals: Stripe validates shortly after accepting, on its own clock.
RECHECK_BEFORE = timedelta(hours=1)
RECHECK_AFTER = timedelta(minutes=5)
# Periods older than this cannot take a report any more (35 days + the longest period).
PLAN_HORIZON = STRIPE_PAST + timedelta(days=31)


def unique_holder(name: str) -> str:
    """A lease holder no other process has: two workers may be given one consumer name
    (the hostname by default, and one for every embedded `serve` process)."""
    host = socket.gethostname()
    where = name if name == host else f"{name}@{host}"
    return f"{where}:{os.getpid()}:{secrets.token_hex(4)}"


class Reporter(Rounds):
    """One sender among possibly several worker processes (`name` says which; each
    reporter holds leases under a name of its own)."""

    def __init__(
        self,
        config: StripeConfig,
        outbox: Outbox,
        api: StripeAPI,
        metrics: StripeMetrics,
        name: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.api = api
        self.metrics = metrics
        self.holder = unique_holder(name)
        self._clock = clock
        self._jitter = jitter
        # Renewed before every send, so it outlasts a few calls; a worker killed holding
        # it holds up its groups this long (a minute with the default timeout_s).
        self._lease_s = max(10.0, 6 * config.timeout_s)
        self._meters: dict[str, Meter] = {}
        self._meters_at = datetime.min.replace(tzinfo=UTC)
        self._errors_since: datetime | None = None
        self._reports_seen: dict[str, datetime] = {}  # error report id -> when handled
        self._oldest_pending: datetime | None = None
        # Aged when scraped: with the ledger down too, the gauge still grows.
        metrics.oldest_pending.set_function(self._oldest_age)
        super().__init__()

    def pause_s(self) -> float:
        return self.config.report_interval_s

    async def step(self) -> bool:
        await self.round()
        return False

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, LedgerUnavailable):
            self.metrics.failures.labels("ledger").inc()
            log.warning("Stripe reporting paused: the ledger is unavailable (%s)", exc)
        elif isinstance(exc, SendFailure):
            self.metrics.failures.labels(exc.kind).inc()
            log.warning("Stripe reporting paused: %s", exc)
        else:
            log.exception("Stripe reporting round failed; retrying")

    async def round(self) -> int:
        """Plan, send what is due, pick up asynchronous refusals; the rows sent."""
        now = self._clock()
        try:
            created = await self.outbox.plan(now, now - PLAN_HORIZON)
            if created:
                log.debug("planned %d Stripe report rows", len(created))
            groups = await self.outbox.lease(self.holder, now, self._lease_s, GROUPS_PER_ROUND)
            sent = 0
            if groups:
                try:
                    await self._refresh_meters(now)
                    if self.config.mode == "v1":
                        sent = await self._send_v1(groups)
                    else:
                        sent = await self._send_v2(groups)
                finally:
                    await self.outbox.release(self.holder, groups)
            if self.config.mode == "v2":
                await self._error_reports(now)
        finally:
            # Above all when Stripe is down: the stuck-outbox alert reads these.
            await self._export()
        return sent

    async def _refresh_meters(self, now: datetime) -> None:
        if (now - self._meters_at).total_seconds() < METERS_REFRESH_S:
            return
        self._meters = await self.api.meters()
        self._meters_at = now

    async def _send_v1(self, groups: list[tuple[str, str]]) -> int:
        slots = asyncio.Semaphore(V1_CONCURRENCY)

        async def group_rows(group: tuple[str, str]) -> int:
            async with slots:
                done = 0
                for row in await self.outbox.rows(group):
                    meter = await self._ready(row, group)
                    if meter is None:
                        break  # this group waits; the others go on
                    if isinstance(meter, str):
                        continue  # settled without a send (expired, already there)
                    if not await self._deliver(
                        [row], functools.partial(self.api.send_v1, row, meter)
                    ):
                        break
                    done += 1
                return done

        return sum(await asyncio.gather(*(group_rows(g) for g in groups)))

    async def _send_v2(self, groups: list[tuple[str, str]]) -> int:
        queues = {g: await self.outbox.rows(g) for g in groups}
        done = 0
        while queues:
            heads: list[OutboxRow] = []
            for group in list(queues):
                rows = queues[group]
                while rows:
                    row = rows.pop(0)
                    meter = await self._ready(row, group)
                    if isinstance(meter, str):
                        continue
                    if meter is not None:
                        heads.append(row)
                    else:
                        rows.clear()
                    break
                if not rows:
                    del queues[group]
                if len(heads) == V2_EVENTS_PER_REQUEST:
                    break
            if not heads:
                break
            held = await self._deliver_v2(heads)
            if held:
                failed = {(r.tenant, r.meter) for r in held}
                queues = {g: rows for g, rows in queues.items() if g not in failed}
            done += len(heads) - len(held)
        return done

    async def _deliver_v2(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Send rows on the stream; those held back to retry. A request refused for good
        is halved until the row refused is alone: one bad row (of up to a hundred
        customers) is rejected, not its neighbours."""
        send = functools.partial(self.api.send_v2, rows, dict(self._meters))
        outcome = await self._deliver(rows, send, divisible=len(rows) > 1)
        if outcome is None:
            half = len(rows) // 2
            return await self._deliver_v2(rows[:half]) + await self._deliver_v2(rows[half:])
        return [] if outcome else rows

    async def _ready(self, row: OutboxRow, group: tuple[str, str]) -> Meter | str | None:
        """The meter to send `row` with; a string when the row is settled without a send;
        None when the group must wait (backing off, no meter, lease lost, unclear)."""
        now = self._clock()
        if row.next_attempt_at > now:
            return None
        if not sendable(row.event_at, now):
            await self.outbox.finish([row.identifier], EXPIRED, now, "older than 35 days")
            self.metrics.failures.labels("expired").inc()
            log.error("Stripe report %s (%s %s, %d) expired unsent", row.identifier,
                      row.tenant, row.meter, row.quantity)  # fmt: skip
            return EXPIRED
        meter = self._meters.get(row.event_name)
        if meter is None or not meter.active:
            self.metrics.failures.labels("meter_missing").inc()
            await self.outbox.defer(
                [row.identifier], now + timedelta(seconds=MISSING_METER_RETRY_S),
                f"no active Stripe meter with event_name {row.event_name!r}",
            )  # fmt: skip
            self._meters_at = datetime.min.replace(tzinfo=UTC)  # look again next time
            return None
        if not dedupe_trusted(row.first_attempt_at, now):
            verdict = await self._verify_missing(row, meter, now)
            if verdict == "arrived":
                return SENT
            if verdict == "unclear":
                return None
        if not await self.outbox.renew(self.holder, group, now, self._lease_s):
            return None
        return meter

    async def _verify_missing(
        self, row: OutboxRow, meter: Meter, now: datetime
    ) -> Literal["arrived", "missing", "unclear"]:
        """For a row whose first send Stripe may have forgotten, what its summary shows:
        `arrived` (now marked sent), `missing` (send again) or `unclear` (held back)."""
        held = await self._held(meter, row)
        before = await self.outbox.sent_total(row)
        if held == before + row.quantity:
            await self.outbox.finish([row.identifier], SENT, now)
            log.info("Stripe report %s found in Stripe's summary; marked sent", row.identifier)
            return "arrived"
        if held == before:
            log.info("Stripe report %s missing from Stripe's summary; sending", row.identifier)
            return "missing"
        await self.outbox.defer(
            [row.identifier], now + timedelta(seconds=AMBIGUOUS_RETRY_S),
            f"Stripe holds {held}, sent rows {before}, this row {row.quantity}: unclear",
        )  # fmt: skip
        log.error("Stripe report %s: summary %d is neither %d nor %d; holding it",
                  row.identifier, held, before, before + row.quantity)  # fmt: skip
        return "unclear"

    async def _held(self, meter: Meter, row: OutboxRow) -> int:
        """What Stripe's summary holds for the row's customer, meter and period."""
        start, end = summary_window(row.period_start, row.period_end)
        return await self.api.summary(meter, row.customer, start, end)

    async def _deliver(
        self,
        rows: Sequence[OutboxRow],
        send: Callable[[], Awaitable[bool | None]],
        divisible: bool = False,
    ) -> bool | None:
        """Count the attempt, send, then mark; True when Stripe has the rows (or refused
        them for good), False when they wait for a retry, None when Stripe refused the
        request and it is `divisible` (the caller sends its rows in smaller parts)."""
        now = self._clock()
        for row in rows:
            await self.outbox.attempt(row.identifier, now)
        try:
            new = await send()
        except SendFailure as failure:
            ids = [row.identifier for row in rows]
            if not failure.retryable and divisible:
                log.info("Stripe refused %d reports at once (%s); sending them in parts",
                         len(ids), failure)  # fmt: skip
                return None
            self.metrics.failures.labels(failure.kind).inc()
            if not failure.retryable:
                await self.outbox.finish(ids, REJECTED, self._clock(), str(failure)[:500])
                log.error("Stripe refused %d report(s) (%s): %s", len(ids), ids[0], failure)
                return True  # settled: the group goes on with its next row
            delay = backoff_s(max(r.attempts for r in rows) + 1, self._jitter())
            await self.outbox.defer(ids, self._clock() + timedelta(seconds=delay), str(failure))
            log.info("Stripe send failed (%s); retrying in %.1fs", failure.kind, delay)
            return False
        await self.outbox.finish([row.identifier for row in rows], SENT, self._clock())
        for row in rows:
            direction = "usage" if row.quantity >= 0 else "correction"
            self.metrics.reported.labels(row.meter, direction).inc(abs(row.quantity))
        self.metrics.events.labels("accepted" if new is not False else "duplicate").inc(len(rows))
        return True

    async def _error_reports(self, now: datetime) -> None:
        since = self._errors_since or now - timedelta(hours=1)
        used = {
            m for m in self._meters.values() if m.event_name in self.config.meter_events.values()
        }
        for meter in used:
            found = await self.api.error_reports(meter, since - timedelta(minutes=1))
            # Each report once (they are asked for with some overlap): a recheck of an old
            # one would reopen a resent row before a newer report could name it.
            fresh = [r for r in found if r.id not in self._reports_seen]
            for report in (sample for reports in fresh for sample in reports.samples):
                if await self.outbox.reject_sent(
                    report.identifier, f"{report.code}: {report.message}"
                ):
                    self.metrics.failures.labels("async_rejected").inc()
                    log.error("Stripe refused report %s after accepting it: %s %s",
                              report.identifier, report.code, report.message)  # fmt: skip
            for reports in fresh:
                if reports.unnamed > 0:
                    await self._recheck(meter, reports, now)
                self._reports_seen[reports.id] = now
        self._errors_since = now
        horizon = now - timedelta(minutes=10)
        self._reports_seen = {k: at for k, at in self._reports_seen.items() if at > horizon}

    async def _recheck(self, meter: Meter, reports: ErrorReports, now: datetime) -> None:
        """Refusals Stripe counted without naming them: the groups of the rows sent around
        the report whose summary falls short of what is marked sent go out again (Stripe
        drops a resend of what it holds: they were all first sent within its dedupe window)."""
        sent = await self.outbox.sent_between(
            meter.event_name, reports.start - RECHECK_BEFORE, reports.end + RECHECK_AFTER
        )
        groups: dict[tuple[str, str, datetime], list[OutboxRow]] = {}
        for row in sent:
            groups.setdefault((row.tenant, row.meter, row.period_start), []).append(row)
        for rows in groups.values():
            held, total = await self._held(meter, rows[0]), await self.outbox.sent_total(rows[0])
            if held >= total:
                continue
            ids = [row.identifier for row in rows]
            await self.outbox.reopen(ids, now, f"Stripe holds {held} of {total} sent: resent")
            log.warning("Stripe holds %d of the %d sent for %s %s; resending %d report(s)",
                        held, total, rows[0].tenant, rows[0].meter, len(ids))  # fmt: skip

    async def _export(self) -> None:
        stats = await self.outbox.pending()
        self.metrics.pending_rows.set(stats.rows)
        self.metrics.pending_quantity.set(stats.quantity)
        self._oldest_pending = stats.oldest
        self.metrics.rejected_rows.set((await self.outbox.counts()).get(REJECTED, 0))

    def _oldest_age(self) -> float:
        oldest = self._oldest_pending
        return max(0.0, (self._clock() - oldest).total_seconds()) if oldest else 0.0
