"""The Stripe calls the gateway makes, through the official library's async client.

One `StripeClient` per process, API version pinned, pointed at
`stripe.api_base` / `stripe.meter_events_base` when set (a local fake in
tests). The library does not retry (`max_network_retries=0`): a failed send
is retried from the outbox, with its backoff kept in the ledger, so that a
restart, another customer's outage or a slow Stripe never holds up the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe

from gateway.billing.outbox import OutboxRow
from gateway.config.models import StripeConfig

# Pinned: the webhook endpoint in Stripe's dashboard should use the same version.
STRIPE_API_VERSION = "2026-10-28.endive"
SESSION_RENEW_BEFORE = timedelta(minutes=1)
ERROR_REPORT_EVENT = "v1.billing.meter.error_report_triggered"


class SendFailure(Exception):
    """A Stripe call that did not succeed; `kind` labels the metric, `retryable` decides."""

    def __init__(self, kind: str, retryable: bool, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


def _duplicate(exc: stripe.StripeError) -> bool:
    # Stripe refuses an identifier it has seen (within its window) with a 400:
    # the event it names is already there.
    return "already exists with identifier" in str(exc.user_message or exc)


def classify(exc: Exception) -> SendFailure:
    """What a library error means for the outbox."""
    if isinstance(exc, stripe.RateLimitError):
        return SendFailure("rate_limited", True, str(exc))
    if isinstance(exc, stripe.APIConnectionError | TimeoutError):
        return SendFailure("timeout", True, str(exc) or "timed out")
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        # A revoked or mistyped key: retried slowly until someone fixes it.
        return SendFailure("auth", True, str(exc))
    if isinstance(exc, stripe.StripeError):
        status = exc.http_status or 500
        if status >= 500 or status == 409:
            return SendFailure("server_error", True, str(exc))
        return SendFailure("rejected", False, str(exc.user_message or exc))
    raise exc


@dataclass(frozen=True, slots=True)
class Meter:
    """A Stripe meter, as far as reporting needs it."""

    id: str
    event_name: str
    customer_key: str
    value_key: str
    active: bool


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """An asynchronous refusal of a meter event (the v2 stream validates later)."""

    identifier: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ErrorReports:
    """One error report of a meter: Stripe groups refusals by code and names only
    samples of each; `count` is every refusal validated between `start` and `end`."""

    id: str
    samples: list[ErrorReport]
    count: int
    start: datetime
    end: datetime

    @property
    def unnamed(self) -> int:
        return self.count - len({sample.identifier for sample in self.samples})


def _at(value: Any) -> datetime:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)


class StripeAPI:
    """The calls of the reporter, the webhooks and the `gateway stripe` commands."""

    def __init__(self, config: StripeConfig, api_key: str) -> None:
        self.config = config
        meter_events = config.meter_events_base or config.api_base
        self._http = stripe.AIOHTTPClient(timeout=config.timeout_s)
        self.client = stripe.StripeClient(
            api_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses={
                "api": config.api_base or stripe.DEFAULT_API_BASE,
                "meter_events": meter_events or stripe.DEFAULT_METER_EVENTS_API_BASE,
            },
            max_network_retries=0,
            http_client=self._http,
        )
        self._session_token: str | None = None
        self._session_expires: datetime = datetime.min.replace(tzinfo=UTC)
        self._session_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def _call(self, coro: Any) -> Any:
        # The client's own timeout covers the socket; this one covers the whole call.
        try:
            async with asyncio.timeout(self.config.timeout_s * 2):
                return await coro
        except Exception as exc:
            raise classify(exc) from exc

    async def meters(self) -> dict[str, Meter]:
        """Every meter of the account by event name."""
        found: dict[str, Meter] = {}
        page = await self._call(self.client.v1.billing.meters.list_async({"limit": 100}))
        async for meter in page.auto_paging_iter():
            found[meter.event_name] = Meter(
                id=meter.id,
                event_name=meter.event_name,
                customer_key=meter.customer_mapping.event_payload_key,
                value_key=meter.value_settings.event_payload_key,
                active=meter.status == "active",
            )
        return found

    async def send_v1(self, row: OutboxRow, meter: Meter) -> bool:
        """One meter event; False when Stripe already had its identifier."""
        params: Any = {
            "event_name": row.event_name,
            "identifier": row.identifier,
            "timestamp": int(row.event_at.timestamp()),
            "payload": {meter.customer_key: row.customer, meter.value_key: str(row.quantity)},
        }
        try:
            await self._call(self.client.v1.billing.meter_events.create_async(params))
        except SendFailure as failure:
            cause = failure.__cause__
            if isinstance(cause, stripe.InvalidRequestError) and _duplicate(cause):
                return False
            raise
        return True

    async def _session(self, now: datetime) -> str:
        async with self._session_lock:
            if self._session_token is None or now >= self._session_expires - SESSION_RENEW_BEFORE:
                session = await self._call(
                    self.client.v2.billing.meter_event_session.create_async()
                )
                self._session_token = session.authentication_token
                self._session_expires = _at(session.expires_at)
            return self._session_token

    async def send_v2(self, rows: Sequence[OutboxRow], meters: dict[str, Meter]) -> None:
        """Up to 100 meter events in one request on the meter event stream."""
        events: Any = [
            {
                "event_name": row.event_name,
                "identifier": row.identifier,
                "timestamp": row.event_at.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "payload": {
                    meters[row.event_name].customer_key: row.customer,
                    meters[row.event_name].value_key: str(row.quantity),
                },
            }
            for row in rows
        ]
        for renewed in (False, True):
            token = await self._session(datetime.now(UTC))
            try:
                await self._call(
                    self.client.v2.billing.meter_event_stream.create_async(
                        {"events": events}, {"api_key": token}
                    )
                )
                return
            except SendFailure as failure:
                expired = isinstance(failure.__cause__, stripe.TemporarySessionExpiredError)
                if not expired or renewed:
                    raise
                self._session_token = None  # renewed once, then the send is retried

    async def error_reports(self, meter: Meter, since: datetime) -> list[ErrorReports]:
        """What the stream refused after accepting it, reported since `since`."""
        params: Any = {
            "object_id": meter.id,
            "types": [ERROR_REPORT_EVENT],
            "created": {"gt": since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
            "limit": 100,
        }
        page = await self._call(self.client.v2.core.events.list_async(params))
        reports = []
        async for event in page.auto_paging_iter():
            reason = event.data.reason
            samples = [
                ErrorReport(sample.request.identifier, error_type.code, sample.error_message)
                for error_type in reason.error_types
                for sample in error_type.sample_errors
            ]
            start, end = _at(event.data.validation_start), _at(event.data.validation_end)
            reports.append(ErrorReports(event.id, samples, int(reason.error_count), start, end))
        return reports

    async def summary(self, meter: Meter, customer: str, start: datetime, end: datetime) -> int:
        """What Stripe has aggregated for a customer and meter in [start, end) (whole minutes)."""
        if end <= start:
            return 0
        params: Any = {
            "customer": customer,
            "start_time": int(start.timestamp()),
            "end_time": int(end.timestamp()),
        }
        page = await self._call(
            self.client.v1.billing.meters.event_summaries.list_async(meter.id, params)
        )
        total = 0.0
        async for summary in page.auto_paging_iter():
            total += float(summary.aggregated_value)
        return round(total)

    async def customer_metadata(self, customer: str) -> dict[str, str]:
        """A customer's metadata ({} when it does not exist or was deleted)."""
        try:
            found = await self._call(self.client.v1.customers.retrieve_async(customer))
        except SendFailure as failure:
            if isinstance(failure.__cause__, stripe.InvalidRequestError):
                return {}
            raise
        if getattr(found, "deleted", False):
            return {}
        return {str(k): str(v) for k, v in (found.to_dict().get("metadata") or {}).items()}

    async def subscriptions(self) -> AsyncIterator[Any]:
        """Every subscription of the account, whatever its status."""
        page = await self._call(
            self.client.v1.subscriptions.list_async({"status": "all", "limit": 100})
        )
        async for subscription in page.auto_paging_iter():
            yield subscription


@contextlib.asynccontextmanager
async def stripe_api(config: StripeConfig, api_key: str) -> AsyncIterator[StripeAPI]:
    api = StripeAPI(config, api_key)
    try:
        yield api
    finally:
        await api.close()
