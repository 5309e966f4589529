"""Opening the Stripe side of a process: the API key from the environment, the reporter."""

from __future__ import annotations

import asyncio
import logging
import os

from prometheus_client import CollectorRegistry

from gateway.billing.outbox import Outbox
from gateway.billing.reporter import Reporter
from gateway.billing.stripe_api import StripeAPI
from gateway.billing.webhooks import Webhooks
from gateway.config.models import GatewayConfig, StripeConfig
from gateway.ledger.db import Database
from gateway.lifecycle import stop_task
from gateway.metrics import StripeMetrics, WebhookMetrics
from gateway.services import Services, StartupError

log = logging.getLogger("gateway.billing")


def api_key(config: StripeConfig) -> str:
    """The Stripe secret key named by `stripe.api_key_env`; StartupError when unset."""
    key = os.environ.get(config.api_key_env, "").strip()
    if not key:
        raise StartupError(
            f"stripe.api_key_env: the environment variable {config.api_key_env} is not set "
            f"(a Stripe secret key, sk_live_... or sk_test_...)"
        )
    return key


def open_webhooks(
    config: GatewayConfig, services: Services, metrics: WebhookMetrics
) -> tuple[Webhooks, StripeAPI | None]:
    """The webhook endpoint's handler; the secrets come from `stripe.webhook_secret_env`."""
    assert config.stripe is not None
    stripe = config.stripe
    raw = os.environ.get(stripe.webhook_secret_env, "")
    secrets = [s.strip() for s in raw.split(",") if s.strip()]
    if not secrets:
        raise StartupError(
            f"stripe.webhook_secret_env: the environment variable {stripe.webhook_secret_env} "
            f"is not set (the endpoint's signing secret, whsec_...; several separated by commas)"
        )
    api = None
    if os.environ.get(stripe.api_key_env, "").strip():
        api = StripeAPI(stripe, api_key(stripe))  # to read a new customer's metadata
    else:
        log.warning(
            "%s is not set: a subscription whose customer has no tenant yet is only adopted "
            "when the subscription's own metadata names the tenant", stripe.api_key_env,
        )  # fmt: skip
    return Webhooks(config, services.ledger, services.bus, secrets, api, metrics), api


class Reporting:
    """The reporter running on its own task beside whatever else the process does."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._task = asyncio.create_task(reporter.run(), name="stripe-reporter")

    @classmethod
    def start(
        cls, config: GatewayConfig, db: Database, registry: CollectorRegistry, name: str
    ) -> Reporting:
        assert config.stripe is not None
        stripe = config.stripe
        outbox = Outbox(db, config.meters, dict(stripe.meter_events))
        api = StripeAPI(stripe, api_key(stripe))
        return cls(Reporter(stripe, outbox, api, StripeMetrics(registry), name))

    async def close(self) -> None:
        """Finish the call in flight (its row is marked or stays pending), then stop."""
        self.reporter.stop()
        try:
            async with asyncio.timeout(self.reporter.config.timeout_s * 3):
                await asyncio.shield(self._task)
        except TimeoutError:
            await stop_task(self._task)
        await self.reporter.api.close()
