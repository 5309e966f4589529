"""`redis://`: the counter store shared by every gateway process.

One Lua script (check_and_charge.lua) checks and charges all of a request's
buckets atomically, by Redis' clock; redis-py reloads it after a NOSCRIPT
(a restarted or flushed Redis). Every failure or a call slower than
`storage.timeout_ms` becomes StoreUnavailable; a retry with the same request
id replays the first answer and charges nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError, ResponseError

from gateway.clock import to_us
from gateway.ledger.events import EventContext, adjustment_kind
from gateway.metrics import StoreMetrics
from gateway.quota import keyspace, script_args
from gateway.quota.deadline import expire, pass_on
from gateway.quota.periods import Period
from gateway.quota.plan import ChargePlan
from gateway.quota.queue import EventQueue
from gateway.quota.redis_client import (
    CallTemplate,
    Client,
    ScriptPipeline,
    close_client,
    redis_client,
)
from gateway.quota.scripts import APPLY_ONCE, RESTORE, SCRIPT, SET_LEVEL
from gateway.quota.store import (
    Adjustment,
    ChargeRequest,
    ChargeResult,
    Level,
    StoreLost,
    StoreUnavailable,
    plan_of,
)

log = logging.getLogger("gateway.quota")


# The check's arguments that differ from one request to the next (besides its memo key).
_HEAD = script_args.HEAD
_VARYING_HEAD = ("event_fields", "operation_id")


def _unavailable(what: str, exc: BaseException) -> BaseException:
    """What a failed call raises: StoreUnavailable, unless the caller was cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # Cancelled while the timeout expired: the cancellation wins, or a
        # retry loop would take it for an outage and go on.
        return asyncio.CancelledError()
    return StoreUnavailable(f"{what} failed: {exc!r}")


class RedisStore:
    """Counters, gauges and rate limits in Redis, keys as in `keys`."""

    def __init__(
        self,
        client: Client,
        shards: int,
        timeout_s: float,
        record: bool = True,
        queue: EventQueue | None = None,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self._client = client
        # Unobserved without one: the calls stay the same.
        self._metrics = metrics = metrics or StoreMetrics(CollectorRegistry())
        self._record = record  # record usage events
        # Where they go when not to the shards' streams on this Redis (storage.queue).
        self.queue = queue
        self._shards = shards
        self._timeout_s = timeout_s
        rounds = metrics.duration.labels
        self._checks = ScriptPipeline(client, SCRIPT, queue, rounds("check_and_charge"))
        self._apply_once = ScriptPipeline(client, APPLY_ONCE, queue, rounds("apply_once"))
        self._set_level = ScriptPipeline(client, SET_LEVEL, queue, rounds("set_level"))
        self._restore = client.register_script(RESTORE)
        # Each plan's check call by the plan's id, kept as long as the plan is (the
        # engine's, until its tenant or a period changes).
        self._templates: dict[int, tuple[weakref.ref[ChargePlan], CallTemplate, str]] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        shards: int,
        timeout_ms: int,
        cluster: bool | None = None,
        record: bool = True,
        queue: EventQueue | None = None,
        metrics: StoreMetrics | None = None,
    ) -> RedisStore:
        """Connect and check the eviction policy (an evicted counter is a fresh quota).

        `cluster` None asks the server whether it is a Redis Cluster node. An
        unreachable Redis does not stop the gateway from starting: requests
        then get the configured failure policy until it answers.
        """
        client = await redis_client(url, cluster)
        store = cls(client, shards, timeout_ms / 1000, record, queue, metrics)
        try:
            policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
        except ResponseError:  # CONFIG may be disabled on managed Redis
            policy = None
        except (RedisError, OSError) as exc:
            log.warning("counter store unreachable at start (%s); the failure policy applies", exc)
            return store
        if policy is not None and policy != "noeviction":
            log.warning(
                "Redis maxmemory-policy is %s: an evicted counter hands out a fresh quota; "
                "set it to noeviction",
                policy,
            )
        return store

    def _encode(
        self, request: ChargeRequest, mode: str = "check"
    ) -> tuple[list[str], list[int | str]]:
        tenant, shards = request.tenant, self._shards
        key_list = [keyspace.memo_key(tenant, shards, request.request_id)]
        head: dict[str, int | str] = {
            "memo_ttl_ms": keyspace.MEMO_TTL_MS, "grace_ms": keyspace.COUNTER_GRACE_MS,
            "meters": len(request.meters), "rates": len(request.rate_limits), "mode": mode,
            "event_fields": self._event_fields(tenant, request.context),
            "operation_id": request.request_id,
        }  # fmt: skip
        args = script_args.values(script_args.HEAD, head)
        for meter in request.meters:
            limit = meter.limit
            fields: dict[str, int | str] = {
                "limit": limit.limit, "hard": int(limit.hard), "cost": meter.cost,
                "needs_remaining": int(meter.needs_remaining), "name": limit.meter,
            }  # fmt: skip
            credits = list(meter.credits) if meter.periods and meter.credits else [0, 0, 0]
            if meter.periods:
                if len(meter.periods) != 3:
                    raise ValueError("a counter needs its previous, current and next periods")
                key_list += [
                    keyspace.counter_key(tenant, shards, limit.meter, p.key) for p in meter.periods
                ]
                fields["kind"] = "c"
                for i, period in enumerate(meter.periods):
                    fields[f"start_{i}"], fields[f"end_{i}"] = (
                        to_us(period.start),
                        to_us(period.end),
                    )
            else:
                key_list.append(keyspace.gauge_key(tenant, shards, limit.meter))
                fields["kind"] = "g"
                fields.update({f"{edge}_{i}": 0 for edge in ("start", "end") for i in range(3)})
            fields.update({f"credit_{i}": credit for i, credit in enumerate(credits)})
            args += script_args.values(script_args.METER, fields)
        for rate_limit, scope in request.rate_limits:
            key_list.append(keyspace.rate_key(tenant, shards, rate_limit.name, scope))
            rate = {"interval_us": rate_limit.interval_us, "burst": rate_limit.burst, "cost": 1}
            args += script_args.values(script_args.RATE, rate)
        key_list += self._shard_keys(tenant)[1]
        return key_list, args

    def _shard_keys(self, tenant: str) -> tuple[int, list[str]]:
        """The tenant's shard, and the keys every recording script takes last:
        the shard's usage stream, then its epoch key."""
        shard = keyspace.shard_of(tenant, self._shards)
        return shard, [keyspace.shard_stream(shard), keyspace.epoch_key(shard)]

    def _event_fields(self, tenant: str, context: EventContext | None) -> str:
        if not self._record or context is None:
            return ""
        # The mode (usage_event.lua): append here, or return the events for the queue.
        return ("X" if self.queue is None else "R") + context.fields(tenant)

    async def _script(
        self, what: str, script: ScriptPipeline, key_list: list[str], args: list[int | str]
    ) -> Any:
        """A script's answer, once the events it returned are in the queue (or kept)."""
        answer, appended = await self._answer(what, script.call(key_list, args))
        if appended is not None:
            await asyncio.shield(appended)
        return answer

    def _check_template(self, plan: ChargePlan) -> tuple[CallTemplate, str]:
        """The plan's check call, fixed but for the memo key, the events' fields and the
        operation id; and the memo key without the request id."""
        cached = self._templates.get(id(plan))
        if cached is None or cached[0]() is not plan:
            placeholder = ChargeRequest(plan.tenant, "", plan.meters, plan.rate_limits, plan=plan)
            key_list, args = self._encode(placeholder)
            varying = [0] + [len(key_list) + _HEAD.index(f) for f in _VARYING_HEAD]
            template = self._checks.template(key_list, args, varying)
            # The memo key ends with the request id (keyspace.memo_key).
            memo_prefix = keyspace.memo_key(plan.tenant, self._shards, "")
            key = id(plan)

            def forget(_: object) -> None:  # with the plan, before its id can be reused
                self._templates.pop(key, None)

            cached = self._templates[key] = (weakref.ref(plan, forget), template, memo_prefix)
        return cached[1], cached[2]

    async def check_and_charge(self, request: ChargeRequest) -> ChargeResult:
        plan = plan_of(request)
        template, memo_prefix = self._check_template(plan)
        request_id, tenant = request.request_id, request.tenant
        values = (memo_prefix + request_id, self._event_fields(tenant, request.context), request_id)
        answer, appended = await self._answer(
            "check_and_charge", self._checks.fill(template, values)
        )
        if appended is not None:
            await asyncio.shield(appended)
        flag, *numbers = (answer if isinstance(answer, bytes) else str(answer).encode()).split()
        if flag == b"E":
            raise StoreLost(keyspace.shard_of(tenant, self._shards))
        if not numbers or not numbers[0].isdigit():
            # The memo holds another operation's marker (voided, or applied by
            # apply_once): this request id must not charge now.
            raise StoreUnavailable(f"request {request_id} was already settled otherwise")
        state = list(map(int, numbers))
        n_meters = len(plan.meters)
        now_us = state[1]
        decision, periods = plan.decide(
            now_us,
            tuple(state[2 : 2 + n_meters]),
            state[2 + n_meters : 2 + 2 * n_meters],
            state[2 + 2 * n_meters :],
        )
        if decision.allowed != (state[0] == 1):
            # Never tell a client something other than what was charged: undo
            # whatever the script did and let the failure policy answer. The
            # contract tests and the state machine exist so this never happens.
            log.error("counter store and rules disagree for request %s", request_id)
            await self.void(request)
            raise StoreUnavailable("the counter store and the rules disagree")
        return ChargeResult(decision, now_us, periods, replayed=flag == b"R")

    async def _answer(self, what: str, answer: asyncio.Future[Any]) -> Any:
        """A script call's answer within the timeout; `_guard` for a pipelined call, at the
        cost of one timer rather than a timeout context."""
        loop, timeout_s = asyncio.get_running_loop(), self._timeout_s
        timer = loop.call_later(timeout_s, expire, answer, timeout_s, loop.time() + timeout_s)
        try:
            return await answer
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.failed(what, exc)
            raise _unavailable(what, exc) from exc
        finally:
            timer.cancel()  # a busy loop's later looks find the answer done

    def _meter_key(self, tenant: str, meter: str, period: Period | None) -> str:
        if period is None:
            return keyspace.gauge_key(tenant, self._shards, meter)
        return keyspace.counter_key(tenant, self._shards, meter, period.key)

    async def _guard(self, what: str, call: Awaitable[Any]) -> Any:
        """A call of its own (not pipelined), timed as one round trip; within the timeout
        as `_answer` keeps it, and cancelled past it."""
        started = time.perf_counter()
        running = asyncio.ensure_future(call)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        running.add_done_callback(functools.partial(pass_on, answer))
        try:
            return await self._answer(what, answer)
        finally:
            running.cancel()
            self._metrics.duration.labels(what).observe(time.perf_counter() - started)

    def forget(self, tenant: str, operation_id: str) -> None:
        # With the checks, the most frequent round; an apply_once's memo is written by
        # the time its answer came, so the deletion can only come after it.
        self._checks.forget(keyspace.memo_key(tenant, self._shards, operation_id))

    async def void(self, request: ChargeRequest) -> None:
        key_list, args = self._encode(request, mode="void")
        if await self._script("void", self._checks, key_list, args) in (b"E", "E"):
            raise StoreLost(keyspace.shard_of(request.tenant, self._shards))

    @property
    def shards(self) -> int:
        return self._shards

    async def lost(self) -> list[int]:
        epochs = [keyspace.epoch_key(shard) for shard in range(self._shards)]
        # One EXISTS per key: a multi-key EXISTS would cross slots on a cluster.
        pipe = self._client.pipeline(transaction=False)
        for key in epochs:
            pipe.exists(key)
        found = await self._guard("lost", pipe.execute())
        return [shard for shard, exists in enumerate(found) if not exists]

    async def restore(self, shard: int, levels: Sequence[Level]) -> None:
        key_list = [keyspace.epoch_key(shard)]
        args: list[int | str] = [datetime.now(UTC).isoformat()]
        for tenant, meter, period, value in levels:
            key_list.append(self._meter_key(tenant, meter, period))
            expire_at = keyspace.expire_at_ms(period)
            args += [value, expire_at]
        # Not under the request timeout: a large shard takes a while, and nothing
        # on it is served until this is done anyway.
        try:
            restored = await self._restore(keys=key_list, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"restore failed: {exc!r}") from exc
        if not restored:
            log.info("shard %d was restored by another process", shard)

    async def apply_once(
        self,
        tenant: str,
        operation_id: str,
        adjustments: Sequence[Adjustment],
        context: EventContext | None = None,
    ) -> bool:
        key_list = [keyspace.memo_key(tenant, self._shards, operation_id)]
        args: list[int | str] = [
            keyspace.MEMO_TTL_MS, self._event_fields(tenant, context), operation_id
        ]  # fmt: skip
        for meter, period, delta in adjustments:
            key_list.append(self._meter_key(tenant, meter, period))
            expire_at = keyspace.expire_at_ms(period)
            kind = adjustment_kind(period is None, delta, operation_id)
            args += [delta, expire_at, meter, to_us(period.start) if period else 0, kind]
        shard, trailing = self._shard_keys(tenant)
        key_list += trailing
        applied = await self._script("apply_once", self._apply_once, key_list, args)
        if int(applied) < 0:
            raise StoreLost(shard)
        return bool(applied)

    async def level(self, tenant: str, meter: str, period: Period | None) -> int:
        value = await self._guard("level", self._client.get(self._meter_key(tenant, meter, period)))
        return int(value) if value is not None else 0

    async def set_level(
        self,
        tenant: str,
        meter: str,
        period: Period | None,
        value: int,
        context: EventContext | None = None,
    ) -> None:
        shard, trailing = self._shard_keys(tenant)
        key_list = [self._meter_key(tenant, meter, period), *trailing]
        expire_at = keyspace.expire_at_ms(period)
        args: list[int | str] = [
            value, expire_at, self._event_fields(tenant, context), f"{uuid.uuid4().hex}:{meter}",
            meter, to_us(period.start) if period else 0, "gauge" if period is None else "reset",
        ]  # fmt: skip
        previous = await self._script("set_level", self._set_level, key_list, args)
        if previous in (b"E", "E"):
            raise StoreLost(shard)

    async def idempotency_begin(
        self, tenant: str, key_hash: str, fingerprint: str, in_flight_ms: int
    ) -> str | None:
        key = keyspace.idempotency_key(tenant, self._shards, key_hash)
        claim = self._client.set(key, f"P|{fingerprint}", nx=True, px=in_flight_ms)
        if await self._guard("idempotency", claim):
            return None
        held = await self._guard("idempotency", self._client.get(key))
        # Released between the two calls: as good as in flight, the client retries.
        return held.decode() if held is not None else f"P|{fingerprint}"

    async def idempotency_finish(
        self, tenant: str, key_hash: str, record: str | None, ttl_ms: int
    ) -> None:
        key = keyspace.idempotency_key(tenant, self._shards, key_hash)
        if record is None:
            await self._guard("idempotency", self._client.delete(key))
        else:
            await self._guard("idempotency", self._client.set(key, record, px=ttl_ms))

    async def close(self) -> None:
        for script in (self._checks, self._apply_once, self._set_level):
            await script.close()
        if self.queue is not None:
            await self.queue.close()
            await close_client(self.queue.client)
        await close_client(self._client)
