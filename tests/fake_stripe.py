"""A strict, stateful fake of the parts of Stripe the gateway uses, on port 0.

The real `stripe` library talks to it through `base_addresses`. It refuses
what Stripe refuses: a wrong key or API version, unknown parameters, meters
and customers that do not exist, values that are not whole numbers,
timestamps outside 35 days back / 5 minutes ahead, an identifier seen within
24 hours (v1: a 400; the v2 stream: dropped), more than 100 events a stream
request, an expired v2 session. The v2 stream validates after answering:
its refusals surface as `v1.billing.meter.error_report_triggered` events,
one per meter and request, grouped by code, naming only a few samples.
Its clock can be moved forward, and a share of calls can be made to fail
(429, 500, or a hang past the client's timeout, before or after recording).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.billing.stripe_api import ERROR_REPORT_EVENT, STRIPE_API_VERSION

API_KEY = "sk_test_fake_" + "k" * 24
DEDUPE_S = 24 * 3600
PAST_S = 35 * 86400
FUTURE_S = 300
_WHOLE = re.compile(r"^-?\d{1,15}$")  # negative values correct earlier ones
_V1_EVENT_KEYS = {"event_name", "identifier", "timestamp", "payload"}


@dataclass
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    received_at: float


@dataclass
class Failures:
    """A share of calls on the send paths that fail, by kind, drawn from a seeded RNG."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500", "timeout", "commit_then_timeout")
    hang_s: float = 5.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    injected: dict[str, int] = field(default_factory=dict)

    def draw(self) -> str | None:
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(self.kinds)
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return kind


def _error(status: int, kind: str, message: str, code: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": kind, "message": message}
    if code:
        body["code"] = code
    return web.json_response({"error": body}, status=status)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _nested(form: dict[str, str], name: str) -> dict[str, str]:
    prefix = name + "["
    return {k[len(prefix) : -1]: v for k, v in form.items() if k.startswith(prefix)}


class FakeStripe:
    """The fake's state and its aiohttp app; `url` once started."""

    def __init__(self, session_ttl_s: float = 900.0) -> None:
        self.offset_s = 0.0
        self.session_ttl_s = session_ttl_s
        self.customers: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.events: dict[str, MeterEvent] = {}  # by identifier, what Stripe holds
        self.seen: dict[str, float] = {}  # identifier -> when Stripe last accepted it
        self.values_sent: dict[str, set[str]] = {}  # every value ever sent per identifier
        self.sessions: dict[str, float] = {}  # token -> expires at
        self.core_events: list[dict[str, Any]] = []
        self.failures = Failures()
        self.calls: dict[str, int] = {}
        self.broken: set[str] = set()  # calls ("GET /v1/billing/meters") that answer 500
        # Each send is held this long, so that two sends that overlap are seen to.
        self.latency_s = 0.0
        self.in_flight: dict[tuple[str, ...], int] = {}  # (identifier,), (customer, event name)
        self.max_in_flight = 0
        self.error_samples = 3  # refusals an error report names, per code (the rest: counted)
        # Customers whose events make the stream refuse the whole request at once (a 400),
        # as it does an event it cannot parse.
        self.stream_refuses: set[str] = set()
        self.on_commit: Callable[[MeterEvent], None] | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # --- state the tests set up and read ------------------------------------------------

    def now(self) -> float:
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds

    def add_customer(self, customer_id: str, metadata: dict[str, str] | None = None) -> None:
        self.customers[customer_id] = {
            "id": customer_id, "object": "customer", "metadata": metadata or {},
            "created": int(self.now()), "livemode": False,
        }  # fmt: skip

    def add_meter(self, event_name: str, customer_key: str = "stripe_customer_id") -> str:
        meter_id = f"mtr_{secrets.token_hex(8)}"
        self.meters[meter_id] = {
            "id": meter_id, "object": "billing.meter", "event_name": event_name,
            "display_name": event_name, "status": "active", "livemode": False,
            "created": int(self.now()), "updated": int(self.now()),
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
            "default_aggregation": {"formula": "sum"}, "event_time_window": None,
        }  # fmt: skip
        return meter_id

    def totals(self) -> dict[tuple[str, str], int]:
        """(customer, event name) -> the sum Stripe holds."""
        out: dict[tuple[str, str], int] = {}
        for event in self.events.values():
            key = (event.customer, event.event_name)
            out[key] = out.get(key, 0) + event.value
        return out

    def conflicting_identifiers(self) -> list[str]:
        """Identifiers that were ever sent with two different values."""
        return [i for i, values in self.values_sent.items() if len(values) > 1]

    def remove_event(self, identifier: str) -> None:
        del self.events[identifier]

    def _customer_of(self, event: dict[str, Any]) -> str:
        meter = next(
            (m for m in self.meters.values() if m["event_name"] == event["event_name"]), None
        )
        customer_key = meter["customer_mapping"]["event_payload_key"] if meter else ""
        return str(event["payload"].get(customer_key, ""))

    @contextlib.asynccontextmanager
    async def _sending(self, events: list[dict[str, Any]]) -> AsyncIterator[None]:
        """Count the request's events in flight, per identifier and per customer and meter."""
        keys: list[tuple[str, ...]] = []
        for event in events:
            customer = self._customer_of(event)
            keys += [(str(event.get("identifier", "")),), (customer, event["event_name"])]
        for key in keys:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight[key])
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            yield
        finally:
            for key in keys:
                self.in_flight[key] -= 1

    # --- the server ---------------------------------------------------------------------

    async def start(self) -> FakeStripe:
        app = web.Application(middlewares=[self._checks])
        app.router.add_get("/v1/billing/meters", self._list_meters)
        app.router.add_get("/v1/billing/meters/{id}/event_summaries", self._summaries)
        app.router.add_post("/v1/billing/meter_events", self._v1_event)
        app.router.add_get("/v1/customers/{id}", self._customer)
        app.router.add_get("/v1/subscriptions", self._list_subscriptions)
        app.router.add_post("/v2/billing/meter_event_session", self._v2_session)
        app.router.add_post("/v2/billing/meter_event_stream", self._v2_stream)
        app.router.add_get("/v2/core/events", self._v2_events)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _checks(self, request: web.Request, handler: Any) -> web.StreamResponse:
        name = f"{request.method} {request.match_info.route.resource.canonical}"  # type: ignore[union-attr]
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.broken:
            return _error(500, "api_error", "Something went wrong")
        if request.headers.get("Stripe-Version") != STRIPE_API_VERSION:
            return _error(400, "invalid_request_error", "unpinned or unknown Stripe-Version")
        auth = request.headers.get("Authorization", "")
        if request.path != "/v2/billing/meter_event_stream" and auth != f"Bearer {API_KEY}":
            return _error(401, "invalid_request_error", "Invalid API Key provided")
        response: web.StreamResponse = await handler(request)
        return response

    async def _fail(self) -> tuple[str | None, web.Response | None]:
        kind = self.failures.draw()
        if kind == "429":
            return kind, _error(429, "rate_limit", "Too many requests", "rate_limit")
        if kind == "500":
            return kind, _error(500, "api_error", "Something went wrong")
        if kind == "timeout":
            await asyncio.sleep(self.failures.hang_s)
        return kind, None

    def _list(self, items: list[dict[str, Any]], url: str) -> web.Response:
        return web.json_response({"object": "list", "data": items, "has_more": False, "url": url})

    async def _list_meters(self, request: web.Request) -> web.Response:
        return self._list(list(self.meters.values()), "/v1/billing/meters")

    async def _customer(self, request: web.Request) -> web.Response:
        customer = self.customers.get(request.match_info["id"])
        if customer is None:
            return _error(404, "invalid_request_error", "No such customer", "resource_missing")
        return web.json_response(customer)

    async def _list_subscriptions(self, request: web.Request) -> web.Response:
        return self._list(list(self.subscriptions.values()), "/v1/subscriptions")

    async def _summaries(self, request: web.Request) -> web.Response:
        meter = self.meters.get(request.match_info["id"])
        if meter is None:
            return _error(404, "invalid_request_error", "No such meter", "resource_missing")
        q = request.query
        try:
            customer, start, end = q["customer"], int(q["start_time"]), int(q["end_time"])
        except (KeyError, ValueError):
            return _error(400, "invalid_request_error", "customer, start_time, end_time required")
        if start % 60 or end % 60:
            return _error(400, "invalid_request_error", "times must be aligned with minutes")
        total = sum(
            e.value
            for e in self.events.values()
            if e.customer == customer
            and e.event_name == meter["event_name"]
            and start <= e.timestamp < end
        )
        summary = {
            "id": f"mtrusg_{secrets.token_hex(6)}", "object": "billing.meter_event_summary",
            "aggregated_value": float(total), "start_time": start, "end_time": end,
            "livemode": False, "meter": meter["id"],
        }  # fmt: skip
        return self._list([summary], f"/v1/billing/meters/{meter['id']}/event_summaries")

    def _validate(self, event_name: str, payload: dict[str, str], timestamp: int) -> str | None:
        """The refusal of one event, or None; (code: message) as Stripe words them."""
        meter = next((m for m in self.meters.values() if m["event_name"] == event_name), None)
        if meter is None or meter["status"] != "active":
            return f"no_meter: no active meter for event_name {event_name!r}"
        customer_key = meter["customer_mapping"]["event_payload_key"]
        extra = set(payload) - {customer_key, "value"}
        if extra:
            return f"invalid_request: unknown payload keys {sorted(extra)}"
        customer = payload.get(customer_key)
        if customer is None:
            return "meter_event_no_customer_defined: no customer in the payload"
        if customer not in self.customers:
            return f"meter_event_customer_not_found: no such customer {customer!r}"
        if not _WHOLE.match(payload.get("value", "")):
            return f"meter_event_invalid_value: {payload.get('value')!r} is not a whole number"
        now = self.now()
        if timestamp > now + FUTURE_S:
            return "timestamp_in_future: more than 5 minutes ahead"
        if timestamp < now - PAST_S:
            return "timestamp_too_far_in_past: more than 35 days back"
        return None

    def _record(self, identifier: str, event_name: str, payload: dict[str, str], ts: int) -> bool:
        """Keep a valid event; False when the identifier was seen within 24 hours."""
        now = self.now()
        last = self.seen.get(identifier)
        if last is not None and now - last < DEDUPE_S:
            return False
        meter = next(m for m in self.meters.values() if m["event_name"] == event_name)
        customer = payload[meter["customer_mapping"]["event_payload_key"]]
        # Past the window Stripe has forgotten the identifier: a resend counts again.
        key = identifier if identifier not in self.events else f"{identifier}#{now}"
        event = MeterEvent(identifier, event_name, customer, int(payload["value"]), ts, now)
        self.events[key] = event
        self.seen[identifier] = now
        if self.on_commit is not None:
            self.on_commit(event)
        return True

    async def _v1_event(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        top = {k.split("[", 1)[0] for k in form}
        if top - _V1_EVENT_KEYS:
            unknown = sorted(top - _V1_EVENT_KEYS)[0]
            return _error(400, "invalid_request_error", f"Received unknown parameter: {unknown}")
        identifier, event_name = form.get("identifier"), form.get("event_name")
        if not identifier or not event_name or "timestamp" not in form:
            return _error(
                400, "invalid_request_error", "identifier, event_name, timestamp required"
            )
        payload = _nested(form, "payload")
        self.values_sent.setdefault(identifier, set()).add(payload.get("value", ""))
        event = {"identifier": identifier, "event_name": event_name, "payload": payload}
        async with self._sending([event]):
            return await self._v1_commit(identifier, event_name, payload, int(form["timestamp"]))

    async def _v1_commit(
        self, identifier: str, event_name: str, payload: dict[str, str], timestamp: int
    ) -> web.Response:
        kind, failure = await self._fail()
        if failure is not None:
            return failure
        refusal = self._validate(event_name, payload, timestamp)
        if refusal is not None:
            return _error(400, "invalid_request_error", refusal)
        if not self._record(identifier, event_name, payload, timestamp):
            return _error(
                400, "invalid_request_error",
                f"An event already exists with identifier {identifier}.",
            )  # fmt: skip
        if kind == "commit_then_timeout":
            await asyncio.sleep(self.failures.hang_s)
        return web.json_response({
            "object": "billing.meter_event", "created": int(self.now()), "event_name": event_name,
            "identifier": identifier, "livemode": False, "payload": payload,
            "timestamp": timestamp,
        })  # fmt: skip

    async def _v2_session(self, request: web.Request) -> web.Response:
        token = "mes_tok_" + secrets.token_hex(12)
        now = self.now()
        self.sessions[token] = now + self.session_ttl_s
        return web.json_response({
            "id": "mes_" + secrets.token_hex(8), "object": "v2.billing.meter_event_session",
            "authentication_token": token, "created": _iso(now),
            "expires_at": _iso(now + self.session_ttl_s), "livemode": False,
        })  # fmt: skip

    async def _v2_stream(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        expires = self.sessions.get(token)
        if expires is None:
            return _error(401, "invalid_request_error", "Invalid API Key provided")
        if self.now() >= expires:
            return _error(
                401, "temporary_session_expired", "The meter event session has expired",
                "billing_meter_event_session_expired",
            )  # fmt: skip
        try:
            body = json.loads(await request.read())
            events = body["events"]
            assert set(body) == {"events"} and isinstance(events, list)
        except (ValueError, KeyError, AssertionError):
            return _error(400, "invalid_request_error", "expected {events: [...]}")
        if not 1 <= len(events) <= 100:
            return _error(400, "invalid_request_error", "between 1 and 100 events a request")
        for event in events:
            if set(event) - _V1_EVENT_KEYS or not {"event_name", "payload"} <= set(event):
                return _error(400, "invalid_request_error", "malformed event")
            value = str(event["payload"].get("value", ""))
            self.values_sent.setdefault(event.get("identifier", ""), set()).add(value)
        for i, event in enumerate(events):
            if self._customer_of(event) in self.stream_refuses:
                return _error(400, "invalid_request_error", f"events[{i}]: invalid event")
        async with self._sending(events):
            return await self._v2_accept(events)

    async def _v2_accept(self, events: list[dict[str, Any]]) -> web.Response:
        kind, failure = await self._fail()
        if failure is not None:
            return failure
        # Accepted now, validated after the answer, as Stripe does.
        task = asyncio.get_running_loop().create_task(self._validate_later(events))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if kind == "commit_then_timeout" or self.on_commit is not None:
            await task  # a test watching commits sees them before the answer leaves
        if kind == "commit_then_timeout":
            await asyncio.sleep(self.failures.hang_s)
        return web.json_response({})

    async def _validate_later(self, events: list[dict[str, Any]]) -> None:
        await asyncio.sleep(0)
        started = self.now()
        # meter id -> code -> (message, identifier) of each refusal
        refused: dict[str, dict[str, list[tuple[str, str]]]] = {}
        for event in events:
            ts = int(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp())
            refusal = self._validate(event["event_name"], event["payload"], ts)
            if refusal is None:
                self._record(event["identifier"], event["event_name"], event["payload"], ts)
                continue
            meter = next(
                (m for m in self.meters.values() if m["event_name"] == event["event_name"]), None
            )
            code, _, message = refusal.partition(": ")
            by_code = refused.setdefault(meter["id"] if meter else "", {})
            by_code.setdefault(code, []).append((message, event["identifier"]))
        # As Stripe does: one report per meter, errors grouped by code, only samples named.
        for meter_id, by_code in refused.items():
            self.core_events.append({
                "id": "evt_" + secrets.token_hex(8), "object": "v2.core.event",
                "type": ERROR_REPORT_EVENT, "created": _iso(self.now()), "livemode": False,
                "related_object": {"id": meter_id, "type": "billing.meter",
                                   "url": "/v1/billing/meters"},
                "data": {
                    "developer_message_summary": next(iter(by_code.values()))[0][0],
                    "reason": {
                        "error_count": sum(len(errors) for errors in by_code.values()),
                        "error_types": [{
                            "code": code, "error_count": len(errors),
                            "sample_errors": [
                                {"error_message": message, "request": {"identifier": identifier}}
                                for message, identifier in errors[: self.error_samples]
                            ],
                        } for code, errors in by_code.items()],
                    },
                    "validation_start": _iso(started), "validation_end": _iso(self.now()),
                },
            })  # fmt: skip

    async def _v2_events(self, request: web.Request) -> web.Response:
        q = request.query
        object_id = q.get("object_id")
        types = [v for k, v in q.items() if k.startswith("types")]
        after = q.get("created[gt]")
        found = [
            e for e in self.core_events
            if (object_id is None or e["related_object"]["id"] == object_id)
            and (not types or e["type"] in types)
            and (after is None or e["created"] > after)
        ]  # fmt: skip
        return web.json_response({"data": found, "next_page_url": None, "previous_page_url": None})
