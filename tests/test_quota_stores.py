"""One contract suite for both counter stores (memory://, redis://)."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.asyncio.connection import Connection

from gateway.clock import to_us
from gateway.config.types import UNLIMITED
from gateway.ledger.events import EventContext, UsageEvent, decode
from gateway.quota import keyspace
from gateway.quota.gcra import RateLimit
from gateway.quota.memory import MemoryStore
from gateway.quota.periods import Period, periods_around
from gateway.quota.plan import ChargePlan
from gateway.quota.queue import EventQueue
from gateway.quota.redis_client import CallTemplate
from gateway.quota.redis_store import RedisStore
from gateway.quota.rules import MeterLimit
from gateway.quota.store import ChargeRequest, CounterStore, MeterCharge, StoreUnavailable
from tests.conftest import whole
from tests.servers import RedisServer

API = MeterLimit("api_calls", "counter", 3, hard=True, warn_at=(0.5,))
SOFT = MeterLimit("api_calls", "counter", 3, hard=False)
MEMBERS = MeterLimit("team_members", "gauge", 2, hard=True)
TOKENS = MeterLimit("tokens", "counter", 100, hard=True)
PER_SECOND = RateLimit("per_second", rate=2, per_s=1, burst=2)


async def flushed(*servers: RedisServer, timeout_ms: int = 2000) -> RedisStore:
    """A store on the shared private Redis (or every node of a cluster), emptied first."""
    for server in servers:
        client = aioredis.Redis.from_url(server.url)
        await client.flushall()
        await client.aclose()
    return await whole(await RedisStore.open(servers[0].url, shards=16, timeout_ms=timeout_ms))


@pytest.fixture(params=["memory", "redis", "cluster", "queue"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    """Every counter store; "queue": Redis with its usage queue on another database."""
    if request.param == "memory":
        yield await whole(MemoryStore())
        return
    if request.param == "queue":
        server = request.getfixturevalue("shared_redis_server")
        await (await flushed(server)).close()
        queue = EventQueue(aioredis.Redis.from_url(server.url[:-1] + "1"), 16, 2.0)
        with_queue = await whole(RedisStore(aioredis.Redis.from_url(server.url), 16, 2.0,
                                            queue=queue))  # fmt: skip
        yield with_queue
        await with_queue.close()
        return
    if request.param == "redis":
        servers = [request.getfixturevalue("shared_redis_server")]
    else:
        servers = request.getfixturevalue("shared_redis_cluster").nodes
    redis_store = await flushed(*servers)
    yield redis_store
    await redis_store.close()


def months() -> tuple[Period, ...]:
    return periods_around("month", datetime.now(UTC))


def charge(
    *meters: MeterCharge, rates: tuple[RateLimit, ...] = (), request_id: str | None = None
) -> ChargeRequest:
    return ChargeRequest(
        "acme", request_id or uuid.uuid4().hex, meters, tuple((r, "") for r in rates)
    )


def api(cost: int = 1, limit: MeterLimit = API) -> MeterCharge:
    return MeterCharge(limit, cost=cost, periods=months())


async def test_a_hard_quota_is_exact_and_refusals_charge_nothing(store: CounterStore) -> None:
    results = [await store.check_and_charge(charge(api())) for _ in range(5)]
    assert [r.decision.allowed for r in results] == [True, True, True, False, False]
    refusal = results[3].decision.refusal
    assert refusal is not None and (refusal.status, refusal.used, refusal.limit) == (402, 3, 3)
    assert results[1].decision.warnings == ("api_calls 66%",)
    current = months()[1]
    assert results[0].periods == {"api_calls": current}
    assert await store.level("acme", "api_calls", current) == 3


async def test_a_retried_request_id_replays_and_charges_once(store: CounterStore) -> None:
    first = await store.check_and_charge(charge(api(), request_id="r-1"))
    again = await store.check_and_charge(charge(api(), request_id="r-1"))
    assert (first.replayed, again.replayed) == (False, True)
    assert again.decision == first.decision and again.now_us == first.now_us
    assert await store.level("acme", "api_calls", months()[1]) == 1


async def test_a_forgotten_id_is_new_again(store: CounterStore) -> None:
    # The engine forgets an id once it has the answer: the memo goes (Redis: with
    # the next round), where it would otherwise be kept for MEMO_TTL_MS.
    current = months()[1]
    await store.check_and_charge(charge(api(limit=SOFT), request_id="r-1"))
    await store.apply_once("acme", "op-1", [("api_calls", current, 1)])
    store.forget("acme", "r-1")
    store.forget("acme", "op-1")
    await store.check_and_charge(charge(api(limit=SOFT), request_id="r-2"))
    assert not (await store.check_and_charge(charge(api(limit=SOFT), request_id="r-1"))).replayed
    assert await store.apply_once("acme", "op-1", [("api_calls", current, 1)])
    assert await store.level("acme", "api_calls", current) == 5


async def test_all_or_nothing_between_quota_and_rate_limit(store: CounterStore) -> None:
    both = [await store.check_and_charge(charge(api(), rates=(PER_SECOND,))) for _ in range(3)]
    assert [r.decision.allowed for r in both] == [True, True, False]
    third = both[2].decision.refusal
    assert third is not None and third.status == 429 and third.retry_after_s == 1
    # The rate-limited third request charged no quota.
    assert await store.level("acme", "api_calls", months()[1]) == 2
    # Now the quota refuses while the rate limit would allow: nothing is charged there either.
    await store.apply_once("acme", "op-1", [("api_calls", months()[1], 1)])
    await asyncio.sleep(1.05)
    refused = await store.check_and_charge(charge(api(), rates=(PER_SECOND,)))
    assert refused.decision.refusal is not None and refused.decision.refusal.status == 402
    allowed = await store.check_and_charge(charge(rates=(PER_SECOND,)))
    assert allowed.decision.allowed  # the rate limit still had its slot


async def test_gauges_and_adjustments(store: CounterStore) -> None:
    add_member = MeterCharge(MEMBERS, cost=1)
    await store.set_level("acme", "team_members", None, 2)
    refused = await store.check_and_charge(charge(add_member))
    assert refused.decision.refusal is not None and refused.decision.refusal.name == "team_members"
    assert await store.apply_once("acme", "remove-1", [("team_members", None, -1)])
    assert await store.level("acme", "team_members", None) == 1
    assert (await store.check_and_charge(charge(add_member))).decision.allowed
    assert await store.level("acme", "team_members", None) == 2


async def test_writes_apply_once_per_operation(store: CounterStore) -> None:
    period = months()[1]
    assert await store.apply_once("acme", "op-a", [("api_calls", period, 2)])
    assert not await store.apply_once("acme", "op-a", [("api_calls", period, 2)])
    # An operation id a check_and_charge already used counts as done: a charge
    # spooled after a timeout is not applied on top of the one that ran late.
    assert (await store.check_and_charge(charge(api(), request_id="late"))).decision.allowed
    assert not await store.apply_once("acme", "late", [("api_calls", period, 1)])
    assert await store.level("acme", "api_calls", period) == 3


async def test_soft_overage_unlimited_and_response_charged_meters(store: CounterStore) -> None:
    over = [await store.check_and_charge(charge(api(limit=SOFT))) for _ in range(4)]
    assert all(r.decision.allowed for r in over)
    assert over[3].decision.warnings == ("api_calls 133% (overage)",)
    unlimited = MeterLimit("exports", "counter", UNLIMITED)
    for _ in range(3):
        result = await store.check_and_charge(charge(api(limit=unlimited, cost=1000)))
        assert result.decision.allowed
    tokens = MeterCharge(TOKENS, needs_remaining=True, periods=months())
    assert (await store.check_and_charge(charge(tokens))).decision.allowed
    await store.apply_once("acme", "resp-1", [("tokens", months()[1], 100)])  # the response said
    assert not (await store.check_and_charge(charge(tokens))).decision.allowed


async def test_the_store_clock_picks_the_period(store: CounterStore) -> None:
    # By the gateway's clock "current" has just ended; by the store's it is "next".
    now = datetime.now(UTC)
    ended = Period(now - timedelta(hours=2), now - timedelta(seconds=5))
    following = Period(now - timedelta(seconds=5), now + timedelta(hours=1))
    earlier = Period(now - timedelta(hours=4), now - timedelta(hours=2))
    meter = MeterCharge(API, cost=1, periods=(earlier, ended, following))
    result = await store.check_and_charge(charge(meter))
    assert result.periods == {"api_calls": following}
    assert await store.level("acme", "api_calls", following) == 1
    assert await store.level("acme", "api_calls", ended) == 0


async def test_credits_raise_the_limit_of_their_own_period_only(store: CounterStore) -> None:
    now = datetime.now(UTC)
    ended = Period(now - timedelta(hours=2), now - timedelta(seconds=5))
    following = Period(now - timedelta(seconds=5), now + timedelta(hours=1))
    earlier = Period(now - timedelta(hours=4), now - timedelta(hours=2))
    # The gateway's "current" period is over by the store's clock: its credit of 10
    # must not apply to the period the store charges, which has a credit of 2.
    periods = (earlier, ended, following)
    credited = MeterCharge(API, cost=1, periods=periods, credits=(0, 10, 2))
    results = [await store.check_and_charge(charge(credited)) for _ in range(6)]
    assert [r.decision.allowed for r in results] == [True] * 5 + [False]
    refusal = results[5].decision.refusal
    assert refusal is not None and (refusal.limit, refusal.used) == (5, 5)
    unlimited = MeterLimit("api_calls", "counter", UNLIMITED)
    free = MeterCharge(unlimited, cost=1, periods=periods, credits=(0, 0, 2))
    assert (await store.check_and_charge(charge(free))).decision.allowed


async def test_concurrent_charges_are_exact(shared_redis_server: RedisServer) -> None:
    stores = [await flushed(shared_redis_server)]
    stores += [await RedisStore.open(shared_redis_server.url, 16, 2000) for _ in range(3)]
    limit = MeterLimit("api_calls", "counter", 100, hard=True)
    try:
        results = await asyncio.gather(
            *(stores[i % 4].check_and_charge(charge(api(limit=limit))) for i in range(500))
        )
        assert sum(r.decision.allowed for r in results) == 100
        assert await stores[0].level("acme", "api_calls", months()[1]) == 100
    finally:
        for s in stores:
            await s.close()


async def test_a_flushed_script_cache_is_reloaded(shared_redis_server: RedisServer) -> None:
    store = await flushed(shared_redis_server)
    client = aioredis.Redis.from_url(shared_redis_server.url)
    try:
        assert (await store.check_and_charge(charge(api()))).decision.allowed
        await client.script_flush()  # as after a Redis restart: NOSCRIPT on the next call
        assert (await store.check_and_charge(charge(api()))).decision.allowed
    finally:
        await client.aclose()
        await store.close()


async def test_stopped_or_paused_redis_is_unavailable_within_the_timeout(
    redis_server: RedisServer,
) -> None:
    store = await whole(await RedisStore.open(redis_server.url, 16, timeout_ms=50))
    try:
        assert (await store.check_and_charge(charge(api()))).decision.allowed
        redis_server.pause()
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            await store.check_and_charge(charge(api()))
        paused_s = time.perf_counter() - started
        redis_server.resume()
        redis_server.stop()
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            await store.check_and_charge(charge(api()))
        stopped_s = time.perf_counter() - started
    finally:
        redis_server.resume() if redis_server.proc else None
        await store.close()
    print(f"\npaused Redis: StoreUnavailable after {paused_s * 1000:.0f} ms; "
          f"stopped: {stopped_s * 1000:.0f} ms (timeout 50 ms)")  # fmt: skip
    assert paused_s < 0.05 + 0.5 and stopped_s < 0.05 + 0.5


def test_a_busy_process_does_not_take_its_own_lateness_for_the_stores(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call is sent, then the event loop is held longer than the timeout (a
    # process busy with other requests): the answer came long before the loop
    # could read it, and the timer is due by then too. On uvloop, as the gateway
    # runs, timers go before the sockets in each turn of the loop.
    async def scenario() -> tuple[bool, int]:
        store = await whole(await RedisStore.open(redis_server.url, 16, timeout_ms=50))
        await store.check_and_charge(charge(api()))  # the script loaded: one round trip a call
        send = Connection.send_packed_command

        async def sent_then_busy(conn: Connection, *args: Any, **kwargs: Any) -> None:
            await send(conn, *args, **kwargs)
            asyncio.get_running_loop().call_soon(time.sleep, 0.2)

        monkeypatch.setattr(Connection, "send_packed_command", sent_then_busy)
        try:
            allowed = (await store.check_and_charge(charge(api()))).decision.allowed
            return allowed, await store.level("acme", "api_calls", months()[1])  # a call alone
        finally:
            monkeypatch.undo()
            await store.close()

    assert uvloop.run(scenario()) == (True, 2)


async def test_a_voided_request_charges_nothing_whenever_it_runs(store: CounterStore) -> None:
    period = months()[1]
    # It ran and charged before the caller gave up: the charge is undone.
    ran = charge(api(), request_id="ran-late")
    assert (await store.check_and_charge(ran)).decision.allowed
    await store.void(ran)
    assert await store.level("acme", "api_calls", period) == 0
    # It had not run yet: when it does, it charges nothing.
    pending = charge(api(), request_id="not-yet")
    await store.void(pending)
    with pytest.raises(StoreUnavailable):
        await store.check_and_charge(pending)
    assert await store.level("acme", "api_calls", period) == 0
    # A second void changes nothing.
    await store.void(ran)
    assert await store.level("acme", "api_calls", period) == 0


async def test_a_refused_late_check_does_not_block_the_spooled_charge(
    store: CounterStore,
) -> None:
    period = months()[1]
    await store.apply_once("acme", "fill", [("api_calls", period, 3)])  # the quota is used up
    refused = charge(api(), request_id="served-open")
    assert not (await store.check_and_charge(refused)).decision.allowed  # ran late, refused
    # The request was served under fail_open: its spooled charge must still count.
    assert await store.apply_once("acme", "served-open", [("api_calls", period, 1)])
    assert await store.level("acme", "api_calls", period) == 4


async def test_a_void_gives_back_the_rate_limit_slot(store: CounterStore) -> None:
    first = charge(rates=(PER_SECOND,), request_id="slot-1")
    second = charge(rates=(PER_SECOND,), request_id="slot-2")
    assert (await store.check_and_charge(first)).decision.allowed
    assert (await store.check_and_charge(second)).decision.allowed
    assert not (await store.check_and_charge(charge(rates=(PER_SECOND,)))).decision.allowed
    await store.void(second)  # answered 503: its slot comes back
    assert (await store.check_and_charge(charge(rates=(PER_SECOND,)))).decision.allowed


async def test_a_void_gives_back_no_slot_that_has_drained(store: CounterStore) -> None:
    early = charge(rates=(PER_SECOND,), request_id="drained")
    assert (await store.check_and_charge(early)).decision.allowed
    await asyncio.sleep(0.6)  # past its TAT: the next two start from now, not from its slot
    for _ in range(2):
        assert (await store.check_and_charge(charge(rates=(PER_SECOND,)))).decision.allowed
    await store.void(early)  # a slot given back now would be a third in a burst of two
    assert not (await store.check_and_charge(charge(rates=(PER_SECOND,)))).decision.allowed


async def test_a_voided_refusal_lets_nothing_charge_under_its_id(store: CounterStore) -> None:
    period = months()[1]
    await store.apply_once("acme", "fill", [("api_calls", period, 3)])
    refused = charge(api(), request_id="refused-then-voided")
    assert not (await store.check_and_charge(refused)).decision.allowed  # ran late, refused
    await store.void(refused)  # answered 503, never served: its id is settled
    assert not await store.apply_once("acme", refused.request_id, [("api_calls", period, 1)])
    with pytest.raises(StoreUnavailable):
        await store.check_and_charge(refused)
    assert await store.level("acme", "api_calls", period) == 3


async def recorded(store: CounterStore) -> list[UsageEvent]:
    """Every usage event the store recorded, oldest first."""
    if isinstance(store, MemoryStore):
        return list(store.events)
    assert isinstance(store, RedisStore)
    client = store._client if store.queue is None else store.queue.client
    found = []
    for shard in range(16):
        entries = await client.xrange(keyspace.shard_stream(shard))
        for _, fields in entries or ():
            assert fields is not None
            found.append(decode(fields[b"e"]))
    return sorted(found, key=lambda e: e.at_us)


async def test_every_change_records_one_usage_event(store: CounterStore) -> None:
    context = EventContext("api", "POST", "rid-1")
    members = MeterCharge(MEMBERS, cost=1)
    request = replace(charge(api(), members, request_id="ev-1"), context=context)
    assert (await store.check_and_charge(request)).decision.allowed
    await store.check_and_charge(request)  # a retry: replayed, no second event
    current = months()[1]
    refund = [("api_calls", current, -1)]
    await store.apply_once("acme", "ev-1:settle", refund, replace(context, status=503))
    await store.apply_once("acme", "ev-1:settle", refund, context)  # applied once only
    voided = replace(charge(api(), request_id="ev-2"), context=context)
    await store.check_and_charge(voided)
    await store.void(voided)
    admin = EventContext("_admin", "PUT")
    await store.set_level("acme", "team_members", None, 5, admin)
    await store.set_level("acme", "api_calls", current, 0, admin)  # 0 already: no event
    await store.check_and_charge(replace(charge(api(), request_id="ev-3"), context=context))
    await store.set_level("acme", "api_calls", current, 0, admin)  # a reset: -1
    events = await recorded(store)
    found = [(e.id.split(":")[0], e.meter, e.quantity, e.kind, e.route, e.status)
             for e in events]  # fmt: skip
    assert found[:5] == [
        ("ev-1", "api_calls", 1, "charge", "api", 0),
        ("ev-1", "team_members", 1, "gauge", "api", 0),
        ("ev-1", "api_calls", -1, "refund", "api", 503),
        ("ev-2", "api_calls", 1, "charge", "api", 0),
        ("ev-2", "api_calls", -1, "void", "api", 0),
    ]
    assert [f[1:5] for f in found[5:]] == [
        ("team_members", 4, "gauge", "_admin"),
        ("api_calls", 1, "charge", "api"),
        ("api_calls", -1, "reset", "_admin"),
    ]
    ids = [e.id for e in events]
    assert ids[:5] == [
        "ev-1:api_calls", "ev-1:team_members", "ev-1:settle:api_calls", "ev-2:api_calls",
        "ev-2:api_calls:void",
    ]  # fmt: skip
    assert len(set(ids)) == len(ids)
    assert all(e.tenant == "acme" and e.at_us > 0 for e in events)
    assert events[0].period_start_us == to_us(current.start)
    # The counters agree with the sum of their events, as the ledger's totals will.
    assert sum(e.quantity for e in events if e.meter == "api_calls") == await store.level(
        "acme", "api_calls", current
    )
    assert sum(e.quantity for e in events if e.meter == "team_members") == 5


async def test_requests_of_one_plan_are_each_their_own(store: CounterStore) -> None:
    # The engine's requests share a compiled plan (and, on Redis, its encoded call):
    # each still has its own memo, events and charge.
    plan = ChargePlan("acme", (api(),), ((PER_SECOND, ""),))
    results = []
    for i in range(3):
        request_id = f"op-{i}"
        context = EventContext("api", "GET", f"rid-{i}")
        results.append(
            await store.check_and_charge(
                ChargeRequest("acme", request_id, plan.meters, plan.rate_limits, context, plan)
            )
        )
    assert [(r.decision.allowed, r.replayed) for r in results] == [
        (True, False), (True, False), (False, False)
    ]  # fmt: skip
    assert await store.level("acme", "api_calls", months()[1]) == 2
    again = ChargeRequest("acme", "op-1", plan.meters, plan.rate_limits, plan=plan)
    assert (await store.check_and_charge(again)).replayed
    events = [(e.id, e.method, e.request_id) for e in await recorded(store)]
    assert events == [("op-0:api_calls", "GET", "rid-0"), ("op-1:api_calls", "GET", "rid-1")]


def test_a_call_template_encodes_what_redis_py_would_send() -> None:
    keys = ["memo", "q:{s1}:c", "stream"]
    args: list[int | str] = [600, "X\x1fé", "op", -1, "c"]
    template = CallTemplate("ab" * 20, keys, args, [0, 4, 5])
    values = ["q:{s1}:m:acme:op-7", "R\x1facme\x1fapi", "op-7"]
    filled_keys, filled_args = template.lists(values)
    assert (filled_keys, filled_args) == (
        ["q:{s1}:m:acme:op-7", "q:{s1}:c", "stream"], [600, "R\x1facme\x1fapi", "op-7", -1, "c"]
    )  # fmt: skip
    packed = Connection().pack_command("EVALSHA", "ab" * 20, 3, *filled_keys, *filled_args)
    out: list[bytes] = []
    template.encode(out, values)
    template.encode(out, values)  # the fixed parts, encoded once, serve every call
    assert b"".join(out) == b"".join(packed) * 2


async def test_an_encoded_call_goes_with_its_plan(shared_redis_server: RedisServer) -> None:
    # Plans are compiled again whenever a tenant changes: their encoded calls must not pile up.
    store = await flushed(shared_redis_server)
    try:
        plan = ChargePlan("acme", (api(),), ())
        request = ChargeRequest("acme", "op-1", plan.meters, plan=plan)
        assert (await store.check_and_charge(request)).decision.allowed
        assert len(store._templates) == 1
        del plan, request
        gc.collect()
        assert len(store._templates) == 0
    finally:
        await store.close()
