"""Keys from a JWKS URL: cached, refreshed in the background, kept through outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp

from gateway.auth.keys import BoundKey, check_alg, keys_from_jwks, pick_key
from gateway.lifecycle import stop_task
from gateway.metrics import AuthMetrics

log = logging.getLogger("gateway.jwks")

FETCH_TIMEOUT_S = 5.0
RETRY_AFTER_FAILURE_S = 10.0


class JWKSKeys:
    """A JWKS endpoint's keys.

    An unknown `kid` may mean the issuer rotated keys, so it triggers a
    refetch, but at most one per refresh interval however many requests carry
    unknown kids: a flood of forged tokens must not become a flood of fetches.
    A failed fetch keeps the last good keys, so an outage of the identity
    provider logs nobody out.
    """

    def __init__(
        self,
        url: str,
        allowed: Sequence[str],
        refresh_s: float,
        refetch_min_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: AuthMetrics | None = None,
    ) -> None:
        self.url = url
        self._allowed = tuple(allowed)
        self._refresh_s = refresh_s
        self._refetch_min_s = refresh_s if refetch_min_s is None else refetch_min_s
        self._clock = clock
        self._keys: dict[str, BoundKey] = {}
        self._last_miss_fetch = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._metrics = metrics

    async def start(self) -> None:
        """Fetch once (not fatal if it fails), then refresh in the background."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self._fetch()
        self._loop_task = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def stop(self) -> None:
        for task in (self._loop_task, self._inflight):
            await stop_task(task)
        if self._session is not None:
            await self._session.close()

    async def key(self, kid: str | None, alg: str) -> BoundKey:
        bound = pick_key(self._keys, kid)
        if bound is None and kid is not None:
            now = self._clock()
            if self._inflight is None and now - self._last_miss_fetch >= self._refetch_min_s:
                self._last_miss_fetch = now
                self._inflight = asyncio.create_task(self._miss_fetch())
            if self._inflight is not None:
                # Callers share the one fetch; cancelling a caller must not cancel it.
                await asyncio.shield(self._inflight)
            bound = pick_key(self._keys, kid)
        return check_alg(bound, alg)

    async def _refresh_loop(self) -> None:
        while True:
            delay = self._refresh_s if self._keys else min(self._refresh_s, RETRY_AFTER_FAILURE_S)
            await asyncio.sleep(delay)
            await self._fetch()

    async def _miss_fetch(self) -> None:
        try:
            await self._fetch()
        finally:
            # Only this task may end the wait that lookups share: were another
            # fetch to clear the handle, a lookup within the refetch gap would
            # give up on a kid that the fetch still running may bring.
            if self._inflight is asyncio.current_task():
                self._inflight = None

    async def _fetch(self) -> None:
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                keys = keys_from_jwks(await resp.json(content_type=None), self._allowed)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._count("error")
            log.warning(
                "JWKS fetch from %s failed (%s); keeping %d keys", self.url, exc, len(self._keys)
            )
            return
        if not keys:
            self._count("empty")
            log.warning("JWKS at %s has no usable signing key; keeping the previous ones", self.url)
            return
        self._count("ok")
        if self._metrics is not None:
            self._metrics.jwks_success.set_to_current_time()
        self._keys = keys

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.jwks_fetches.labels(result).inc()
