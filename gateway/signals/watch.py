"""What `gateway worker` watches in the ledger's hourly rollups, every `signals.interval_s`:
usage anomalies and quotas forecast to run out.

Only tenants and meters with usage in the last hours are read (the candidates),
so a round costs in proportion to the active tenants, not to all of them.
Each finding is a signal (written once per tenant, meter and hour for an
anomaly, per period for a forecast) and a metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Gauge

from gateway.clock import to_us, utc_now
from gateway.config.models import GatewayConfig
from gateway.ledger.db import Database, LedgerError
from gateway.ledger.records import Tenant
from gateway.ledger.store import Ledger
from gateway.ledger.timestamps import loaded, required, utc
from gateway.ledger.usage_ledger import UsageLedger
from gateway.lifecycle import Rounds
from gateway.quota.forecast import forecast, window
from gateway.quota.periods import Period, meter_period
from gateway.quota.policy import Policies, credit_of
from gateway.quota.rules import credited
from gateway.signals.anomaly import HOUR, WEEK, AnomalySettings, Verdict, baseline, judge
from gateway.signals.crossings import ANOMALY, EXHAUSTION_FORECAST, Signal
from gateway.signals.recorder import endpoints_by_type
from gateway.signals.store import SignalStore
from gateway.signals.subscriptions import subscription_signals

log = logging.getLogger("gateway.signals")

_BUSY_HOURS = """
    SELECT tenant_id, meter, hour, quantity FROM usage_hourly
    WHERE hour >= $1 AND quantity >= $2
    ORDER BY tenant_id, meter, hour
"""
_ACTIVE = """
    SELECT DISTINCT tenant_id, meter FROM usage_hourly WHERE hour >= $1
    ORDER BY tenant_id, meter
"""
_HISTORY = """
    SELECT hour, quantity FROM usage_hourly
    WHERE tenant_id = $1 AND meter = $2 AND hour >= $3 AND hour < $4
"""
_FIRST_HOUR = "SELECT min(hour) FROM usage_hourly WHERE tenant_id = $1 AND meter = $2"


class WatchMetrics:
    def __init__(self, registry: CollectorRegistry, tenant_top: int) -> None:
        self.anomalies = Gauge(
            "gateway_usage_anomalies",
            "Tenant meters whose usage this hour or the last is an anomaly, at the last round",
            registry=registry,
        )
        self.forecasts = Gauge(
            "gateway_quota_exhaustion_forecasts",
            "Tenant meters whose hard quota is forecast to run out inside their period",
            registry=registry,
        )
        self.last_success = Gauge(
            "gateway_signals_last_success_timestamp_seconds",
            "When the worker last finished a round of anomaly and forecast checks",
            registry=registry,
        )
        self.tenant_top = tenant_top
        self.ratio = (
            Gauge(
                "gateway_tenant_usage_anomaly_ratio",
                "The busiest anomalies: this hour's usage over its baseline's median "
                "(only with metrics.tenant_label; the metrics.tenant_label_top largest)",
                ["tenant", "meter"],
                registry=registry,
            )
            if tenant_top
            else None
        )


@dataclass(frozen=True, slots=True)
class Anomaly:
    tenant: str
    meter: str
    hour: datetime
    verdict: Verdict

    def signal(self, now: datetime) -> Signal:
        v = self.verdict
        return Signal(
            ANOMALY, self.tenant, self.meter, Period(self.hour, self.hour + HOUR), v.observed,
            None, to_us(now), details=(
                ("baseline_median", v.median), ("threshold", round(v.threshold, 3)),
                ("ratio", round(v.ratio, 3)),
            ),
        )  # fmt: skip


class Watch(Rounds):
    """One process's anomaly and forecast rounds over the ledger."""

    def __init__(
        self,
        config: GatewayConfig,
        db: Database,
        metrics: WatchMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.db = db
        self.ledger = Ledger(db)
        self.usage = UsageLedger(db)
        self.store = SignalStore(db)
        self.policies = Policies(config, clock, None)
        a = config.signals.anomaly
        self.settings = AnomalySettings(a.k, a.min_ratio, a.min_quantity, a.baseline_weeks)
        self.endpoints = endpoints_by_type(config.notifications)
        self.metrics = metrics
        self.clock = clock
        super().__init__()

    def use(self, config: GatewayConfig) -> None:
        """A reloaded config, from the next round: its meters, plans and subscription rules
        (the rest of what the watch reads cannot change on reload)."""
        self.config = config
        self.policies = Policies(config, self.clock, None)

    def pause_s(self) -> float:
        return self.config.signals.interval_s

    async def step(self) -> bool:
        await self.round()
        return False

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, LedgerError):
            log.warning("anomaly and forecast checks: the ledger is unreachable (%s)", exc)
        else:
            log.exception("anomaly and forecast checks failed; retrying")

    async def round(self) -> list[Signal]:
        """Check once; the signals found (new to the ledger or not)."""
        now = self.clock()
        anomalies = await self.anomalies(now)
        forecasts = await self.forecasts(now)
        subscriptions = await subscription_signals(self.db, self.config.subscription, now)
        signals = [a.signal(now) for a in anomalies] + forecasts + subscriptions
        await self.store.record([(s, self.endpoints.get(s.type, ())) for s in signals], now)
        if self.metrics is not None:
            self._export(anomalies, forecasts, now)
        return signals

    async def anomalies(self, now: datetime) -> list[Anomaly]:
        """Tenant meters whose last or current hour is unusual for them."""
        current = now.replace(minute=0, second=0, microsecond=0)
        busy = await self.db.fetch(_BUSY_HOURS, utc(current - HOUR), self.settings.min_quantity)
        found: dict[tuple[str, str], Anomaly] = {}
        for row in busy:
            tenant, meter = row["tenant_id"], row["meter"]
            hour = required(loaded(row["hour"]))
            verdict = await self._judge(tenant, meter, hour, int(row["quantity"]))
            if verdict is not None and verdict.anomalous:
                found[tenant, meter] = Anomaly(tenant, meter, hour, verdict)  # the latest hour
        return list(found.values())

    async def _judge(
        self, tenant: str, meter: str, hour: datetime, observed: int
    ) -> Verdict | None:
        first = loaded(await self.db.fetchval(_FIRST_HOUR, tenant, meter))
        if first is None:
            return None
        since = hour - self.settings.baseline_weeks * WEEK - HOUR
        rows = await self.db.fetch(_HISTORY, tenant, meter, utc(since), utc(hour))
        history = {required(loaded(r["hour"])): int(r["quantity"]) for r in rows}
        samples = baseline(history, first, hour, self.settings.baseline_weeks)
        return judge(observed, samples, self.settings)

    async def forecasts(self, now: datetime) -> list[Signal]:
        """Hard quotas forecast to run out inside their period, within the horizon."""
        horizon = timedelta(seconds=self.config.signals.forecast_horizon_s)
        active = await self.db.fetch(_ACTIVE, utc(now - timedelta(hours=24)))
        tenants: dict[str, Tenant | None] = {}
        found = []
        for row in active:
            tenant_id, meter = row["tenant_id"], row["meter"]
            spec = self.config.meters.get(meter)
            if spec is None or spec.type != "counter" or spec.period == "none":
                continue
            if tenant_id not in tenants:
                tenants[tenant_id] = await self.ledger.get_tenant(tenant_id, now=now)
            tenant = tenants[tenant_id]
            if tenant is None:
                continue
            period = meter_period(spec, now, tenant.billing_anchor)
            if period is None:
                continue
            limit = credited(
                self.policies.meter_limit(tenant, meter), credit_of(tenant, meter, period)
            )
            if limit.unlimited or not limit.hard:
                continue
            used = await self.usage.total(tenant_id, meter, period.start)
            since, until = window(period, now)
            rollups = await self.usage.hourly(tenant_id, meter, since, until)
            ahead = forecast(used, limit, period, now, [(h, q) for h, q, _ in rollups])
            if ahead is None or ahead.exhausts_at is None or ahead.exhausts_at - now > horizon:
                continue
            view = ahead.view()
            found.append(
                Signal(
                    EXHAUSTION_FORECAST,
                    tenant_id,
                    meter,
                    period,
                    used,
                    limit.limit,
                    to_us(now),
                    details=tuple(view.items()),
                )  # fmt: skip
            )
        return found

    def _export(self, anomalies: list[Anomaly], forecasts: list[Signal], now: datetime) -> None:
        metrics = self.metrics
        assert metrics is not None
        metrics.anomalies.set(len(anomalies))
        metrics.forecasts.set(len(forecasts))
        if metrics.ratio is not None:
            metrics.ratio.clear()
            top = sorted(anomalies, key=lambda a: a.verdict.ratio, reverse=True)
            for a in top[: metrics.tenant_top]:
                metrics.ratio.labels(a.tenant, a.meter).set(round(a.verdict.ratio, 3))
        metrics.last_success.set(now.timestamp())
