"""The console's tenant lists on SQLite and PostgreSQL alike: search, sort, usage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.clock import EPOCH
from gateway.ledger import Ledger, Tenant
from gateway.ledger.records import LimitOverride
from gateway.ledger.tenant_search import TenantQuery, TenantSearch

T0 = datetime(2026, 11, 3, 12, tzinfo=UTC)
MONTH = datetime(2026, 11, 1, tzinfo=UTC)


async def seeded(ledger: Ledger) -> TenantSearch:
    tenants = [
        Tenant("acme", plan="pro", status="active", status_changed_at=T0, name="Acme Corp",
               stripe_customer="cus_ABC"),
        Tenant("beta", plan="free", status="past_due", status_changed_at=T0,
               stripe_customer="cus_acme2"),
        Tenant("gamma", plan="pro", status="active", status_changed_at=T0, name="Gamma",
               stripe_customer="cus_G", overrides={"api_calls": LimitOverride(5)}),
        Tenant("delta", plan="free", status="active", status_changed_at=T0, name="50%_off",
               stripe_customer="cus_D"),
    ]  # fmt: skip
    for tenant in tenants:
        await ledger.put_tenant(tenant, now=T0)
    return TenantSearch(ledger.db)


async def ids(search: TenantSearch, query: TenantQuery) -> tuple[int, list[str]]:
    total, page = await search.page(query, 0, 50)
    return total, [t.id for t in page]


async def test_a_search_finds_a_part_of_the_id_name_or_customer_in_any_case(
    ledger: Ledger,
) -> None:
    search = await seeded(ledger)
    assert await ids(search, TenantQuery(text="ACME")) == (2, ["acme", "beta"])
    assert await ids(search, TenantQuery(text="corp")) == (1, ["acme"])
    assert await ids(search, TenantQuery(text="cus_g")) == (1, ["gamma"])
    assert await ids(search, TenantQuery(text="ACME", plan="free")) == (1, ["beta"])
    # LIKE's wildcards are the text itself, and no match spans two of the fields.
    assert await ids(search, TenantQuery(text="0%_")) == (1, ["delta"])
    assert await ids(search, TenantQuery(text="%")) == (1, ["delta"])
    assert await ids(search, TenantQuery(text="corp\ncus")) == (0, [])
    # The kept column follows a change of name.
    await ledger.put_tenant(
        Tenant("gamma", plan="pro", status="active", status_changed_at=T0, name="Omega Ltd"),
        now=T0,
    )
    assert await ids(search, TenantQuery(text="omega")) == (1, ["gamma"])
    assert await ids(search, TenantQuery(text="gamma")) == (1, ["gamma"])  # its id


async def test_sorts_break_ties_by_id_in_the_same_direction(ledger: Ledger) -> None:
    search = await seeded(ledger)
    assert await ids(search, TenantQuery(sort="plan")) == (4, ["beta", "delta", "acme", "gamma"])
    descending = TenantQuery(sort="plan", descending=True)
    assert await ids(search, descending) == (4, ["gamma", "acme", "delta", "beta"])
    total, page = await search.page(descending, 1, 2)
    assert (total, [t.id for t in page]) == (4, ["acme", "delta"])
    assert [t.id for t in await search.tenants(["gamma", "nobody", "acme"])] == ["gamma", "acme"]


async def test_usage_of_the_selected_tenants_comes_with_what_their_limits_depend_on(
    ledger: Ledger,
) -> None:
    search = await seeded(ledger)
    rows = [
        ("acme", "api_calls", MONTH, 7), ("acme", "api_calls", MONTH - timedelta(days=30), 9),
        ("acme", "seats", EPOCH, 2), ("gamma", "api_calls", MONTH, 5),
        ("beta", "api_calls", MONTH, 0), ("delta", "api_calls", MONTH - timedelta(days=90), 4),
    ]  # fmt: skip
    for tenant_id, meter, start, quantity in rows:
        await ledger.db.execute(
            "INSERT INTO usage_totals (tenant_id, meter, period_start, quantity, events) "
            "VALUES ($1, $2, $3, $4, 1)",
            tenant_id, meter, start, quantity,
        )  # fmt: skip
    since = MONTH - timedelta(days=62)
    usage = await search.usage(TenantQuery(sort="plan", descending=True), since)
    # Newest plan first, then by id; nothing unused or older than `since`.
    assert [(u.tenant_id, u.meter, u.period_start, u.quantity) for u in usage[:1]] == [
        ("gamma", "api_calls", MONTH, 5)
    ]
    assert usage[0].overrides == {"api_calls": LimitOverride(5)} and usage[0].plan == "pro"
    assert sorted((u.tenant_id, u.meter, u.quantity) for u in usage[1:]) == [
        ("acme", "api_calls", 7), ("acme", "api_calls", 9), ("acme", "seats", 2),
    ]  # fmt: skip
    assert [u.tenant_id for u in await search.usage(TenantQuery(text="acme"), since)] == [
        "acme", "acme", "acme",
    ]  # fmt: skip
