"""The ledger contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from gateway.ledger import (
    LATEST_VERSION,
    ApiKey,
    Ledger,
    LedgerIntegrityError,
    LedgerUnavailable,
    Tenant,
    connect,
)
from gateway.ledger.db import SqliteDatabase, sqlite_path
from gateway.ledger.records import Credit, LimitOverride
from gateway.ledger.schema import MIGRATIONS
from tests.servers import PostgresServer

T0 = datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)
IST = timezone(timedelta(hours=5, minutes=30))


_TENANT = Tenant("acme", plan="free", status="active", status_changed_at=T0)
_API_KEY = ApiKey("k1", "acme", key_hash="ab" * 32, created_at=T0)


def tenant(tenant_id: str = "acme", **fields: Any) -> Tenant:
    return replace(_TENANT, id=tenant_id, **fields)


def api_key(prefix: str, tenant_id: str = "acme", **fields: Any) -> ApiKey:
    return replace(_API_KEY, prefix=prefix, tenant_id=tenant_id, **fields)


def test_migration_versions_count_up_from_one() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))


async def test_migrate_applies_everything_once(ledger_url: str) -> None:
    ledger = await Ledger.open(ledger_url)
    try:
        assert await ledger.schema_version() == 0
        assert await ledger.migrate() == list(range(1, LATEST_VERSION + 1))
        assert await ledger.schema_version() == LATEST_VERSION
        assert await ledger.migrate() == []
        assert await ledger.schema_version() == LATEST_VERSION
    finally:
        await ledger.close()


async def test_concurrent_migrations_apply_the_schema_once(ledger_url: str) -> None:
    first, second = await Ledger.open(ledger_url), await Ledger.open(ledger_url)
    try:
        results = await asyncio.gather(first.migrate(), second.migrate())
        # Each migration is its own transaction, so the two may share the work;
        # what matters is that every migration is applied exactly once.
        assert sorted(results[0] + results[1]) == list(range(1, LATEST_VERSION + 1))
        rows = await first.db.fetchval("SELECT count(*) FROM schema_migrations")
        assert rows == LATEST_VERSION
        assert await second.schema_version() == LATEST_VERSION
    finally:
        await first.close()
        await second.close()


async def test_create_tenant_if_missing_never_overwrites(ledger: Ledger) -> None:
    now = T0 + timedelta(days=1)
    assert await ledger.create_tenant_if_missing(tenant(plan="free"), now=now) is True
    assert await ledger.create_tenant_if_missing(tenant(plan="pro", name="Acme")) is False
    stored = await ledger.get_tenant("acme")
    assert stored == tenant(plan="free", created_at=now, updated_at=now)
    assert await ledger.get_tenant("nobody") is None


async def test_put_tenant_keeps_created_at_and_the_time_of_the_last_status_change(
    ledger: Ledger,
) -> None:
    t1, t2, t3 = (T0 + timedelta(hours=h) for h in (1, 2, 3))
    first = await ledger.put_tenant(tenant(plan="free"), now=t1)
    assert first == tenant(plan="free", created_at=t1, updated_at=t1)

    # Same status: a newer status_changed_at from the caller does not move the stored one.
    same = tenant(plan="pro", name="Acme", status_changed_at=t2, disabled=True)
    second = await ledger.put_tenant(same, now=t2)
    assert second == tenant(plan="pro", name="Acme", disabled=True, created_at=t1, updated_at=t2)

    changed = tenant(plan="pro", status="past_due", status_changed_at=t3)
    third = await ledger.put_tenant(changed, now=t3)
    assert (third.status, third.status_changed_at) == ("past_due", t3)
    assert (third.created_at, third.updated_at, third.name, third.disabled) == (t1, t3, None, False)
    assert await ledger.get_tenant("acme") == third


async def test_put_tenant_without_now_stamps_the_current_time(ledger: Ledger) -> None:
    before = datetime.now(UTC)
    stored = await ledger.put_tenant(tenant())
    assert stored.created_at is not None and before <= stored.created_at <= datetime.now(UTC)
    assert stored.updated_at == stored.created_at


async def test_datetimes_round_trip_exactly_in_utc(ledger: Ledger) -> None:
    anchor = datetime(1999, 12, 31, 23, 0, 0, 1, tzinfo=IST)
    changed = datetime(2030, 1, 1, 5, 29, 59, 123_456, tzinfo=IST)
    await ledger.put_tenant(tenant(status_changed_at=changed, billing_anchor=anchor), now=T0)
    await ledger.add_api_key(api_key("k1", created_at=anchor, last_used_at=changed))

    stored = await ledger.get_tenant("acme")
    key = await ledger.get_api_key("k1")
    assert stored is not None and key is not None
    found = [
        stored.status_changed_at, stored.billing_anchor, stored.created_at,
        key.created_at, key.last_used_at,
    ]  # fmt: skip
    assert found == [changed, anchor, T0, anchor, changed]
    assert all(d is not None and d.tzinfo is UTC for d in found)
    assert stored.billing_anchor == datetime(1999, 12, 31, 17, 30, 0, 1, tzinfo=UTC)


async def test_overrides_and_current_credits_round_trip(ledger: Ledger) -> None:
    overrides = {
        "api_calls": LimitOverride(5000, "soft", (0.5, 0.9)),
        "seats": LimitOverride(-1),
    }
    await ledger.put_tenant(tenant(overrides=overrides), now=T0)
    ended = Credit("api_calls", T0 - timedelta(days=29), T0, 7)
    current = Credit("api_calls", T0, T0 + timedelta(days=31), 100)
    for credit in (ended, current, replace(current, quantity=-40)):
        await ledger.add_credit("acme", credit, now=T0)
    stored = await ledger.get_tenant("acme", now=T0)
    assert stored is not None and stored.overrides == overrides
    assert stored.credits == (current, replace(current, quantity=-40))
    assert stored.credited("api_calls", T0) == 60
    assert stored.credited("api_calls", ended.period_start) == 0  # over: not loaded
    cleared = await ledger.put_tenant(replace(stored, overrides={}))
    assert cleared.overrides == {}
    with pytest.raises(LedgerIntegrityError):
        await ledger.add_credit("ghost", current)


async def test_batched_lookups_find_what_single_ones_find(ledger: Ledger) -> None:
    ids = [f"t{i:03d}" for i in range(300)]  # more than one query's worth (LOOKUP_BATCH)
    for tenant_id in ids:
        await ledger.create_tenant_if_missing(tenant(tenant_id), now=T0)
        await ledger.add_api_key(api_key(f"k-{tenant_id}", tenant_id))
    current = Credit("api_calls", T0, T0 + timedelta(days=31), 100)
    await ledger.add_credit("t299", current, now=T0)
    asked = ["ghost", *ids, "t007", "t299"]  # unknown ids are left out, repeats found once
    found = await ledger.get_tenants(asked, now=T0)
    assert sorted(found) == ids
    assert found["t299"] == await ledger.get_tenant("t299", now=T0)
    assert found["t299"].credits == (current,) and found["t007"].credits == ()
    keys = await ledger.get_api_keys(["k-ghost", *(f"k-{t}" for t in ids)])
    assert sorted(keys) == [f"k-{t}" for t in ids]
    assert keys["k-t123"] == await ledger.get_api_key("k-t123")
    assert await ledger.get_tenants([]) == {} and await ledger.get_api_keys([]) == {}


async def test_naive_datetimes_are_refused(ledger: Ledger) -> None:
    naive = datetime(2024, 1, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.put_tenant(tenant(status_changed_at=naive))
    await ledger.put_tenant(tenant())
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.revoke_api_key("k1", naive)


async def test_list_tenants_orders_by_id_bytewise_and_pages(ledger: Ledger) -> None:
    ids = ["b", "B", "a-1", "a", "_x", "Z9", "é", "a_1", "10", "9"]
    for tenant_id in ids:
        await ledger.put_tenant(tenant(tenant_id))

    everything = await ledger.list_tenants()
    assert [t.id for t in everything] == sorted(ids)

    pages: list[list[str]] = []
    after: str | None = None
    while page := await ledger.list_tenants(limit=3, after=after):
        pages.append([t.id for t in page])
        after = page[-1].id
    assert pages == [sorted(ids)[i : i + 3] for i in range(0, len(ids), 3)]
    assert await ledger.list_tenants(after="é") == []


async def test_api_keys_add_get_list_revoke_touch(ledger: Ledger) -> None:
    await ledger.put_tenant(tenant("acme"))
    await ledger.put_tenant(tenant("other"))
    newer = api_key("k2", name="ci", created_at=T0 + timedelta(seconds=1))
    for key in (newer, api_key("k1"), api_key("k3", "other")):
        await ledger.add_api_key(key)

    assert await ledger.get_api_key("k2") == newer
    assert await ledger.get_api_key("missing") is None
    assert [k.prefix for k in await ledger.list_api_keys("acme")] == ["k1", "k2"]
    assert await ledger.list_api_keys("nobody") == []

    revoked_at = T0 + timedelta(days=2)
    assert await ledger.revoke_api_key("k1", revoked_at) is True
    assert await ledger.revoke_api_key("k1", revoked_at + timedelta(days=1)) is False
    assert await ledger.revoke_api_key("missing", revoked_at) is False
    assert await ledger.get_api_key("k1") == api_key("k1", revoked_at=revoked_at)

    used = T0 + timedelta(minutes=5)
    await ledger.touch_api_key("k2", used)
    await ledger.touch_api_key("k2", used - timedelta(seconds=1))  # arrived late: ignored
    await ledger.touch_api_key("missing", used)
    stored = await ledger.get_api_key("k2")
    assert stored is not None and stored.last_used_at == used
    await ledger.touch_api_key("k2", used + timedelta(microseconds=1))
    stored = await ledger.get_api_key("k2")
    assert stored is not None and stored.last_used_at == used + timedelta(microseconds=1)


async def test_constraints_raise_integrity_errors(ledger: Ledger) -> None:
    with pytest.raises(LedgerIntegrityError):
        await ledger.add_api_key(api_key("k1", "nobody"))
    await ledger.put_tenant(tenant("acme", stripe_customer="cus_1"))
    await ledger.add_api_key(api_key("k1"))
    with pytest.raises(LedgerIntegrityError):
        await ledger.add_api_key(api_key("k1"))
    with pytest.raises(LedgerIntegrityError):
        await ledger.put_tenant(tenant("other", stripe_customer="cus_1"))
    await ledger.put_tenant(tenant("third"))  # many tenants may have no Stripe customer
    assert [k.prefix for k in await ledger.list_api_keys("acme")] == ["k1"]


async def test_a_failed_transaction_leaves_nothing_behind(ledger: Ledger) -> None:
    insert = "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)"
    count = "SELECT count(*) FROM schema_migrations"
    with pytest.raises(RuntimeError, match="boom"):
        async with ledger.db.transaction() as tx:
            await tx.execute(insert, 1000, "x", T0)
            assert await tx.fetchval(count) == LATEST_VERSION + 1  # sees its own write
            raise RuntimeError("boom")
    assert await ledger.db.fetchval(count) == LATEST_VERSION
    async with ledger.db.transaction() as tx:
        await tx.execute(insert, 1000, "x", T0)
    row = await ledger.db.fetchrow(
        "SELECT version, name FROM schema_migrations WHERE version = $1", 1000
    )
    assert row == {"version": 1000, "name": "x"}


async def test_statements_outside_a_transaction_wait_for_it(ledger: Ledger) -> None:
    async def put(i: int) -> None:
        await ledger.put_tenant(tenant(f"t{i:02}"))

    async with ledger.db.transaction() as tx:
        writers = asyncio.gather(*(put(i) for i in range(10)))
        await tx.execute("DELETE FROM tenants")
        assert await tx.fetchval("SELECT count(*) FROM tenants") == 0
    await writers
    assert len(await ledger.list_tenants()) == 10


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///ledger.db", "ledger.db"),
        ("sqlite:///./data/ledger.db", "./data/ledger.db"),
        ("sqlite:////var/lib/gateway/ledger.db", "/var/lib/gateway/ledger.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite://ledger.db", "sqlite:///", "sqlite:ledger.db"])
def test_malformed_sqlite_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///ledger.db"):
        sqlite_path(url)


async def test_connect_opens_sqlite_files_where_the_url_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = tmp_path / "abs" / "ledger.db"
    for url, created in [
        ("sqlite:///data/nested/rel.db", tmp_path / "data" / "nested" / "rel.db"),
        (f"sqlite:///{absolute}", absolute),
    ]:
        db = await connect(url)
        await db.execute("CREATE TABLE t (x integer)")
        assert (db.dialect, await db.fetchval("PRAGMA journal_mode")) == ("sqlite", "wal")
        assert await db.fetchval("PRAGMA foreign_keys") == 1
        await db.close()
        assert created.is_file()

    db = await connect("sqlite:///:memory:")
    await db.execute("CREATE TABLE t (x integer)")
    assert await db.fetch("SELECT x FROM t") == []
    await db.close()
    await db.close()  # a second close is harmless
    assert not (tmp_path / ":memory:").exists()


async def test_connect_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        await connect("mysql://localhost/ledger")


async def test_a_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(LedgerUnavailable, match="unable to open"):
        await connect(f"sqlite:///{tmp_path}")  # a directory
    (tmp_path / "file").write_text("")
    with pytest.raises(LedgerUnavailable):
        await connect(f"sqlite:///{tmp_path / 'file' / 'ledger.db'}")


async def test_a_locked_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    holder = await SqliteDatabase.open(path)
    waiter = await SqliteDatabase.open(path, busy_timeout_ms=20)
    try:
        await holder.execute("CREATE TABLE t (x integer)")
        async with holder.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES ($1)", 1)
            with pytest.raises(LedgerUnavailable, match="locked"):
                await waiter.execute("INSERT INTO t VALUES ($1)", 2)
        await waiter.execute("INSERT INTO t VALUES ($1)", 2)
        assert await waiter.fetch("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}]
    finally:
        await holder.close()
        await waiter.close()


async def test_a_stopped_postgres_is_unavailable(postgres_server: PostgresServer) -> None:
    ledger = await Ledger.open(postgres_server.dsn)
    try:
        await ledger.migrate()
        await ledger.put_tenant(tenant())
        await asyncio.to_thread(postgres_server.stop)  # a fast shutdown, with the pool open
        with pytest.raises(LedgerUnavailable):
            await ledger.get_tenant("acme")
        with pytest.raises(LedgerUnavailable):
            async with ledger.db.transaction():
                pass
    finally:
        await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await Ledger.open(postgres_server.dsn)


async def test_concurrent_seeding_of_a_tenant_with_a_stripe_customer(ledger: Ledger) -> None:
    # Two processes starting at once seed the same tenant: the second insert is a no-op.
    now = datetime.now(UTC)
    seed = Tenant("acme", "starter", "active", now, stripe_customer="cus_acme")
    results = await asyncio.gather(*(ledger.create_tenant_if_missing(seed) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    other = Tenant("other", "starter", "active", now, stripe_customer="cus_acme")
    assert await ledger.create_tenant_if_missing(other) is False
    assert await ledger.get_tenant("other") is None


async def test_a_transaction_cancelled_at_any_point_leaves_the_connection_usable(
    tmp_path: Path,
) -> None:
    # A task stopped mid-write (the recorder at shutdown) must not leave the one
    # connection inside a transaction: every later BEGIN would fail.
    db = await SqliteDatabase.open(str(tmp_path / "cancel.db"))
    try:
        await db.execute("CREATE TABLE t (x INTEGER)")

        async def write() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                await tx.execute("INSERT INTO t VALUES (2)")

        for yields in range(12):  # cancel after 0, 1, 2, ... turns of the loop
            task = asyncio.create_task(write())
            for _ in range(yields):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (3)")
        # Each write either committed whole or left nothing.
        assert await db.fetchval("SELECT count(*) FROM t WHERE x = 1") == await db.fetchval(
            "SELECT count(*) FROM t WHERE x = 2"
        )
        assert await db.fetchval("SELECT count(*) FROM t WHERE x = 3") == 12
    finally:
        await db.close()
