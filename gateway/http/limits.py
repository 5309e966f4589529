"""How long and how much the public listener waits for and takes from a client."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """The listener's timeouts and sizes (the defaults are production values)."""

    header_timeout_s: float = 10.0  # the whole head, from the first byte of a request
    body_idle_timeout_s: float = 30.0  # silence while the handler waits for body bytes
    # A body must also keep this mean rate while the handler waits for it, after
    # `body_rate_grace_s` (Apache's mod_reqtimeout MinRate): a client trickling a
    # byte every few seconds stays under the idle timeout and would otherwise hold
    # its upstream connection for as long as it likes. 0 turns the rate off.
    body_min_bytes_per_s: float = 500.0
    body_rate_grace_s: float = 20.0
    keepalive_idle_s: float = 75.0  # an idle kept-alive connection is closed after this
    max_head_bytes: int = 16 * 1024  # request line and headers; over it: 431
    # Connections over this are closed as soon as they are accepted: the
    # client sees a reset, the ones already open are served as before.
    max_connections: int = 10_000
    # Load shedding (503 with Retry-After, the body left unread): a request while
    # this many run, or the first request of a connection while more than
    # `shed_connections` are open. Paths under `never_shed` are always served.
    max_requests_in_flight: int = 4096
    shed_connections: int = 9000
    never_shed: str = "/_gateway/"

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_idle_timeout_s", "keepalive_idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive")

    @property
    def check_every_s(self) -> float:
        """How far ahead a connection's one timer may sleep: no deadline is set closer."""
        return min(self.header_timeout_s, self.body_idle_timeout_s, self.keepalive_idle_s)
