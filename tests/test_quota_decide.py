"""The quota decision: all or nothing, 402 before 429, and the response fields."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.clock import US_PER_S
from gateway.config.types import UNLIMITED
from gateway.quota.gcra import RateLimit
from gateway.quota.periods import period_of
from gateway.quota.rules import Decision, MeterLimit, decide, meter_state

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
NOW_US = int(NOW.timestamp()) * US_PER_S
MONTH = period_of("billing_cycle", NOW)  # Nov 2026: 30 days
API = MeterLimit("api_calls", "counter", 1000, hard=True, warn_at=(0.8, 0.9))
SOFT = MeterLimit("api_calls", "counter", 1000, hard=False, warn_at=(0.8,))
TOKENS = MeterLimit("tokens", "counter", 50_000, hard=True)
MEMBERS = MeterLimit("team_members", "gauge", 3, hard=True)
PER_SECOND = RateLimit("per_second", rate=5, per_s=1, burst=10)


def run(
    limits: list[MeterLimit],
    used: dict[str, int],
    costs: dict[str, int],
    rate_limits: tuple[RateLimit, ...] = (),
    tats: dict[str, int] | None = None,
    needs_remaining: frozenset[str] = frozenset(),
) -> Decision:
    periods = {m.meter: MONTH for m in limits if m.kind == "counter"}
    return decide(
        limits, periods, used, costs, rate_limits, tats or {}, NOW, NOW_US,
        needs_remaining=needs_remaining,
    )  # fmt: skip


def test_hard_quota_allows_up_to_the_limit_then_402() -> None:
    last = run([API], {"api_calls": 999}, {"api_calls": 1})
    assert last.allowed and last.used_after == {"api_calls": 1000}
    assert last.policy == '"api_calls";q=1000;w=2592000'
    seconds_left = int((MONTH.end - NOW).total_seconds())
    assert last.ratelimit == f'"api_calls";r=0;t={seconds_left}'
    refused = run([API], {"api_calls": 1000}, {"api_calls": 1})
    assert refused.refusal is not None
    assert (refused.refusal.status, refused.refusal.name, refused.refusal.used) == (
        402, "api_calls", 1000
    )  # fmt: skip
    assert refused.refusal.reset_at == MONTH.end
    assert refused.refusal.retry_after_s == seconds_left
    assert refused.used_after == {} and refused.tats_after == {}


def test_warn_at_thresholds_and_soft_overage() -> None:
    assert run([API], {"api_calls": 700}, {"api_calls": 1}).warnings == ()
    assert run([API], {"api_calls": 799}, {"api_calls": 1}).warnings == ("api_calls 80%",)
    assert run([API], {"api_calls": 850}, {"api_calls": 1}).warnings == ("api_calls 85%",)
    over = run([SOFT], {"api_calls": 1000}, {"api_calls": 1})
    assert over.allowed and over.warnings == ("api_calls 100% (overage)",)
    assert over.policy == ""  # soft quotas are not advertised
    assert run([SOFT], {"api_calls": 1500}, {"api_calls": 1}).warnings == (
        "api_calls 150% (overage)",
    )


def test_all_or_nothing_across_meters_and_rate_limits() -> None:
    # The rate limit refuses: the quota is not charged either.
    busy = {"per_second": NOW_US + 10 * PER_SECOND.interval_us}
    limited = run([API], {"api_calls": 10}, {"api_calls": 1}, (PER_SECOND,), busy)
    assert limited.refusal is not None and limited.refusal.status == 429
    assert limited.refusal.retry_after_s == 1
    assert limited.used_after == {} and limited.tats_after == {}
    # The quota refuses: the rate limit is not charged.
    exhausted = run([API], {"api_calls": 1000}, {"api_calls": 1}, (PER_SECOND,))
    assert exhausted.refusal is not None and exhausted.refusal.status == 402
    assert exhausted.tats_after == {}
    # Both refuse: the quota wins (waiting would not help).
    both = run([API], {"api_calls": 1000}, {"api_calls": 1}, (PER_SECOND,), busy)
    assert both.refusal is not None and both.refusal.status == 402
    # A gauge at its limit refuses the whole request.
    full = run([API, MEMBERS], {"api_calls": 1, "team_members": 3},
               {"api_calls": 1, "team_members": 1})  # fmt: skip
    assert full.refusal is not None and full.refusal.name == "team_members"


def test_allowed_request_charges_everything_and_advertises_limits() -> None:
    decision = run([API, TOKENS], {"api_calls": 5}, {"api_calls": 1}, (PER_SECOND,))
    assert decision.allowed
    assert decision.used_after == {"api_calls": 6}
    assert decision.tats_after == {"per_second": NOW_US + PER_SECOND.interval_us}
    assert decision.policy == (
        '"api_calls";q=1000;w=2592000, "tokens";q=50000;w=2592000, "per_second";q=10;w=2'
    )
    assert decision.ratelimit.endswith('"per_second";r=9;t=1')


def test_response_charged_meters_need_something_left() -> None:
    needs = frozenset({"tokens"})
    assert run([TOKENS], {"tokens": 49_999}, {}, needs_remaining=needs).allowed
    refused = run([TOKENS], {"tokens": 50_000}, {}, needs_remaining=needs)
    assert refused.refusal is not None and refused.refusal.name == "tokens"


def test_meters_outside_the_plan_are_counted_never_refused() -> None:
    decision = run([], {"exports": 10**9}, {"exports": 1})
    assert decision.allowed and decision.used_after == {"exports": 10**9 + 1}
    unlimited = MeterLimit("api_calls", "counter", UNLIMITED)
    assert run([unlimited], {"api_calls": 10**9}, {"api_calls": 1}).policy == ""


def test_meter_states() -> None:
    assert [meter_state(API, u) for u in (0, 799, 800, 999, 1000)] == [
        "ok", "ok", "warning", "warning", "exhausted"
    ]  # fmt: skip
    assert [meter_state(SOFT, u) for u in (799, 800, 1000, 1001)] == [
        "ok", "warning", "warning", "overage"
    ]  # fmt: skip
    assert meter_state(MeterLimit("x", "counter", UNLIMITED), 10**9) == "ok"


def test_rate_limit_policy_advertises_a_full_burst_and_its_refill_time() -> None:
    # DESIGN 6a: q=<burst>;w=<ceil(burst * per_s / rate)>, so that r never exceeds q.
    cases = [
        (RateLimit("a", rate=10, per_s=1, burst=20), '"a";q=20;w=2'),
        (RateLimit("b", rate=5, per_s=1, burst=10), '"b";q=10;w=2'),
        (RateLimit("c", rate=3, per_s=1, burst=1), '"c";q=1;w=1'),
        (RateLimit("d", rate=100, per_s=60, burst=7), '"d";q=7;w=5'),
        (RateLimit("e", rate=1, per_s=0.5, burst=1), '"e";q=1;w=1'),
        (RateLimit("f", rate=1, per_s=3600, burst=3), '"f";q=3;w=10800'),
    ]
    for limit, policy in cases:
        assert run([], {}, {}, (limit,)).policy == policy


def test_refusals_carry_ratelimit_with_r_0_for_the_refusing_policy() -> None:
    seconds_left = int((MONTH.end - NOW).total_seconds())
    quota = run([API], {"api_calls": 998}, {"api_calls": 5}, (PER_SECOND,))
    assert quota.refusal is not None and quota.refusal.status == 402
    # The refusing quota at 0 (2 left, but not the 5 asked), the rate limit as it stands.
    assert quota.ratelimit == f'"api_calls";r=0;t={seconds_left}, "per_second";r=10;t=0'
    # The rate limit's burst spent: r=0 until the next request may pass.
    full = NOW_US + 2 * US_PER_S
    limited = run([API], {"api_calls": 5}, {"api_calls": 1}, (PER_SECOND,), {"per_second": full})
    assert limited.refusal is not None and limited.refusal.status == 429
    assert limited.ratelimit == f'"api_calls";r=995;t={seconds_left}, "per_second";r=0;t=1'
    # A gauge is not advertised: no field to carry.
    gauge = run([MEMBERS], {"team_members": 3}, {"team_members": 1})
    assert gauge.refusal is not None and (gauge.policy, gauge.ratelimit) == ("", "")
