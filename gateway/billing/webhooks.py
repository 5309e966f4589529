"""Stripe webhooks: subscription and invoice events that gate tenants.

The signature is checked on the raw body by the library (any `v1` signature
of the header against any configured secret, within the tolerance). Each
event id is recorded in the same transaction that applies it, so a replay
changes nothing; a tenant keeps the `created` of the newest event applied to
it, so an older one arriving late changes nothing either. A change is then
announced on the bus: every gateway process drops its cached tenant within
a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe

from gateway.billing.stripe_api import SendFailure, StripeAPI
from gateway.config.models import GatewayConfig
from gateway.invalidation import Bus
from gateway.ledger.db import Queries
from gateway.ledger.records import Tenant
from gateway.ledger.store import Ledger
from gateway.ledger.timestamps import utc
from gateway.metrics import WebhookMetrics

log = logging.getLogger("gateway.billing")

SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)
INVOICE_EVENTS = ("invoice.paid", "invoice.payment_failed")
_KNOWN_TYPES = frozenset(SUBSCRIPTION_EVENTS + INVOICE_EVENTS)
ENDED = ("canceled", "incomplete_expired")  # a subscription that will not run again
_ENDED_SQL = ", ".join(f"'{status}'" for status in ENDED)

_RECORD_EVENT = """
    INSERT INTO stripe_webhook_events (id, type, created, received_at, result)
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING RETURNING id
"""
# One statement, so that two events racing cannot interleave: the newer wins.
# A subscription that is not the tenant's own (an add-on, an old one) changes nothing,
# unless none is recorded or the recorded one has ended: then a running one ($8: the
# change is terminal) replaces it. $9: the customer's current subscription by
# `gateway stripe sync`, which has seen them all.
_APPLY_SUBSCRIPTION = f"""
    UPDATE tenants SET
        status = $2,
        status_changed_at = CASE WHEN status = $2 THEN status_changed_at ELSE $3 END,
        plan = coalesce($4, plan),
        billing_anchor = coalesce($5, billing_anchor),
        stripe_subscription = $6,
        stripe_updated_at = $3,
        updated_at = $7
    WHERE stripe_customer = $1
    AND (stripe_updated_at IS NULL OR stripe_updated_at <= $3)
    AND (stripe_subscription IS NULL OR stripe_subscription = $6 OR $9
         OR (status IN ({_ENDED_SQL}) AND NOT $8))
    RETURNING id
"""
# Only the invoices of the tenant's own subscription ($7) move it.
_APPLY_INVOICE = """
    UPDATE tenants SET status = $2, status_changed_at = $3, stripe_updated_at = $3, updated_at = $4
    WHERE stripe_customer = $1 AND status IN ($5, $6) AND stripe_subscription = $7
    AND (stripe_updated_at IS NULL OR stripe_updated_at <= $3)
    RETURNING id
"""
_RECORDED_SUBSCRIPTION = "SELECT stripe_subscription FROM tenants WHERE stripe_customer = $1"
_SET_RESULT = "UPDATE stripe_webhook_events SET result = $2 WHERE id = $1"
_ATTACH = "UPDATE tenants SET stripe_customer = $2 WHERE id = $1 AND stripe_customer IS NULL"
# invoice.payment_failed turns a paying tenant past_due; invoice.paid brings it back.
_INVOICE_MOVES = {
    "invoice.payment_failed": ("past_due", ("active", "trialing")),
    "invoice.paid": ("active", ("past_due", "unpaid")),
}


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """What a subscription event says about its customer's tenant."""

    customer: str
    subscription: str
    status: str
    plan: str | None
    billing_anchor: datetime | None
    created: datetime
    tenant_hint: str | None  # the subscription's own metadata naming the tenant


def invoice_subscription(invoice: dict[str, Any]) -> str | None:
    """The subscription an invoice bills; None for a one-off invoice."""
    # Since API version 2025-03-31 under `parent`; before, at the top.
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    subscription = details.get("subscription") or invoice.get("subscription")
    if isinstance(subscription, dict):  # expanded
        subscription = subscription.get("id")
    return str(subscription) if subscription else None


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if isinstance(value, int | float) else None


def subscription_change(
    event_type: str, sub: dict[str, Any], created: datetime, prices: dict[str, str], key: str
) -> SubscriptionChange:
    """The tenant fields of a `customer.subscription.*` event's object."""
    items = (sub.get("items") or {}).get("data") or []
    plan = None
    for item in items:
        price = (item.get("price") or {}).get("id")
        if price in prices:
            plan = prices[price]
            break
    # Recent API versions keep the period on the items; older ones on the subscription.
    starts = [_timestamp(item.get("current_period_start")) for item in items]
    anchor = next((s for s in starts if s is not None), None)
    anchor = anchor or _timestamp(sub.get("current_period_start"))
    status = "canceled" if event_type.endswith(".deleted") else str(sub.get("status"))
    return SubscriptionChange(
        customer=str(sub.get("customer")),
        subscription=str(sub.get("id")),
        status=status,
        plan=plan,
        billing_anchor=anchor,
        created=created,
        tenant_hint=(sub.get("metadata") or {}).get(key),
    )


class WebhookError(Exception):
    """A webhook that is refused; `status` is the HTTP answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Webhooks:
    """Verifies and applies Stripe's webhook events."""

    def __init__(
        self,
        config: GatewayConfig,
        ledger: Ledger,
        bus: Bus,
        secrets: list[str],
        api: StripeAPI | None,
        metrics: WebhookMetrics,
    ) -> None:
        assert config.stripe is not None
        self.stripe = config.stripe
        self.plans = config.plans
        self.ledger = ledger
        self.bus = bus
        self.secrets = secrets
        self.api = api
        self.metrics = metrics

    def verify(self, body: bytes, signature: str | None) -> dict[str, Any]:
        """The event, once one secret verifies one of its signatures; WebhookError if not."""
        for secret in self.secrets:
            try:
                stripe.WebhookSignature.verify_header(
                    body, signature, secret, tolerance=self.stripe.webhook_tolerance_s
                )
                break
            except stripe.SignatureVerificationError as exc:
                problem = str(exc.user_message or exc)
        else:
            self.metrics.received.labels("unknown", "bad_signature").inc()
            raise WebhookError(400, f"signature not verified: {problem}")
        try:
            event = json.loads(body)
            assert isinstance(event, dict) and isinstance(event["id"], str)
            assert isinstance(event["type"], str) and isinstance(event["created"], int)
            assert isinstance(event["data"]["object"], dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise WebhookError(400, "not a Stripe event") from None
        return event

    async def handle(self, body: bytes, signature: str | None) -> dict[str, Any]:
        """Apply one webhook; the answer's body. WebhookError for a 400 or a 503."""
        event = self.verify(body, signature)
        kind = event["type"]
        label = kind if kind in _KNOWN_TYPES else "other"
        created = datetime.fromtimestamp(event["created"], UTC)
        obj = event["data"]["object"]
        try:
            if kind in SUBSCRIPTION_EVENTS:
                change = subscription_change(
                    kind, obj, created, self.stripe.prices, self.stripe.tenant_metadata_key
                )
                result, tenant = await self.apply_subscription(event, change)
            elif kind in INVOICE_EVENTS:
                result, tenant = await self._invoice(event, obj, created)
            else:
                result, tenant = await self._record_only(event, "ignored"), None
        except SendFailure as exc:
            self.metrics.received.labels(label, "error").inc()
            raise WebhookError(503, f"Stripe lookup failed ({exc.kind}); retry") from None
        self.metrics.received.labels(label, result).inc()
        # A duplicate is announced again: its first delivery may have been applied and then
        # not announced, and answered 503 so that Stripe retries it (announcing is idempotent).
        if tenant is not None and result in ("applied", "duplicate"):
            if not await self.bus.publish("tenant", tenant):
                raise WebhookError(503, "applied, but not announced to every process; retry")
        log.info("Stripe webhook %s %s: %s%s", event["id"], kind, result,
                 f" (tenant {tenant})" if tenant else "")  # fmt: skip
        return {"received": True, "result": result, "tenant": tenant}

    async def _record(self, tx: Queries, event: dict[str, Any], result: str) -> bool:
        created = datetime.fromtimestamp(event["created"], UTC)
        inserted = await tx.fetchval(
            _RECORD_EVENT, event["id"], event["type"], created, datetime.now(UTC), result
        )
        return inserted is not None

    async def _record_only(self, event: dict[str, Any], result: str) -> str:
        async with self.ledger.db.transaction() as tx:
            return result if await self._record(tx, event, result) else "duplicate"

    async def apply_subscription(
        self, event: dict[str, Any], change: SubscriptionChange, current: bool = False
    ) -> tuple[str, str | None]:
        """Record the event and apply its change: (result, tenant id). `current`: Stripe
        says this is the customer's subscription now (it replaces the recorded one)."""
        tenant = await self.ledger.tenant_by_customer(change.customer)
        if tenant is None:
            tenant = await self._adopt(change)
            if tenant is None:
                log.warning(
                    "Stripe customer %s has no tenant and names none in its metadata (%s): "
                    "event %s not applied", change.customer, self.stripe.tenant_metadata_key,
                    event["id"],
                )  # fmt: skip
                return await self._record_only(event, "unmapped"), None
        if change.plan is None and change.status not in ENDED:
            log.warning("Stripe subscription %s has no price in stripe.prices; plan kept",
                        change.subscription)  # fmt: skip
        async with self.ledger.db.transaction() as tx:
            if not await self._record(tx, event, "applied"):
                return "duplicate", tenant.id
            applied = await tx.fetchval(
                _APPLY_SUBSCRIPTION, change.customer, change.status, utc(change.created),
                change.plan, change.billing_anchor, change.subscription, datetime.now(UTC),
                change.status in ENDED, current,
            )  # fmt: skip
            if applied is None:
                return await self._not_applied(tx, event, change.customer, change.subscription,
                                               "stale"), tenant.id  # fmt: skip
        return "applied", tenant.id

    async def _not_applied(
        self, tx: Queries, event: dict[str, Any], customer: str, subscription: str, other: str
    ) -> str:
        """`ignored` when the event is about another subscription than the tenant's,
        else `other`; recorded as the event's result."""
        recorded = await tx.fetchval(_RECORDED_SUBSCRIPTION, customer)
        result = "ignored" if recorded is not None and recorded != subscription else other
        await tx.execute(_SET_RESULT, event["id"], result)
        return result

    async def _adopt(self, change: SubscriptionChange) -> Tenant | None:
        """The tenant a customer's first subscription names (created or attached), if any."""
        tenant_id = change.tenant_hint
        if tenant_id is None and self.api is not None:
            metadata = await self.api.customer_metadata(change.customer)
            tenant_id = metadata.get(self.stripe.tenant_metadata_key)
        if not tenant_id:
            return None
        existing = await self.ledger.get_tenant(tenant_id)
        if existing is None:
            plan = change.plan
            if plan is None or plan not in self.plans:
                log.warning("cannot create tenant %s: its subscription has no mapped price",
                            tenant_id)  # fmt: skip
                return None
            new = Tenant(
                id=tenant_id, plan=plan, status=change.status, status_changed_at=change.created,
                billing_anchor=change.billing_anchor, stripe_customer=change.customer,
                stripe_subscription=change.subscription,
            )  # fmt: skip
            await self.ledger.create_tenant_if_missing(new)
            log.info("created tenant %s for Stripe customer %s", tenant_id, change.customer)
        else:
            await self.ledger.db.execute(_ATTACH, tenant_id, change.customer)
        return await self.ledger.tenant_by_customer(change.customer)

    async def _invoice(
        self, event: dict[str, Any], invoice: dict[str, Any], created: datetime
    ) -> tuple[str, str | None]:
        customer = invoice.get("customer")
        tenant = await self.ledger.tenant_by_customer(str(customer)) if customer else None
        if tenant is None:
            return await self._record_only(event, "unmapped"), None
        subscription = invoice_subscription(invoice)
        if subscription is None:  # a one-off invoice says nothing about the subscription
            return await self._record_only(event, "ignored"), tenant.id
        status, from_statuses = _INVOICE_MOVES[event["type"]]
        async with self.ledger.db.transaction() as tx:
            if not await self._record(tx, event, "applied"):
                return "duplicate", tenant.id
            applied = await tx.fetchval(
                _APPLY_INVOICE, customer, status, utc(created), datetime.now(UTC), *from_statuses,
                subscription,
            )  # fmt: skip
            if applied is None:
                return await self._not_applied(tx, event, str(customer), subscription,
                                               "unchanged"), tenant.id  # fmt: skip
        return "applied", tenant.id
