"""The console's tenant lists: filtered, sorted pages of the tenants table, and the
usage of every tenant a filter selects, read in one statement to judge its state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.clock import EPOCH
from gateway.ledger.db import Database
from gateway.ledger.records import LimitOverride, Tenant
from gateway.ledger.store import TENANT_COLUMNS, overrides_of, tenant_of
from gateway.ledger.timestamps import loaded, required, utc

TENANT_SORTS = ("id", "plan", "status", "status_changed_at", "created_at", "stripe_customer")


@dataclass(frozen=True, slots=True)
class TenantQuery:
    """Which tenants a list shows, and in what order."""

    plan: str = ""
    status: str = ""
    text: str = ""  # a part of the id, the name or the Stripe customer, any case
    sort: str = "id"  # one of TENANT_SORTS
    descending: bool = False


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """What a tenant used of one meter in one period, with what its limit depends on."""

    tenant_id: str
    plan: str
    overrides: dict[str, LimitOverride]
    billing_anchor: datetime | None
    meter: str
    period_start: datetime
    quantity: int


class TenantSearch:
    """The tenants a `TenantQuery` selects, on a ledger `Database` of either dialect."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def page(self, query: TenantQuery, offset: int, limit: int) -> tuple[int, list[Tenant]]:
        """A page of the tenants `query` selects, in its order, and how many it selects."""
        clause, args = self._where(query)
        n = len(args)
        # A text search scans every row anyway: it counts them in the same scan. Else
        # the page comes in index order and the count is a scan of its own.
        counted = ", count(*) OVER () AS selected" if query.text else ""
        rows = await self.db.fetch(
            f"SELECT {TENANT_COLUMNS}{counted} FROM tenants {clause} "
            f"ORDER BY {self._order(query)} LIMIT ${n + 1} OFFSET ${n + 2}",
            *args, limit, offset,
        )  # fmt: skip
        if counted and (rows or not offset):
            total = rows[0]["selected"] if rows else 0
        else:
            total = await self.db.fetchval(f"SELECT count(*) FROM tenants {clause}", *args)
        return int(total), [tenant_of(row) for row in rows]

    async def usage(self, query: TenantQuery, since: datetime) -> list[TenantUsage]:
        """The usage in periods started since `since` (or that never reset) of the tenants
        `query` selects, in its order: one statement for however many tenants, and only
        the columns their limits depend on."""
        clause, args = self._where(query, "t.")
        args += [utc(since), EPOCH]
        n = len(args)
        used = f"u.quantity > 0 AND (u.period_start >= ${n - 1} OR u.period_start = ${n})"
        where = f"{clause} AND {used}" if clause else f"WHERE {used}"
        rows = await self.db.fetch(
            "SELECT t.id, t.plan, t.overrides, t.billing_anchor, u.meter, u.period_start, "
            "u.quantity FROM tenants t JOIN usage_totals u ON u.tenant_id = t.id "
            f"{where} ORDER BY {self._order(query, 't.')}",
            *args,
        )
        return [
            TenantUsage(
                r["id"],
                r["plan"],
                overrides_of(r["overrides"]),
                loaded(r["billing_anchor"]),
                r["meter"],
                required(loaded(r["period_start"])),
                int(r["quantity"]),
            )  # fmt: skip
            for r in rows
        ]

    async def tenants(self, ids: Sequence[str]) -> list[Tenant]:
        """The tenants of `ids`, in that order (those that exist)."""
        if not ids:
            return []
        marks = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
        rows = await self.db.fetch(
            f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id IN ({marks})", *ids
        )
        found = {row["id"]: tenant_of(row) for row in rows}
        return [found[i] for i in ids if i in found]

    def _where(self, query: TenantQuery, table: str = "") -> tuple[str, list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("plan", query.plan), ("status", query.status)):
            if value:
                args.append(value)
                where.append(f"{table}{column} = ${len(args)}")
        if query.text:
            # A line break separates the fields in `search`: in a text it is a space.
            text = query.text.replace("\n", " ")
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
            # `search` is the id, name and customer in lower case, one per line (a
            # column the database keeps): cheaper than three case-folding ILIKEs a row.
            where.append(f"{table}search LIKE lower(${len(args)}) ESCAPE '\\'")
        return (f"WHERE {' AND '.join(where)}" if where else ""), args

    def _order(self, query: TenantQuery, table: str = "") -> str:
        column = query.sort if query.sort in TENANT_SORTS else "id"
        direction = "DESC" if query.descending else "ASC"
        # Ties broken by id the same way: a total order (pages neither repeat nor skip a
        # tenant) that an index on (column, id) gives in either direction.
        tail = f", {table}id {direction}" if column != "id" else ""
        return f"{table}{column} {direction}{tail}"
