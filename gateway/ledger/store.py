"""Tenants and API keys in the ledger database, the same SQL on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from gateway.ledger import schema
from gateway.ledger.db import Database, connect
from gateway.ledger.records import ApiKey, Credit, LimitOverride, Tenant
from gateway.ledger.timed import TimedDatabase
from gateway.ledger.timestamps import loaded, maybe_utc, required, utc
from gateway.metrics import LedgerMetrics

TENANT_COLUMNS = (
    "id, name, plan, status, status_changed_at, billing_anchor, stripe_customer,"
    " stripe_subscription, disabled, overrides, created_at, updated_at"
)
_TENANT_VALUES = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11"  # created_at = updated_at
_API_KEY_COLUMNS = "prefix, tenant_id, key_hash, name, created_at, revoked_at, last_used_at"

_INSERT_TENANT = f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ({_TENANT_VALUES})"
# Any conflict: two processes seeding at once may collide on the id or on the
# Stripe customer's unique index; the second insert is a no-op either way.
_CREATE_TENANT = f"{_INSERT_TENANT} ON CONFLICT DO NOTHING RETURNING id"
_PUT_TENANT = f"""
    {_INSERT_TENANT}
    ON CONFLICT (id) DO UPDATE SET
        name = excluded.name,
        plan = excluded.plan,
        status = excluded.status,
        status_changed_at = CASE WHEN tenants.status = excluded.status
            THEN tenants.status_changed_at ELSE excluded.status_changed_at END,
        billing_anchor = excluded.billing_anchor,
        stripe_customer = excluded.stripe_customer,
        stripe_subscription = excluded.stripe_subscription,
        disabled = excluded.disabled,
        overrides = excluded.overrides,
        updated_at = excluded.updated_at
    RETURNING {TENANT_COLUMNS}
"""
_GET_TENANT = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
LOOKUP_BATCH = 256  # ids per query of a batched lookup (`get_tenants`, `get_api_keys`)
_TENANT_BY_CUSTOMER = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE stripe_customer = $1"
_LIST_TENANTS = f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id LIMIT $1"
_LIST_TENANTS_AFTER = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id > $2 ORDER BY id LIMIT $1"

_ADD_API_KEY = f"INSERT INTO api_keys ({_API_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
_GET_API_KEY = f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE prefix = $1"
_LIST_API_KEYS = (
    f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at, prefix"
)
_REVOKE_API_KEY = (
    "UPDATE api_keys SET revoked_at = $2 WHERE prefix = $1 AND revoked_at IS NULL RETURNING prefix"
)
# Touches from concurrent requests may land out of order; the clock only moves forward.
_TOUCH_API_KEY = (
    "UPDATE api_keys SET last_used_at = $2"
    " WHERE prefix = $1 AND (last_used_at IS NULL OR last_used_at < $2)"
)


_CREDIT_COLUMNS = "meter, period_start, period_end, quantity"
_ADD_CREDIT = (
    f"INSERT INTO credits (tenant_id, {_CREDIT_COLUMNS}, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
_CURRENT_CREDITS = (
    f"SELECT {_CREDIT_COLUMNS} FROM credits WHERE tenant_id = $1 AND period_end > $2 ORDER BY id"
)

_RECORD_CHANGE = "INSERT INTO changes (kind, key, at) VALUES ($1, $2, $3)"
_CHANGES_AFTER = "SELECT id, kind, key FROM changes WHERE id > $1 ORDER BY id LIMIT 10000"
_LATEST_CHANGE = "SELECT max(id) FROM changes"
_PRUNE_CHANGES = "DELETE FROM changes WHERE at < $1"


def tenant_of(row: dict[str, Any]) -> Tenant:
    """A `Tenant` from a row of `TENANT_COLUMNS`."""
    return Tenant(
        id=row["id"],
        name=row["name"],
        plan=row["plan"],
        status=row["status"],
        status_changed_at=required(loaded(row["status_changed_at"])),
        billing_anchor=loaded(row["billing_anchor"]),
        stripe_customer=row["stripe_customer"],
        stripe_subscription=row["stripe_subscription"],
        disabled=bool(row["disabled"]),  # SQLite has no boolean type: 0 or 1
        overrides=overrides_of(row["overrides"]),
        created_at=loaded(row["created_at"]),
        updated_at=loaded(row["updated_at"]),
    )


def overrides_of(text: str | None) -> dict[str, LimitOverride]:
    """The overrides column, JSON text: `{meter: {limit, enforcement, warn_at}}`."""
    if not text:
        return {}
    return {
        meter: LimitOverride(spec["limit"], spec["enforcement"], tuple(spec["warn_at"]))
        for meter, spec in json.loads(text).items()
    }


def _overrides_text(overrides: dict[str, LimitOverride]) -> str | None:
    if not overrides:
        return None
    return json.dumps(
        {
            meter: {"limit": o.limit, "enforcement": o.enforcement, "warn_at": list(o.warn_at)}
            for meter, o in sorted(overrides.items())
        }
    )


def _credit(row: dict[str, Any]) -> Credit:
    return Credit(
        meter=row["meter"],
        period_start=required(loaded(row["period_start"])),
        period_end=required(loaded(row["period_end"])),
        quantity=int(row["quantity"]),
    )


def _api_key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        prefix=row["prefix"],
        tenant_id=row["tenant_id"],
        key_hash=row["key_hash"],
        name=row["name"],
        created_at=required(loaded(row["created_at"])),
        revoked_at=loaded(row["revoked_at"]),
        last_used_at=loaded(row["last_used_at"]),
    )


def _padded(values: list[str]) -> list[str]:
    """`values` (not empty) with the last repeated up to a power of two: a batched
    query's `IN` list then has one of a few lengths, so PostgreSQL sees a few
    statements, not one per batch size (each prepared and cached per connection)."""
    size = 1 << (len(values) - 1).bit_length()
    return values + [values[-1]] * (size - len(values))


def _batches(values: Sequence[str]) -> Iterator[list[str]]:
    """`values` without repeats, `LOOKUP_BATCH` at a time, each batch `_padded`."""
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), LOOKUP_BATCH):
        yield _padded(unique[start : start + LOOKUP_BATCH])


def _marks(first: int, count: int) -> str:
    """`$first, ..., $(first + count - 1)`: the placeholders of an `IN` list."""
    return ", ".join(f"${i}" for i in range(first, first + count))


def _tenant_args(tenant: Tenant, now: datetime | None) -> tuple[Any, ...]:
    return (
        tenant.id,
        tenant.name,
        tenant.plan,
        tenant.status,
        utc(tenant.status_changed_at),
        maybe_utc(tenant.billing_anchor),
        tenant.stripe_customer,
        tenant.stripe_subscription,
        tenant.disabled,
        _overrides_text(tenant.overrides),
        datetime.now(UTC) if now is None else utc(now),
    )


class Ledger:
    """Tenants and API keys on a `Database`, whichever backend it is."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, url: str, metrics: LedgerMetrics | None = None) -> Ledger:
        """Connect to the ledger at `url` (sqlite:// or postgresql://), its calls timed
        with `metrics`; does not migrate."""
        db = await connect(url)
        return cls(TimedDatabase(db, metrics) if metrics is not None else db)

    async def close(self) -> None:
        """Close the database connections."""
        await self.db.close()

    async def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied."""
        return await schema.migrate(self.db)

    async def schema_version(self) -> int:
        """The highest applied migration, 0 before the first."""
        return await schema.schema_version(self.db)

    async def get_tenant(self, tenant_id: str, *, now: datetime | None = None) -> Tenant | None:
        """The tenant with `tenant_id` and its credits for periods not over at `now`, or None."""
        row = await self.db.fetchrow(_GET_TENANT, tenant_id)
        if row is None:
            return None
        at = datetime.now(UTC) if now is None else utc(now)
        credits = await self.db.fetch(_CURRENT_CREDITS, tenant_id, at)
        return replace(tenant_of(row), credits=tuple(_credit(c) for c in credits))

    async def get_tenants(
        self, tenant_ids: Sequence[str], *, now: datetime | None = None
    ) -> dict[str, Tenant]:
        """Those of `tenant_ids` that exist, by id, with their credits (as `get_tenant`):
        two queries per `LOOKUP_BATCH` ids, where `get_tenant` makes two per tenant."""
        found: dict[str, Tenant] = {}
        for ids in _batches(tenant_ids):
            rows = await self.db.fetch(
                f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id IN ({_marks(1, len(ids))})", *ids
            )
            for tenant in await self.with_credits([tenant_of(row) for row in rows], now=now):
                found[tenant.id] = tenant
        return found

    async def current_credits(self, now: datetime) -> dict[str, tuple[Credit, ...]]:
        """Every tenant's credits for periods not over at `now` (few: one query for all)."""
        rows = await self.db.fetch(
            f"SELECT tenant_id, {_CREDIT_COLUMNS} FROM credits WHERE period_end > $1 ORDER BY id",
            utc(now),
        )
        credits: dict[str, list[Credit]] = {}
        for row in rows:
            credits.setdefault(row["tenant_id"], []).append(_credit(row))
        return {tenant: tuple(c) for tenant, c in credits.items()}

    async def with_credits(
        self, tenants: Sequence[Tenant], *, now: datetime | None = None
    ) -> list[Tenant]:
        """`tenants` with their credits for periods not over at `now`, in one query."""
        if not tenants:
            return []
        at = datetime.now(UTC) if now is None else utc(now)
        ids = _padded([t.id for t in tenants])
        rows = await self.db.fetch(
            f"SELECT tenant_id, {_CREDIT_COLUMNS} FROM credits WHERE period_end > $1 "
            f"AND tenant_id IN ({_marks(2, len(ids))}) ORDER BY id",
            at, *ids,
        )  # fmt: skip
        credits: dict[str, list[Credit]] = {}
        for row in rows:
            credits.setdefault(row["tenant_id"], []).append(_credit(row))
        return [replace(t, credits=tuple(credits.get(t.id, ()))) for t in tenants]

    async def tenant_by_customer(self, customer: str) -> Tenant | None:
        """The tenant of a Stripe customer (without its credits), or None."""
        row = await self.db.fetchrow(_TENANT_BY_CUSTOMER, customer)
        return None if row is None else tenant_of(row)

    async def add_credit(
        self, tenant_id: str, credit: Credit, *, now: datetime | None = None
    ) -> None:
        """Record a credit; LedgerIntegrityError if the tenant does not exist."""
        await self.db.execute(
            _ADD_CREDIT,
            tenant_id,
            credit.meter,
            utc(credit.period_start),
            utc(credit.period_end),
            credit.quantity,
            datetime.now(UTC) if now is None else utc(now),
        )

    async def list_tenants(self, limit: int = 1000, after: str | None = None) -> list[Tenant]:
        """Up to `limit` tenants ordered by id, starting after the id `after`."""
        if after is None:
            rows = await self.db.fetch(_LIST_TENANTS, limit)
        else:
            rows = await self.db.fetch(_LIST_TENANTS_AFTER, limit, after)
        return [tenant_of(row) for row in rows]

    async def create_tenant_if_missing(
        self, tenant: Tenant, *, now: datetime | None = None
    ) -> bool:
        """Insert `tenant` unless its id (or its Stripe customer) exists; True if inserted."""
        inserted = await self.db.fetchval(_CREATE_TENANT, *_tenant_args(tenant, now))
        return inserted is not None

    async def put_tenant(self, tenant: Tenant, *, now: datetime | None = None) -> Tenant:
        """Insert or update every field of `tenant` but its credits; returns the row as stored.

        An existing row keeps its created_at, and its status_changed_at unless
        the status is different.
        """
        row = await self.db.fetchrow(_PUT_TENANT, *_tenant_args(tenant, now))
        assert row is not None, "an upsert with RETURNING returns its row"
        return tenant_of(row)

    async def add_api_key(self, key: ApiKey) -> None:
        """Store a new key; LedgerIntegrityError if its prefix exists or its tenant does not."""
        await self.db.execute(
            _ADD_API_KEY,
            key.prefix,
            key.tenant_id,
            key.key_hash,
            key.name,
            utc(key.created_at),
            maybe_utc(key.revoked_at),
            maybe_utc(key.last_used_at),
        )

    async def get_api_keys(self, prefixes: Sequence[str]) -> dict[str, ApiKey]:
        """Those of `prefixes` that exist, by prefix: one query per `LOOKUP_BATCH`."""
        found: dict[str, ApiKey] = {}
        for chunk in _batches(prefixes):
            rows = await self.db.fetch(
                f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE prefix IN "
                f"({_marks(1, len(chunk))})",
                *chunk,
            )
            for row in rows:
                key = _api_key(row)
                found[key.prefix] = key
        return found

    async def get_api_key(self, prefix: str) -> ApiKey | None:
        """The key with `prefix`, revoked or not, or None."""
        row = await self.db.fetchrow(_GET_API_KEY, prefix)
        return None if row is None else _api_key(row)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKey]:
        """All keys of a tenant, oldest first."""
        return [_api_key(row) for row in await self.db.fetch(_LIST_API_KEYS, tenant_id)]

    async def revoke_api_key(self, prefix: str, at: datetime) -> bool:
        """Revoke the key at `at`; True if it existed and was still active."""
        return await self.db.fetchval(_REVOKE_API_KEY, prefix, utc(at)) is not None

    async def record_change(self, kind: str, key: str, at: datetime) -> None:
        """Append to the change feed that processes without Redis poll."""
        await self.db.execute(_RECORD_CHANGE, kind, key, utc(at))

    async def changes_after(self, change_id: int) -> list[tuple[int, str, str]]:
        """(id, kind, key) of the changes after `change_id`, oldest first."""
        rows = await self.db.fetch(_CHANGES_AFTER, change_id)
        return [(int(row["id"]), row["kind"], row["key"]) for row in rows]

    async def latest_change(self) -> int:
        """The id of the newest change, 0 when there is none."""
        return int(await self.db.fetchval(_LATEST_CHANGE) or 0)

    async def prune_changes(self, before: datetime) -> None:
        """Forget changes every process has had time to read."""
        await self.db.execute(_PRUNE_CHANGES, utc(before))

    async def touch_api_key(self, prefix: str, at: datetime) -> None:
        """Record that the key was used at `at`; an earlier time never replaces a later one."""
        await self.db.execute(_TOUCH_API_KEY, prefix, utc(at))
