"""Usage events: one per charge, refund, response-derived charge and gauge change.

An event's id is fixed when its charge is made, from the operation that made
it (the request's charge id, or a settlement's id derived from it) and the
meter, so a redelivered or replayed event is recognisable. Its time (the
counter store's clock) picks the ledger partition and is part of its identity.

On the wire (a Redis stream entry's `e` field, or a spool line) an event is
one line of fields separated by the unit separator (0x1F), which no name,
route, method or request id can contain: `v1`, id, meter, quantity, time (us),
period start (us), kind, tenant, route, method, status, request id. The Lua
scripts write the same; splitting it costs a tenth of parsing JSON, and the
worker parses every event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from gateway.clock import EPOCH, from_us

# A ledger row of an event (`UsageEvent.row`, `wire_row`): the usage tables' columns.
COLUMNS = (
    "at", "id", "tenant_id", "meter", "quantity", "period_start", "kind", "route", "method",
    "status", "request_id",
)  # fmt: skip
SEP = "\x1f"
VERSION = "v1"
FIELDS = 12
GAUGE_PERIOD_US = 0  # a gauge has no period; its rollup row starts at the epoch


@dataclass(frozen=True, slots=True)
class EventContext:
    """What the request says about itself, carried by each of its events."""

    route: str = ""
    method: str = ""
    request_id: str = ""  # the X-Request-Id the gateway answered with
    status: int = 0  # the response status, once known (settlement events)

    def fields(self, tenant: str) -> str:
        """The trailing wire fields shared by the request's events, for the scripts to append."""
        return SEP.join((tenant, _clean(self.route), _clean(self.method), str(self.status),
                         _clean(self.request_id)))  # fmt: skip


@dataclass(frozen=True, slots=True)
class UsageEvent:
    id: str
    tenant: str
    meter: str
    quantity: int
    at_us: int  # the counter store's clock when the charge was made
    period_start_us: int  # the counter's period; GAUGE_PERIOD_US for a gauge
    kind: str  # charge, refund, response, gauge, void
    route: str = ""
    method: str = ""
    status: int = 0
    request_id: str = ""

    @property
    def at(self) -> datetime:
        return from_us(self.at_us)

    @property
    def period_start(self) -> datetime:
        return from_us(self.period_start_us)

    def row(self) -> tuple[Any, ...]:
        """The event as a ledger row, in `COLUMNS` order."""
        return (
            self.at, self.id, self.tenant, self.meter, self.quantity, self.period_start,
            self.kind, self.route, self.method, self.status, self.request_id,
        )  # fmt: skip

    def encode(self) -> str:
        """The wire form (the scripts write the same)."""
        head = (VERSION, self.id, self.meter, str(self.quantity), str(self.at_us),
                str(self.period_start_us), self.kind)  # fmt: skip
        context = EventContext(self.route, self.method, self.request_id, self.status)
        return SEP.join(head) + SEP + context.fields(self.tenant)


def _clean(value: str) -> str:
    return value.replace(SEP, "?")


def split(raw: str | bytes) -> list[str]:
    """The wire fields of an event; ValueError if it is not one."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    parts = text.split(SEP)
    if len(parts) != FIELDS or parts[0] != VERSION:
        raise ValueError(f"not a usage event: {text!r:.200}")
    return parts


def decode(raw: str | bytes) -> UsageEvent:
    """An event from its wire form; ValueError if it is not one."""
    _, id_, meter, quantity, at, period, kind, tenant, route, method, status, rid = split(raw)
    return UsageEvent(id_, tenant, meter, int(quantity), int(at), int(period), kind, route,
                      method, int(status), rid)  # fmt: skip


def wire_row(raw: str | bytes) -> tuple[Any, ...]:
    """A ledger row straight from an event's wire form; ValueError if it is not one.

    The worker's hot loop: no intermediate event object, and the few distinct
    period starts are converted once.
    """
    _, id_, meter, quantity, at, period, kind, tenant, route, method, status, rid = split(raw)
    return (
        EPOCH + timedelta(microseconds=int(at)), id_, tenant, meter, int(quantity),
        _period_start(int(period)), kind, route, method, int(status), rid,
    )  # fmt: skip


@lru_cache(maxsize=4096)
def _period_start(us: int) -> datetime:
    return from_us(us)


def tenant_of(raw: str | bytes) -> str:
    """An event's tenant, from its wire form; ValueError if it is not one."""
    return split(raw)[7]


def adjustment_kind(is_gauge: bool, delta: int, operation_id: str) -> str:
    """The kind of event an adjustment after the check makes."""
    if is_gauge:
        return "gauge"
    if delta < 0:
        return "refund"
    return "response" if operation_id.endswith(":settle") else "charge"
