"""Redis memory after a load: keys by kind, the request memos apart, bytes per tenant-meter.

The gateway's keys follow gateway/quota/keyspace.py (`q:{s7}:c:<tenant>:...`):
the third part names the kind. The usage streams grow with the traffic, not
with the tenants, and the request memos with the calls in flight: both are
measured apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from bench.stack import STREAMS
from gateway.quota import keyspace

MEMORY_SAMPLE_KEYS = 1000  # MEMORY USAGE calls per key kind


@dataclass(frozen=True)
class RedisMemory:
    """Redis memory after the tenant runs, against the baseline before any load."""

    keys: dict[str, int]  # key kind -> keys present
    sampled_bytes: dict[str, float]  # key kind -> mean MEMORY USAGE of a sample
    streams_bytes: int
    stream_entries: int
    memos: int  # request memos present (deleted once answered: those of the last rounds)
    memo_bytes: float  # used_memory freed per request memo deleted
    tenant_bytes: int  # used_memory less the streams, without the memos, over the baseline

    @property
    def per_tenant_meter(self) -> float:
        """Bytes per counter key of what the load left but the streams and memos."""
        return self.tenant_bytes / max(self.keys.get(_COUNTER, 0), 1)


_COUNTER, _MEMO = "c", "m"
_KINDS = {_COUNTER: "counter", "r": "rate-limit state", _MEMO: "request memo", "g": "gauge",
          "i": "idempotency record", "epoch": "shard epoch", "usage": "usage stream"}  # fmt: skip


def streams_bytes(client: redis.Redis) -> int:
    return sum(int(client.memory_usage(stream, samples=0) or 0) for stream in STREAMS)


def used_but_streams(client: redis.Redis) -> int:
    """used_memory less the usage streams (which the worker trims as it goes)."""
    return int(client.info("memory")["used_memory"]) - streams_bytes(client)


def measure(client: redis.Redis, baseline: int) -> RedisMemory:
    """Keys by kind (keyspace.py's layout, by SCAN), a sample of each kind's MEMORY USAGE,
    then the request memos deleted for what they held and what the tenants hold without them.
    A memo only answers a retry of the same request id, which no later run makes."""
    keys: dict[str, int] = {}
    samples: dict[str, list[bytes]] = {}
    memos: list[bytes] = []
    for key in client.scan_iter(match=f"{keyspace.PREFIX}:*", count=10_000):
        kind = key.split(b":")[2].decode()
        keys[kind] = keys.get(kind, 0) + 1
        sample = samples.setdefault(kind, [])
        if len(sample) < MEMORY_SAMPLE_KEYS:
            sample.append(key)
        if kind == _MEMO:
            memos.append(key)
    sampled = {}
    for kind, sample in samples.items():
        pipe = client.pipeline(transaction=False)
        for key in sample:
            pipe.memory_usage(key, samples=0)
        sizes = [size for size in pipe.execute() if size is not None]
        sampled[kind] = sum(sizes) / max(len(sizes), 1)
    streams = streams_bytes(client)
    with_memos = used_but_streams(client)
    for start in range(0, len(memos), 10_000):
        client.delete(*memos[start : start + 10_000])
    without_memos = used_but_streams(client)
    return RedisMemory(
        keys=keys,
        sampled_bytes=sampled,
        streams_bytes=streams,
        stream_entries=sum(int(client.xlen(s)) for s in STREAMS),
        memos=len(memos),
        memo_bytes=(with_memos - without_memos) / max(len(memos), 1),
        tenant_bytes=without_memos - baseline,
    )


def notes(memory: RedisMemory) -> list[str]:
    """What the figures are, for the report."""
    kinds = ", ".join(
        f"{_KINDS.get(kind, kind)} {count:,} keys ~{memory.sampled_bytes.get(kind, 0):,.0f} B each"
        for kind, count in sorted(memory.keys.items())
    )
    return [
        f"Redis memory after the tenant runs. Keys present (MEMORY USAGE SAMPLES 0 of up to "
        f"{MEMORY_SAMPLE_KEYS:,} per kind, without the expiry table's entry): {kinds}.",
        f"Left out: the usage streams ({memory.stream_entries:,} entries in "
        f"{memory.streams_bytes:,} B not yet trimmed by the worker's housekeeping) and the "
        f"request memos ({memory.memos:,} left: each is deleted with the gateway's next round "
        f"once its call is answered, and kept {keyspace.MEMO_TTL_MS // 1000} s only when the "
        f"answer was lost; deleting them freed {memory.memo_bytes:,.0f} B of used_memory each). "
        "What remains over the baseline taken "
        f"before any load, {memory.tenant_bytes:,} B, is {memory.per_tenant_meter:,.0f} B per "
        "counter key: the tenant-meter's counter and, while the tenant is active, its "
        "rate-limit state, with the hash-table and expiry entries of both.",
    ]
