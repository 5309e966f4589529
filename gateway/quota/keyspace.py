"""The counter store's key layout, in one place.

Every key of a tenant carries its shard's hash tag (`{s7}`), so that one Lua
call can read and write all of them on a single Redis or a Redis Cluster.
Tenant ids, meter and limit names cannot contain ':' (see the config's name
rule), so the layout is unambiguous.
"""

from __future__ import annotations

import zlib

from gateway.clock import to_us
from gateway.quota.periods import Period

PREFIX = "q"
# How long a call's memo (its first answer, or a void or applied marker) is kept
# when the gateway does not delete it: an answered call's goes with the next
# round (`CounterStore.forget`); one whose answer was lost waits for its retry.
MEMO_TTL_MS = 600_000
COUNTER_GRACE_MS = 7 * 86_400_000  # counters outlive their period for the usage view


def shard_of(tenant: str, shards: int) -> int:
    """A stable shard for a tenant (the same in every process and release)."""
    return zlib.crc32(tenant.encode()) % shards


def tag(tenant: str, shards: int) -> str:
    return f"{{s{shard_of(tenant, shards)}}}"


def counter_key(tenant: str, shards: int, meter: str, period_key: str) -> str:
    return f"{PREFIX}:{tag(tenant, shards)}:c:{tenant}:{meter}:{period_key}"


def gauge_key(tenant: str, shards: int, meter: str) -> str:
    return f"{PREFIX}:{tag(tenant, shards)}:g:{tenant}:{meter}"


def rate_key(tenant: str, shards: int, name: str, scope: str) -> str:
    suffix = f":{scope}" if scope else ""
    return f"{PREFIX}:{tag(tenant, shards)}:r:{tenant}:{name}{suffix}"


def idempotency_key(tenant: str, shards: int, key_hash: str) -> str:
    return f"{PREFIX}:{tag(tenant, shards)}:i:{tenant}:{key_hash}"


def memo_key(tenant: str, shards: int, request_id: str) -> str:
    return f"{PREFIX}:{tag(tenant, shards)}:m:{tenant}:{request_id}"


def shard_stream(shard: int) -> str:
    return f"{PREFIX}:{{s{shard}}}:usage"


def epoch_key(shard: int) -> str:
    """Set when the shard's counters are known to be whole; a Redis that lost its data
    lacks it, and nothing is checked or charged on the shard until it is restored."""
    return f"{PREFIX}:{{s{shard}}}:epoch"


def expire_at_ms(period: Period | None) -> int:
    """When a counter of `period` may go (Unix ms): the grace after its end; 0 (never)
    for a gauge. check_and_charge.lua computes the same from the period it picks."""
    return to_us(period.end) // 1000 + COUNTER_GRACE_MS if period is not None else 0
