"""Per-tenant overrides and credits through the admin API, enforced at once."""

from __future__ import annotations

from gateway.server import Gateway
from tests.test_quota_gateway import admin, call
from tests.test_quota_gateway import gateway as gateway  # the fixture


async def statuses(gw: Gateway, n: int) -> list[int]:
    return [(await call(gw, "acme"))[0] for _ in range(n)]


async def test_an_override_replaces_the_plan_limit_for_one_tenant(gateway: Gateway) -> None:
    assert await statuses(gateway, 6) == [200] * 6  # starter: 6
    body = {"overrides": {"api_calls": {"limit": 8, "warn_at": [0.9]}}}
    status, tenant = await admin(gateway, "PUT", "/admin/tenants/acme", body)
    assert status == 200
    assert tenant["overrides"] == {
        "api_calls": {"limit": 8, "enforcement": "hard", "warn_at": [0.9]}
    }
    status, headers, _ = await call(gateway, "acme")
    assert status == 200 and headers["RateLimit-Policy"].startswith('"api_calls";q=8;')
    assert await statuses(gateway, 2) == [200, 402]
    _, view = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    api = view["meters"]["api_calls"]
    assert (api["used"], api["limit"], api["override"], api["state"]) == (8, 8, True, "exhausted")
    # Another tenant on the same plan keeps the plan's limit.
    _, other = await admin(gateway, "GET", "/admin/tenants/beta/usage")
    assert other["meters"]["api_calls"]["override"] is False
    await admin(gateway, "PUT", "/admin/tenants/acme", {"overrides": {"api_calls": {"limit": -1}}})
    assert await statuses(gateway, 3) == [200] * 3  # unlimited for acme now
    await admin(gateway, "PUT", "/admin/tenants/acme", {"overrides": {}})
    assert await statuses(gateway, 1) == [402]  # back to the plan's 6


async def test_bad_overrides_are_refused_with_the_field(gateway: Gateway) -> None:
    cases = [
        ({"overrides": {"nope": {"limit": 1}}}, "overrides.nope: unknown meter 'nope'"),
        ({"overrides": {"api_calls": {"limit": "lots"}}}, "overrides.api_calls.limit:"),
        ({"overrides": {"api_calls": {"limit": 1, "extra": 1}}}, "overrides.api_calls.extra:"),
        ({"overrides": None}, "overrides: may not be null"),
    ]
    for body, message in cases:
        status, problem = await admin(gateway, "PUT", "/admin/tenants/acme", body)
        assert status == 422 and problem["detail"].startswith(message), problem
    _, tenant = await admin(gateway, "GET", "/admin/tenants/acme")
    assert tenant["overrides"] == {}


async def test_credits_add_to_the_current_period_only(gateway: Gateway) -> None:
    assert await statuses(gateway, 7) == [200] * 6 + [402]
    status, credit = await admin(
        gateway, "POST", "/admin/tenants/acme/credits", {"meter": "api_calls", "quantity": 3}
    )
    assert status == 201
    assert (credit["quantity"], credit["credited"]) == (3, 3)
    _, view = await admin(gateway, "GET", "/admin/tenants/acme/usage")
    assert credit["period"] == view["meters"]["api_calls"]["period"]
    api = view["meters"]["api_calls"]
    assert (api["limit"], api["credit"], api["remaining"]) == (9, 3, 3)
    assert await statuses(gateway, 4) == [200] * 3 + [402]
    # Taking back credit is allowed down to none, never below.
    status, back = await admin(
        gateway, "POST", "/admin/tenants/acme/credits", {"meter": "api_calls", "quantity": -1}
    )
    assert (status, back["credited"]) == (201, 2)
    bad = [
        ({"meter": "api_calls", "quantity": -3}, 422, "quantity: -3 would take back more"),
        ({"meter": "api_calls", "quantity": 0}, 422, "quantity: expected a non-zero integer"),
        ({"meter": "api_calls", "quantity": "5"}, 422, "quantity: expected"),
        ({"meter": "team_members", "quantity": 1}, 422, "meter: team_members is a gauge"),
        ({"meter": "nope", "quantity": 1}, 422, "meter: unknown meter 'nope'"),
        ({"quantity": 1}, 422, "meter: expected a meter name"),
    ]
    for body, expected, message in bad:
        status, problem = await admin(gateway, "POST", "/admin/tenants/acme/credits", body)
        assert (status, problem["detail"][: len(message)]) == (expected, message)
    status, _ = await admin(
        gateway, "POST", "/admin/tenants/ghost/credits", {"meter": "api_calls", "quantity": 1}
    )
    assert status == 404
