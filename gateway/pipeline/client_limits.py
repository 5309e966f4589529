"""Limits per client address, for what no tenant can be charged with: the request
rate on `auth: none` routes (and preflights), and floods of failed authentications.

The client is the address resolved through `server.trusted_proxies` (an IPv6
client by its /64, see `headers.client_key`). The state lives in this process
(each worker process counts apart) in a table of at most `client_entries`
addresses, the least recently seen dropped first: memory stays bounded whatever
the number of addresses a flood comes from. Each address costs one GCRA state per
limit (`quota.gcra`, the same rule as the plans' rate limits).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gateway.clock import US_PER_S
from gateway.config.models import ServerConfig
from gateway.headers import TrustedProxies, client_key
from gateway.http.message import Request
from gateway.metrics import ProxyMetrics
from gateway.problems import Refused
from gateway.quota.gcra import RateLimit, gcra


@dataclass(slots=True)
class _Client:
    rate_tat_us: int = 0  # GCRA state of the unauthenticated request rate
    failures_tat_us: int = 0  # GCRA state of failed authentications
    blocked_until_us: int = 0  # past too many failures: refused until then


def _now_us() -> int:
    return int(time.monotonic() * US_PER_S)


def _retry_after(us: int) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(us / US_PER_S)))}


class ClientLimits:
    """The per-address limits of one process; inactive (and free) when none is configured."""

    def __init__(
        self,
        trusted: TrustedProxies,
        metrics: ProxyMetrics,
        rate: RateLimit | None = None,
        failures: RateLimit | None = None,
        block_s: float = 0.0,
        entries: int = 65_536,
    ) -> None:
        self._trusted = trusted
        self._metrics = metrics
        self._rate = rate
        self._failures = failures
        self._block_us = int(block_s * US_PER_S)
        self._entries = entries
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.active = rate is not None or failures is not None

    @classmethod
    def for_config(cls, server: ServerConfig, metrics: ProxyMetrics) -> ClientLimits:
        """The limits `server.limits` sets (`per_ip`, `failed_auth_per_ip`)."""
        limits = server.limits
        rate = failures = None
        if (per_ip := limits.per_ip) is not None:
            rate = RateLimit("per_ip", per_ip.rate, per_ip.per_s, per_ip.burst or per_ip.rate)
        block_s = 0.0
        if (failed := limits.failed_auth_per_ip) is not None:
            failures = RateLimit(
                "failed_auth", failed.max_failures, failed.per_s, failed.max_failures
            )
            block_s = failed.block_s
        return cls(
            TrustedProxies(server.trusted_proxies), metrics, rate, failures, block_s,
            limits.client_entries,
        )  # fmt: skip

    @property
    def tracked(self) -> int:
        """Addresses in the table now."""
        return len(self._clients)

    def client(self, request: Request) -> str:
        """The key `request`'s client is counted by."""
        forwarded = request.headers.getall("X-Forwarded-For", ())
        return client_key(self._trusted.client(request.peer, forwarded))

    def unauthenticated(self, request: Request, now_us: int | None = None) -> None:
        """Charge one unauthenticated request to its client; Refused 429 over the rate."""
        limit = self._rate
        if limit is None:
            return
        now_us = _now_us() if now_us is None else now_us
        entry = self._entry(self.client(request))
        result = gcra(limit, entry.rate_tat_us, now_us)
        if not result.allowed:
            self._metrics.client_limited("per_ip")
            raise Refused(
                429, "client-rate-limited",
                f"more than {limit.rate} unauthenticated requests per {limit.per_s:g} s "
                "from this address",
                headers=_retry_after(result.retry_after_us),
            )  # fmt: skip
        entry.rate_tat_us = result.tat_us

    @contextmanager
    def authenticating(self, request: Request, now_us: int | None = None) -> Iterator[None]:
        """Around an authentication: Refused 429 while the client is blocked (nothing is
        verified then); a 401 inside counts as a failure, and too many block the client."""
        limit = self._failures
        if limit is None:
            yield
            return
        now_us = _now_us() if now_us is None else now_us
        key = self.client(request)
        entry = self._clients.get(key)
        if entry is not None:
            self._clients.move_to_end(key)  # a client still trying stays remembered
        if entry is not None and entry.blocked_until_us > now_us:
            self._metrics.client_limited("failed_auth")
            raise Refused(
                429, "too-many-failed-authentications",
                "too many failed authentications from this address; retry later",
                headers=_retry_after(entry.blocked_until_us - now_us),
            )  # fmt: skip
        try:
            yield
        except Refused as refused:
            if refused.status == 401:
                self._failed(key, now_us)
            raise

    def _failed(self, key: str, now_us: int) -> None:
        assert self._failures is not None
        entry = self._entry(key)
        result = gcra(self._failures, entry.failures_tat_us, now_us)
        if result.allowed:
            entry.failures_tat_us = result.tat_us
        else:
            entry.blocked_until_us = now_us + self._block_us

    def _entry(self, key: str) -> _Client:
        clients = self._clients
        entry = clients.get(key)
        if entry is None:
            entry = clients[key] = _Client()
            if len(clients) > self._entries:
                clients.popitem(last=False)  # the least recently seen
        else:
            clients.move_to_end(key)
        return entry
