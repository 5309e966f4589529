"""The ledger's migrations, written once for both dialects, and the code that applies them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

from gateway.ledger.db import Database, Queries


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema; `statements` use the `{placeholders}` of `_TYPES`."""

    version: int
    name: str
    statements: list[str]


# SQLite keeps timestamps as ISO 8601 text (see db.py), which sorts in time order.
# Keys compare bytewise on both sides so that ORDER BY and keyset pagination agree.
_TYPES = {
    "postgresql": {
        "ts": "timestamptz",
        "bool": "boolean",
        "key": 'text COLLATE "C"',
        "serial_pk": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        # Monthly partitions, created ahead and dropped past retention by the worker.
        "partitioned_by_time": "PARTITION BY RANGE (at)",
        "generated": "STORED",
    },
    # AUTOINCREMENT: ids are never reused, even after pruning empties the table,
    # so a reader's "everything after id N" never misses a row.
    "sqlite": {
        "ts": "TEXT",
        "bool": "INTEGER",
        "key": "TEXT",
        "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "partitioned_by_time": "",
        # SQLite adds only virtual generated columns to an existing table.
        "generated": "VIRTUAL",
    },
}

MIGRATIONS = [
    Migration(
        1,
        "tenants and api keys",
        [
            """
            CREATE TABLE tenants (
                id {key} PRIMARY KEY,
                name text NULL,
                plan text NOT NULL,
                status text NOT NULL,
                status_changed_at {ts} NOT NULL,
                billing_anchor {ts} NULL,
                stripe_customer text NULL,
                stripe_subscription text NULL,
                disabled {bool} NOT NULL DEFAULT FALSE,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL
            )
            """,
            """
            CREATE UNIQUE INDEX tenants_stripe_customer ON tenants (stripe_customer)
            WHERE stripe_customer IS NOT NULL
            """,
            """
            CREATE TABLE api_keys (
                prefix {key} PRIMARY KEY,
                tenant_id {key} NOT NULL REFERENCES tenants (id),
                key_hash text NOT NULL,
                name text NULL,
                created_at {ts} NOT NULL,
                revoked_at {ts} NULL,
                last_used_at {ts} NULL
            )
            """,
            "CREATE INDEX api_keys_tenant_id ON api_keys (tenant_id)",
        ],
    ),
    Migration(
        2,
        "change feed for processes without a shared Redis",
        [
            """
            CREATE TABLE changes (
                id {serial_pk},
                kind text NOT NULL,
                key text NOT NULL,
                at {ts} NOT NULL
            )
            """,
        ],
    ),
    Migration(
        3,
        "per-tenant limit overrides and quota credits",
        [
            "ALTER TABLE tenants ADD COLUMN overrides text NULL",
            """
            CREATE TABLE credits (
                id {serial_pk},
                tenant_id {key} NOT NULL REFERENCES tenants (id),
                meter text NOT NULL,
                period_start {ts} NOT NULL,
                period_end {ts} NOT NULL,
                quantity bigint NOT NULL,
                created_at {ts} NOT NULL
            )
            """,
            "CREATE INDEX credits_tenant_period ON credits (tenant_id, period_end)",
        ],
    ),
    Migration(
        4,
        "usage events and their rollups",
        [
            # The time is part of the key: a unique key on a partitioned table
            # must include the partition column, and an event's time is fixed
            # with its id when the charge is made.
            """
            CREATE TABLE usage_events (
                at {ts} NOT NULL,
                id text NOT NULL,
                tenant_id {key} NOT NULL,
                meter text NOT NULL,
                quantity bigint NOT NULL,
                period_start {ts} NOT NULL,
                kind text NOT NULL,
                route text NOT NULL,
                method text NOT NULL,
                status integer NOT NULL,
                request_id text NOT NULL,
                PRIMARY KEY (at, id)
            ) {partitioned_by_time}
            """,
            """
            CREATE TABLE usage_totals (
                tenant_id {key} NOT NULL,
                meter {key} NOT NULL,
                period_start {ts} NOT NULL,
                quantity bigint NOT NULL,
                events bigint NOT NULL,
                PRIMARY KEY (tenant_id, meter, period_start)
            )
            """,
            """
            CREATE TABLE usage_hourly (
                tenant_id {key} NOT NULL,
                meter {key} NOT NULL,
                hour {ts} NOT NULL,
                quantity bigint NOT NULL,
                events bigint NOT NULL,
                PRIMARY KEY (tenant_id, meter, hour)
            )
            """,
        ],
    ),
    Migration(
        5,
        "the Stripe outbox and webhook events",
        [
            # What has been turned into outbox rows per tenant, meter and period:
            # the next row is the rollup's growth past `reported`.
            """
            CREATE TABLE stripe_cursors (
                tenant_id {key} NOT NULL,
                meter {key} NOT NULL,
                period_start {ts} NOT NULL,
                reported bigint NOT NULL,
                seq integer NOT NULL,
                PRIMARY KEY (tenant_id, meter, period_start)
            )
            """,
            # A row is written before it is sent and never changes its identifier,
            # quantity or timestamp: a resend is the same meter event.
            """
            CREATE TABLE stripe_outbox (
                identifier text PRIMARY KEY,
                tenant_id {key} NOT NULL,
                meter {key} NOT NULL,
                period_start {ts} NOT NULL,
                period_end {ts} NOT NULL,
                seq integer NOT NULL,
                customer text NOT NULL,
                event_name text NOT NULL,
                quantity bigint NOT NULL,
                event_at {ts} NOT NULL,
                created_at {ts} NOT NULL,
                state text NOT NULL,
                attempts integer NOT NULL,
                first_attempt_at {ts} NULL,
                next_attempt_at {ts} NOT NULL,
                sent_at {ts} NULL,
                last_error text NULL,
                UNIQUE (tenant_id, meter, period_start, seq)
            )
            """,
            """
            CREATE INDEX stripe_outbox_pending ON stripe_outbox (next_attempt_at)
            WHERE state = 'pending'
            """,
            # One sender per tenant and meter at a time, across worker processes.
            """
            CREATE TABLE stripe_leases (
                tenant_id {key} NOT NULL,
                meter {key} NOT NULL,
                holder text NOT NULL,
                until {ts} NOT NULL,
                PRIMARY KEY (tenant_id, meter)
            )
            """,
            """
            CREATE TABLE stripe_webhook_events (
                id text PRIMARY KEY,
                type text NOT NULL,
                created {ts} NOT NULL,
                received_at {ts} NOT NULL,
                result text NOT NULL
            )
            """,
            # The `created` of the newest Stripe event applied to the tenant: an
            # older one arriving late changes nothing.
            "ALTER TABLE tenants ADD COLUMN stripe_updated_at {ts} NULL",
        ],
    ),
    Migration(
        6,
        "tenant signals, their notifications, refusals per hour, quarantined usage",
        [
            # One row per signal, whichever process saw it first: its id is made
            # from what it is about (type, tenant, meter, period, threshold).
            """
            CREATE TABLE signals (
                id {key} PRIMARY KEY,
                type text NOT NULL,
                tenant_id {key} NOT NULL,
                meter {key} NULL,
                period_start {ts} NULL,
                created_at {ts} NOT NULL,
                payload text NOT NULL
            )
            """,
            "CREATE INDEX signals_by_tenant ON signals (tenant_id, created_at)",
            # One delivery per signal and endpoint, leased by one worker at a time.
            """
            CREATE TABLE notifications (
                signal_id {key} NOT NULL,
                endpoint text NOT NULL,
                state text NOT NULL,
                attempts integer NOT NULL DEFAULT 0,
                created_at {ts} NOT NULL,
                next_attempt_at {ts} NOT NULL,
                lease_holder text NULL,
                lease_until {ts} NULL,
                delivered_at {ts} NULL,
                last_error text NULL,
                PRIMARY KEY (signal_id, endpoint)
            )
            """,
            """
            CREATE INDEX notifications_due ON notifications (next_attempt_at)
            WHERE state = 'pending'
            """,
            # The worker's watch reads the recent status changes.
            "CREATE INDEX tenants_status_changed ON tenants (status_changed_at)",
            # Quota and rate-limit refusals per tenant and hour, for the console.
            """
            CREATE TABLE refusals_hourly (
                tenant_id {key} NOT NULL,
                hour {ts} NOT NULL,
                status integer NOT NULL,
                name {key} NOT NULL,
                count bigint NOT NULL,
                PRIMARY KEY (tenant_id, hour, status, name)
            )
            """,
            # Usage entries the ledger refused for good, set aside to be replayed.
            """
            CREATE TABLE usage_quarantine (
                id {serial_pk},
                source text NOT NULL,
                line text NOT NULL,
                error text NOT NULL,
                at {ts} NOT NULL
            )
            """,
        ],
    ),
    Migration(
        7,
        "the console's tenant search and sort orders",
        [
            # The id, name and Stripe customer in lower case, one per line: a search
            # is one LIKE on a column kept by the database, not three ILIKEs a row.
            """
            ALTER TABLE tenants ADD COLUMN search text GENERATED ALWAYS AS (lower(
                id || '
' || coalesce(name, '') || '
' || coalesce(stripe_customer, ''))) {generated}
            """,
            # Each sort order of the tenants table, ties broken by id: a page deep in
            # a sorted list of many tenants is read from an index, not sorted.
            "CREATE INDEX tenants_by_plan ON tenants (plan, id)",
            "CREATE INDEX tenants_by_status ON tenants (status, id)",
            "CREATE INDEX tenants_by_created ON tenants (created_at, id)",
            "CREATE INDEX tenants_by_customer ON tenants (stripe_customer, id)",
            "DROP INDEX tenants_status_changed",
            "CREATE INDEX tenants_status_changed ON tenants (status_changed_at, id)",
        ],
    ),
]
LATEST_VERSION = MIGRATIONS[-1].version

# Any fixed number works; it only has to differ from other users of advisory locks.
_MIGRATION_LOCK_ID = 0x6C65_6467_6572_0001  # "ledger" + 1
_CREATE_MIGRATIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        applied_at {ts} NOT NULL
    )
"""
_TABLE_EXISTS = {
    "postgresql": "SELECT to_regclass($1) IS NOT NULL",
    "sqlite": "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)",
}


@cache
def _render(statement: str, dialect: str) -> str:
    return statement.format_map(_TYPES[dialect])


async def _apply(db: Database, tx: Queries, migration: Migration) -> bool:
    if db.dialect == "postgresql":
        # Held to the end of the transaction: a second migrating process waits
        # here, then finds the version applied and skips it.
        await tx.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
    # SQLite needs no lock of its own: BEGIN IMMEDIATE already serializes writers.
    await tx.execute(_render(_CREATE_MIGRATIONS_TABLE, db.dialect))
    done = "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)"
    if await tx.fetchval(done, migration.version):
        return False
    for statement in migration.statements:
        await tx.execute(_render(statement, db.dialect))
    await tx.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        migration.version,
        migration.name,
        datetime.now(UTC),
    )
    return True


async def migrate(db: Database) -> list[int]:
    """Apply the pending migrations in order, each in its own transaction; return their versions."""
    applied = []
    current = await schema_version(db)
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue  # the common case, settled without a transaction or a lock
        async with db.transaction() as tx:
            if await _apply(db, tx, migration):
                applied.append(migration.version)
    return applied


async def schema_version(db: Database) -> int:
    """The highest applied migration, 0 on a database never migrated."""
    if not await db.fetchval(_TABLE_EXISTS[db.dialect], "schema_migrations"):
        return 0
    return int(await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
