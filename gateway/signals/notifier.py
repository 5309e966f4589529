"""Delivering notifications: signed webhooks from the ledger's outbox, retried until
delivered or dead-lettered.

Each request is signed by the Standard Webhooks convention (`webhook-id` is
the signal's id, the same on every attempt; `webhook-timestamp`;
`webhook-signature`, `v1,` and the HMAC-SHA256 of `id.timestamp.body`), so a
receiver verifies it with any of that convention's libraries and dedupes on
the id. A 2xx answer delivers it; anything else, a timeout or a refused
connection is retried after an exponential, jittered delay, until
`dead_after_s` after the signal, when it is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from standardwebhooks.webhooks import Webhook

from gateway.clock import utc_now
from gateway.config.signals import NotificationsConfig
from gateway.ledger.db import Database, LedgerError
from gateway.lifecycle import Rounds
from gateway.services import StartupError
from gateway.signals.store import Due, SignalStore

log = logging.getLogger("gateway.signals")
POLL_S = 1.0
LEASE_S = 60.0
CLAIM_BATCH = 50
FIRST_RETRY_S = 1.0
CONCURRENCY = 16


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "gateway_notification_attempts_total",
            "Webhook deliveries attempted, by result (delivered, failed, dead)",
            ["result"],
            registry=registry,
        )
        self.pending = Gauge(
            "gateway_notifications_pending",
            "Notifications not yet delivered nor dead-lettered, at the last poll",
            registry=registry,
        )
        self.dead = Gauge(
            "gateway_notifications_dead",
            "Notifications dead-lettered (requeue them with the admin API)",
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    signer: Webhook


def endpoints(config: NotificationsConfig) -> dict[str, Endpoint]:
    """Each webhook's signer, its secret read from the environment; StartupError if unset."""
    out = {}
    for i, hook in enumerate(config.webhooks):
        secret = os.environ.get(hook.secret_env, "").strip()
        where = f"notifications.webhooks[{i}].secret_env"
        if not secret:
            raise StartupError(
                f"{where}: the environment variable {hook.secret_env} is not set (a Standard "
                f"Webhooks secret: whsec_ and base64 of 24 to 64 random bytes)"
            )
        try:
            signer = Webhook(secret)
        except Exception:
            raise StartupError(
                f"{where}: {hook.secret_env} is not a Standard Webhooks secret (whsec_ and base64)"
            ) from None
        out[hook.url] = Endpoint(hook.url, signer)
    return out


def retry_delay_s(attempts: int, most_s: float) -> float:
    """Exponential from one second, at most `most_s`, jittered down by up to half."""
    growth = float(2 ** max(0, min(attempts - 1, 30)))
    return min(most_s, FIRST_RETRY_S * growth) * random.uniform(0.5, 1.0)


class Notifier(Rounds):
    """Delivers due notifications until stopped; several may run on one ledger."""

    def __init__(
        self,
        db: Database,
        config: NotificationsConfig,
        holder: str,
        metrics: NotifierMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = SignalStore(db)
        self.config = config
        self.endpoints = endpoints(config)
        self.holder = holder
        self.metrics = metrics
        self.clock = clock
        super().__init__()
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        """Poll, deliver, repeat; a failed poll waits for the next."""
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            await super().run()

    def pause_s(self) -> float:
        return POLL_S

    async def step(self) -> bool:
        busy = await self.deliver_due()
        await self._count()
        return busy

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, LedgerError):
            log.warning("notifications: the ledger is unreachable (%s)", exc)
        else:
            log.exception("notification delivery failed; retrying")

    async def deliver_due(self) -> bool:
        """One round: lease what is due and deliver it; whether there was any."""
        due = await self.store.claim(self.holder, self.clock(), LEASE_S, CLAIM_BATCH)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(item: Due) -> None:
            async with limit:
                await self._deliver(item)

        await asyncio.gather(*(one(item) for item in due))
        return bool(due)

    async def _deliver(self, due: Due) -> None:
        endpoint = self.endpoints.get(due.endpoint)
        if endpoint is None:
            await self._give_up(due, "the endpoint is no longer in notifications.webhooks")
            return
        error = await self._post(endpoint, due)
        now = self.clock()
        if error is None:
            await self.store.delivered(due, self.holder, now)
            self._counted("delivered")
            return
        if now - due.created_at >= timedelta(seconds=self.config.dead_after_s):
            await self._give_up(due, error)
            return
        delay_s = retry_delay_s(due.attempts, self.config.max_retry_interval_s)
        await self.store.retry(due, self.holder, now + timedelta(seconds=delay_s), error)
        self._counted("failed")

    async def _post(self, endpoint: Endpoint, due: Due) -> str | None:
        """None once the receiver took it; else what went wrong."""
        assert self._session is not None
        now = self.clock()
        headers = {
            "webhook-id": due.signal_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": endpoint.signer.sign(due.signal_id, now, due.payload),
            "Content-Type": "application/json",
        }
        try:
            async with self._session.post(
                endpoint.url, data=due.payload.encode(), headers=headers
            ) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                return f"answered {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _give_up(self, due: Due, error: str) -> None:
        await self.store.dead(due, self.holder, error)
        self._counted("dead")
        log.error(
            "notification %s to %s dead-lettered after %d attempts: %s",
            due.signal_id, due.endpoint, due.attempts, error,
        )  # fmt: skip

    def _counted(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.attempts.labels(result).inc()

    async def _count(self) -> None:
        if self.metrics is None:
            return
        counts = await self.store.counts()
        self.metrics.pending.set(counts.get("pending", 0))
        self.metrics.dead.set(counts.get("dead", 0))
