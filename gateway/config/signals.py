"""The config's signal sections: which notifications go where, and what the worker
watches for (anomalies, forecasts)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from gateway.config.base import Model
from gateway.config.types import DurationS, EnvName, HttpUrl, PositiveFloat, PositiveInt, StrictInt

SignalType = Literal[
    "quota.threshold_crossed",
    "quota.exhausted",
    "quota.overage_started",
    "quota.exhaustion_forecast",
    "usage.anomaly",
    "subscription.status_changed",
    "subscription.grace_started",
    "subscription.grace_ended",
]
SIGNAL_TYPES: tuple[SignalType, ...] = get_args(SignalType)


class WebhookConfig(Model):
    """One endpoint of the SaaS team's own that receives the gateway's signals."""

    url: HttpUrl
    # The Standard Webhooks signing secret (`whsec_` and base64), from this variable.
    secret_env: EnvName
    events: list[SignalType] = list(SIGNAL_TYPES)


class NotificationsConfig(Model):
    """Signed webhooks about tenants, delivered from an outbox in the ledger."""

    webhooks: list[WebhookConfig] = []
    timeout_s: PositiveFloat = 10.0
    # Retries back off exponentially with jitter, up to this interval between attempts...
    max_retry_interval_s: DurationS = 3600.0
    # ...and a notification still undelivered this long after its event is dead-lettered.
    dead_after_s: DurationS = 3 * 86400.0


class AnomalyConfig(Model):
    """When an hour's usage is an anomaly for its tenant (see README, "Tenant signals")."""

    k: PositiveFloat = 6.0  # spreads above the baseline's median
    min_ratio: Annotated[float, Field(ge=1)] = 3.0  # times the median, at least
    min_quantity: PositiveInt = 100  # units in the hour, at least
    baseline_weeks: Annotated[StrictInt, Field(ge=1, le=12)] = 4


class SignalsConfig(Model):
    """What `gateway worker` watches in the rollups: anomalies and exhaustion forecasts."""

    interval_s: DurationS = 60.0
    anomaly: AnomalyConfig = AnomalyConfig()
    # A forecast exhaustion is signalled only this long before it, at most.
    forecast_horizon_s: DurationS = 7 * 86400.0
