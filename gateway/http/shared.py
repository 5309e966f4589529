"""What a listener's connections share: the handler, the limits, the counts, the log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.http.limits import Limits
from gateway.http.message import Handler

if TYPE_CHECKING:
    from gateway.http.connection import HttpConnection

log = logging.getLogger("gateway.http")

_REFUSAL_LOG_EVERY_S = 1.0


class ServerState:
    """One listener's handler, settings and live counts."""

    __slots__ = (
        "handler", "scheme", "limits", "on_error", "on_shed", "connections", "in_flight",
        "emptied",
    )  # fmt: skip

    def __init__(
        self,
        handler: Handler,
        scheme: str,
        limits: Limits,
        on_error: Callable[[BaseException], None] | None,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.scheme = scheme
        self.limits = limits
        self.on_error = on_error  # sees each exception that escaped the handler
        self.on_shed = on_shed  # learns why each shed request was (in_flight, connections)
        self.connections: set[HttpConnection] = set()
        self.in_flight = 0  # requests whose handler runs
        self.emptied: asyncio.Event | None = None  # set when the last connection ends (stop)


def shed_reason(state: ServerState, path: str, fresh: bool) -> str | None:
    """Why a request must be shed now, None when it may run: too many requests in
    flight, or too many connections open for one that has served no request yet (a
    client already served keeps its connection's worth)."""
    limits = state.limits
    if path.startswith(limits.never_shed):
        return None
    if state.in_flight >= limits.max_requests_in_flight:
        return "in_flight"
    if fresh and len(state.connections) > limits.shed_connections:
        return "connections"
    return None


class RefusalLog:
    """One INFO line per second at most for requests refused as malformed or too slow:
    a flood of garbage must not flood the log. No raw bytes are logged."""

    def __init__(self) -> None:
        self._next_at = 0.0
        self._dropped = 0

    def note(self, status: int, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._dropped += 1
            return
        log.info("answered %d to %s: %s (%d not logged)", status, peer, reason, self._dropped)
        self._next_at = now + _REFUSAL_LOG_EVERY_S
        self._dropped = 0


refusals = RefusalLog()  # one per process
