"""The public listener's limits: slow and idle clients, connection caps, load shedding,
and what one client address may do before authenticating."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from gateway.config.base import Model
from gateway.config.types import PositiveFloat, PositiveInt


class PerIpRate(Model):
    """Unauthenticated requests per client address (GCRA, as a plan's rate limits)."""

    rate: PositiveInt  # requests per per_s
    per_s: PositiveFloat = 1.0
    burst: PositiveInt | None = None  # default: rate


class FailedAuthLimit(Model):
    """Failed authentications per client address before it is blocked for a while."""

    max_failures: PositiveInt = 20  # at once, refilled over per_s
    per_s: PositiveFloat = 60.0
    block_s: PositiveFloat = 60.0  # then every request needing authentication: 429


class ListenerLimits(Model):
    """Slow and idle clients on the public listener."""

    header_timeout_s: PositiveFloat = 10.0  # the whole request head must arrive within it
    body_idle_timeout_s: PositiveFloat = 30.0  # a body silent this long: 408 and closed
    # ... or slower than this mean rate once the grace is over (0: no minimum rate)
    body_min_bytes_per_s: Annotated[float, Field(ge=0)] = 500.0
    body_rate_grace_s: Annotated[float, Field(ge=0)] = 20.0
    keepalive_idle_s: PositiveFloat = 75.0  # an idle keep-alive connection is closed
    max_head_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 16 * 1024  # else 431
    max_connections: PositiveInt = 10_000  # connections over it are closed on accept
    # Load shedding, 503 with Retry-After and the body unread (paths under /_gateway/
    # are never shed): a request while this many run, ...
    max_requests_in_flight: PositiveInt = 4096
    # ... or the first request of a connection while more than this many are open.
    shed_connections: PositiveInt = 9000
    # Per client address, in each process (off unless set: behind a proxy missing
    # from trusted_proxies every client shares one address).
    per_ip: PerIpRate | None = None  # on auth: none routes and CORS preflights
    failed_auth_per_ip: FailedAuthLimit | None = None
    client_entries: PositiveInt = 65_536  # addresses remembered, least recently seen dropped

    def listener(self) -> dict[str, Any]:
        """The settings of the listener itself (`gateway.http.Limits`)."""
        return self.model_dump(exclude={"per_ip", "failed_auth_per_ip", "client_entries"})
