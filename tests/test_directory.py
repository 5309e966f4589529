"""The per-process tenant and key cache: single-flight, invalidation races, floods."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

import pytest

from gateway import directory as directory_module
from gateway.directory import Directory, DirectoryUnavailable
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.records import ApiKey, Tenant

NOW = datetime(2026, 11, 21, tzinfo=UTC)
T = TypeVar("T")


class SlowLedger:
    """Tenants and keys in memory, each read taking `delay_s`; `down` makes reads fail."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, ApiKey] = {}
        self.reads = 0
        self.delay_s = 0.0
        self.down = False

    async def _read(self, value: T) -> T:
        # The row is read first; the answer arrives after the latency.
        self.reads += 1
        await asyncio.sleep(self.delay_s)
        if self.down:
            raise LedgerUnavailable("ledger down")
        return value

    async def get_tenants(self, tenant_ids: list[str]) -> dict[str, Tenant]:
        return await self._read({t: self.tenants[t] for t in tenant_ids if t in self.tenants})

    async def get_api_keys(self, prefixes: list[str]) -> dict[str, ApiKey]:
        return await self._read({p: self.keys[p] for p in prefixes if p in self.keys})


def tenant(disabled: bool = False) -> Tenant:
    return Tenant("acme", "starter", "active", NOW, disabled=disabled)


def make(ledger: SlowLedger, ttl_s: float = 3600) -> Directory:
    return Directory(ledger, ttl_s)  # type: ignore[arg-type]


async def test_concurrent_misses_read_the_ledger_once() -> None:
    ledger = SlowLedger()
    ledger.tenants["acme"] = tenant()
    ledger.delay_s = 0.05
    directory = make(ledger)
    results = await asyncio.gather(*(directory.tenant("acme") for _ in range(100)))
    assert all(r == tenant() for r in results) and ledger.reads == 1


async def test_concurrent_misses_of_many_tenants_are_read_together() -> None:
    ledger = SlowLedger()
    for i in range(100):
        ledger.tenants[f"t{i}"] = replace(tenant(), id=f"t{i}")
    ledger.delay_s = 0.01
    directory = make(ledger)
    # A fleet restarted with cold caches: each request another tenant's.
    first = asyncio.create_task(directory.tenant("t0"))
    await asyncio.sleep(0.002)  # its read is under way: the others wait for the next
    results = await asyncio.gather(*(directory.tenant(f"t{i}") for i in range(1, 100)))
    assert [r.id if r else None for r in [await first, *results]] == [f"t{i}" for i in range(100)]
    assert ledger.reads == 2
    assert await directory.tenant("ghost") is None and ledger.reads == 3


async def test_a_load_in_flight_during_an_invalidation_is_not_kept() -> None:
    ledger = SlowLedger()
    ledger.tenants["acme"] = tenant()
    ledger.delay_s = 0.05
    directory = make(ledger)
    reading = asyncio.create_task(directory.tenant("acme"))
    await asyncio.sleep(0.01)  # the read has started and will return the old row
    ledger.tenants["acme"] = tenant(disabled=True)
    directory.invalidate("tenant", "acme")
    assert (await reading) == tenant()  # the caller gets what was read...
    assert (await directory.tenant("acme")) == tenant(disabled=True)  # ...but it was not cached


async def test_stale_entries_are_served_while_the_ledger_is_down() -> None:
    ledger = SlowLedger()
    ledger.tenants["acme"] = tenant()
    directory = make(ledger, ttl_s=0)  # every lookup goes to the ledger
    assert await directory.tenant("acme") == tenant()
    ledger.down = True
    assert await directory.tenant("acme") == tenant()
    with pytest.raises(DirectoryUnavailable):
        await directory.tenant("never-seen")


async def test_made_up_keys_cannot_evict_real_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "MAX_MISSING", 100)
    ledger = SlowLedger()
    ledger.keys["real"] = ApiKey("real", "acme", "hash", NOW)
    directory = make(ledger)
    assert await directory.api_key("real") is not None
    for i in range(1000):
        assert await directory.api_key(f"fake{i}") is None
    reads = ledger.reads
    assert await directory.api_key("fake999") is None  # recent misses are remembered
    assert ledger.reads == reads
    ledger.down = True
    assert await directory.api_key("real") is not None  # still cached, served during an outage
