"""`gateway stripe sync` and `gateway stripe reconcile`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.billing.outbox import Outbox
from gateway.billing.reporter import PLAN_HORIZON
from gateway.billing.rules import summary_window
from gateway.billing.run import api_key
from gateway.billing.stripe_api import SendFailure, StripeAPI, stripe_api
from gateway.billing.webhooks import ENDED, Webhooks, subscription_change
from gateway.clock import iso_utc
from gateway.config.models import GatewayConfig, StripeConfig
from gateway.ledger.store import Ledger
from gateway.metrics import WebhookMetrics
from gateway.services import StartupError, make_bus, open_ledger


def current_subscriptions(subscriptions: Iterable[Any]) -> dict[str, Any]:
    """Per customer, the subscription that decides its tenant: the newest one still
    running, else the newest."""
    best: dict[str, Any] = {}
    for sub in subscriptions:
        held = best.get(sub["customer"])
        rank = (sub["status"] not in ENDED, int(sub.get("created") or 0))
        if held is None or rank > (held["status"] not in ENDED, int(held.get("created") or 0)):
            best[sub["customer"]] = sub
    return best


@contextlib.asynccontextmanager
async def _session(config: GatewayConfig) -> AsyncIterator[tuple[StripeConfig, Ledger, StripeAPI]]:
    """The ledger and the Stripe API for one command; a failed Stripe call is its error."""
    if config.stripe is None:
        raise StartupError("the config has no stripe: section")
    stripe = config.stripe
    ledger = await open_ledger(config, migrate=False)
    try:
        async with stripe_api(stripe, api_key(stripe)) as api:
            yield stripe, ledger, api
    except SendFailure as exc:
        raise StartupError(f"Stripe: {exc}") from None
    finally:
        await ledger.close()


async def run_sync(config: GatewayConfig) -> int:
    """Apply every customer's current subscription, as if its webhook had just arrived."""
    results: dict[str, int] = {}
    async with _session(config) as (stripe, ledger, api):
        bus = make_bus(config, ledger, None)
        try:
            webhooks = Webhooks(config, ledger, bus, [], api, WebhookMetrics(CollectorRegistry()))
            subscriptions = [sub.to_dict() async for sub in api.subscriptions()]
            now = int(time.time())
            for customer, sub in sorted(current_subscriptions(subscriptions).items()):
                # `created` = now: what Stripe says now outranks any event still in flight.
                event: dict[str, Any] = {
                    "id": f"sync_{sub['id']}_{now}", "type": "customer.subscription.updated",
                    "created": now, "data": {"object": sub},
                }  # fmt: skip
                change = subscription_change(
                    event["type"], sub, datetime.fromtimestamp(now, UTC), stripe.prices,
                    stripe.tenant_metadata_key,
                )  # fmt: skip
                result, tenant = await webhooks.apply_subscription(event, change, current=True)
                if result == "applied" and tenant is not None:
                    await bus.publish("tenant", tenant)
                results[result] = results.get(result, 0) + 1
                print(f"{customer:<24} {sub['id']:<28} {change.status:<18} {result}"
                      f"{' -> ' + tenant if tenant else ''}")  # fmt: skip
        finally:
            await bus.close()
    summary = ", ".join(f"{n} {result}" for result, n in sorted(results.items())) or "nothing"
    print(f"{len(subscriptions)} subscriptions read: {summary}")
    return 0


async def run_stripe_reconcile(config: GatewayConfig) -> int:
    """Ledger totals against Stripe's meter event summaries; 1 on any difference."""
    differences = compared = 0
    async with _session(config) as (stripe, ledger, api):
        outbox = Outbox(ledger.db, config.meters, dict(stripe.meter_events))
        meters = await api.meters()
        now = datetime.now(UTC)
        pending = {
            (r["tenant_id"], r["meter"], r["period_start"]): r["pending"]
            for r in await outbox.reported()
        }
        print(f"{'tenant':<20} {'meter':<14} {'period start':<21} {'ledger':>10} "
              f"{'stripe':>10} {'pending':>8} {'difference':>10}")  # fmt: skip
        for tenant, meter, customer, period, total in await outbox.ledger_totals(
            now - PLAN_HORIZON
        ):
            event_name = stripe.meter_events[meter]
            found = meters.get(event_name)
            if found is None:
                raise StartupError(f"Stripe has no meter with event_name {event_name!r}")
            held = await api.summary(found, customer, *summary_window(period.start, period.end))
            compared += 1
            waiting = pending.get((tenant, meter, period.start), 0)
            if held != total:
                differences += 1
                print(f"{tenant:<20} {meter:<14} {iso_utc(period.start):<21} {total:>10} "
                      f"{held:>10} {waiting:>8} {total - held:>+10}")  # fmt: skip
    print(f"{compared} tenant/meter/period totals compared, {differences} differ "
          f"(rows still pending in the outbox count as a difference until sent)")  # fmt: skip
    return 1 if differences else 0
