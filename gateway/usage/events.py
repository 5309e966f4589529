"""Usage events: one per charge, refund, response-derived charge and gauge change.

An event's id is fixed when its charge is made, from the operation that made
it (the request's charge id, or a settlement's id derived from it) and the
meter, so a redelivered or replayed event is recognisable. Its time (the
counter store's clock) picks the ledger partition and is part of its identity.

On the wire (a Redis stream entry's `e` field, or a spool line) an event is a
small JSON object; the Lua scripts write the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.quota.gcra import US_PER_S

GAUGE_PERIOD_US = 0  # a gauge has no period; its rollup row starts at the epoch
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class EventContext:
    """What the request says about itself, carried by each of its events."""

    route: str = ""
    method: str = ""
    request_id: str = ""  # the X-Request-Id the gateway answered with
    status: int = 0  # the response status, once known (settlement events)

    def fields(self, tenant: str) -> str:
        """The JSON members shared by the request's events, for the Lua scripts to append."""
        members = {"t": tenant, "r": self.route, "x": self.method, "s": self.status,
                   "rid": self.request_id}  # fmt: skip
        return json.dumps(members, separators=(",", ":"))[1:-1]


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

    def encode(self) -> str:
        """The wire form (the scripts write the same)."""
        return json.dumps(
            {"id": self.id, "m": self.meter, "q": self.quantity, "at": self.at_us,
             "p": self.period_start_us, "k": self.kind, "t": self.tenant, "r": self.route,
             "x": self.method, "s": self.status, "rid": self.request_id},
            separators=(",", ":"),
        )  # fmt: skip


def decode(raw: str | bytes) -> UsageEvent:
    """An event from its wire form; ValueError if it is not one."""
    try:
        data: dict[str, Any] = json.loads(raw)
        return UsageEvent(
            id=str(data["id"]), tenant=str(data["t"]), meter=str(data["m"]),
            quantity=int(data["q"]), at_us=int(data["at"]), period_start_us=int(data["p"]),
            kind=str(data["k"]), route=str(data.get("r", "")), method=str(data.get("x", "")),
            status=int(data.get("s", 0)), request_id=str(data.get("rid", "")),
        )  # fmt: skip
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a usage event: {raw!r:.200}") from exc


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // US_PER_S, UTC).replace(microsecond=us % US_PER_S)


def to_us(moment: datetime) -> int:
    return int(moment.timestamp()) * US_PER_S + moment.microsecond


def adjustment_kind(is_gauge: bool, delta: int, operation_id: str) -> str:
    """The kind of event an adjustment after the check makes."""
    if is_gauge:
        return "gauge"
    if delta < 0:
        return "refund"
    return "response" if operation_id.endswith(":settle") else "charge"
