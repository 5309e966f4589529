"""Tenants and API keys as the hot path sees them: cached in each process.

The ledger is the source of truth. Entries are dropped when another process
announces a change (see `invalidation`), within a second; the TTL is only a
backstop for a lost message. When the ledger cannot be reached, an expired
entry is still served: a database blip must not lock paying tenants out.
Misses are looked up together: those that come while a lookup is under way
go in the next one, one query for all of them (a fleet restarted with cold
caches would otherwise make two queries per tenant).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from gateway.batching import Coalescer
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.records import ApiKey, Tenant
from gateway.ledger.store import Ledger

log = logging.getLogger("gateway.directory")

K = TypeVar("K")
V = TypeVar("V")
MAX_ENTRIES = 250_000  # the default of storage.cache_entries
MAX_MISSING = 10_000
TOUCH_INTERVAL_S = 60.0  # how often an API key's last_used_at is written


class DirectoryUnavailable(Exception):
    """Nothing cached and the ledger cannot be reached."""


def _fail(future: asyncio.Future[V], exc: Exception) -> None:
    future.set_exception(exc)
    future.exception()  # marked retrieved: only the waiters re-raise it


class _Cache(Generic[K, V]):
    """A bounded TTL cache whose misses are loaded once however many ask at once.

    Found values and "no such key" answers are kept apart, each evicted least
    recently used first, so that a flood of made-up keys can only evict other
    made-up keys, never the tenants and keys in use.
    """

    def __init__(
        self, ttl_s: float, clock: Callable[[], float], max_entries: int = MAX_ENTRIES
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._found: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._missing: OrderedDict[K, float] = OrderedDict()
        self._loading: dict[K, asyncio.Future[V | None]] = {}
        # Bumped by every invalidation: a load that was in flight meanwhile
        # may have read the old row, so its result is not kept.
        self._generation = 0

    async def get(self, key: K, load: Callable[[K], Awaitable[V | None]]) -> V | None:
        now = self._clock()
        entry = self._found.get(key)
        if entry is not None and entry[0] > now:
            self._found.move_to_end(key)
            return entry[1]
        missing_until = self._missing.get(key)
        if missing_until is not None and missing_until > now:
            return None
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        generation = self._generation
        try:
            value = await load(key)
        except LedgerUnavailable as exc:
            if entry is not None:
                log.warning("ledger unreachable; serving a stale entry for %r", key)
                future.set_result(entry[1])
                return entry[1]
            _fail(future, DirectoryUnavailable(str(exc)))
            raise DirectoryUnavailable(str(exc)) from exc
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            _fail(future, exc)  # waiters must not hang on a loader's bug
            raise
        finally:
            del self._loading[key]
        if generation == self._generation:
            self._store(key, value)
        future.set_result(value)
        return value

    def _store(self, key: K, value: V | None) -> None:
        expires = self._clock() + self._ttl_s
        if value is None:
            self._found.pop(key, None)
            self._missing[key] = expires
            self._missing.move_to_end(key)
            while len(self._missing) > MAX_MISSING:
                self._missing.popitem(last=False)
        else:
            self._missing.pop(key, None)
            self._found[key] = (expires, value)
            self._found.move_to_end(key)
            while len(self._found) > self._max_entries:
                self._found.popitem(last=False)

    def drop(self, key: K) -> None:
        self._generation += 1
        self._found.pop(key, None)
        self._missing.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._found.clear()
        self._missing.clear()


class Directory:
    """Cached lookups of tenants (by id) and API keys (by prefix)."""

    def __init__(
        self,
        ledger: Ledger,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.ledger = ledger
        self._tenants: _Cache[str, Tenant] = _Cache(ttl_s, clock, max_entries)
        self._keys: _Cache[str, ApiKey] = _Cache(ttl_s, clock, max_entries)
        self._clock = clock
        self._touched: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._tenant_lookups: Coalescer[str, Tenant | None] = Coalescer(
            self._lookup_tenants, "tenant-lookups"
        )
        self._key_lookups: Coalescer[str, ApiKey | None] = Coalescer(
            self._lookup_keys, "api-key-lookups"
        )

    async def tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant, or None if there is no such tenant."""
        return await self._tenants.get(tenant_id, self._tenant_lookups.submit)

    async def api_key(self, prefix: str) -> ApiKey | None:
        """The key record with this prefix, revoked or not; None if unknown."""
        return await self._keys.get(prefix, self._key_lookups.submit)

    async def _lookup_tenants(self, tenant_ids: list[str]) -> list[Tenant | None]:
        found = await self.ledger.get_tenants(tenant_ids)
        return [found.get(tenant_id) for tenant_id in tenant_ids]

    async def _lookup_keys(self, prefixes: list[str]) -> list[ApiKey | None]:
        found = await self.ledger.get_api_keys(prefixes)
        return [found.get(prefix) for prefix in prefixes]

    def invalidate(self, kind: str, key: str) -> None:
        """Forget one entry: `kind` is "tenant" or "api_key"."""
        (self._tenants if kind == "tenant" else self._keys).drop(key)

    def invalidate_all(self) -> None:
        """Forget everything (after missing invalidation messages)."""
        self._tenants.clear()
        self._keys.clear()

    def touch(self, prefix: str) -> None:
        """Record a key's use, at most once a minute, off the request's path."""
        now = self._clock()
        if now - self._touched.get(prefix, float("-inf")) < TOUCH_INTERVAL_S:
            return
        self._touched[prefix] = now
        task = asyncio.create_task(self._touch(prefix))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _touch(self, prefix: str) -> None:
        try:
            await self.ledger.touch_api_key(prefix, datetime.now(UTC))
        except LedgerUnavailable:
            log.warning("could not record the use of API key %s", prefix)

    async def close(self) -> None:
        """Wait for background writes; stop looking up."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._tenant_lookups.close()
        await self._key_lookups.close()
