"""The usage queue on Redis: one stream per shard, read through a consumer group.

Entries are acknowledged only after the ledger committed them, so a worker
that dies re-delivers (its pending entries, or another worker reclaims them
with XAUTOCLAIM once they have been idle long enough). A stream is trimmed
only below what every consumer group has acknowledged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from gateway.quota import keyspace
from gateway.quota.redis_client import Client

log = logging.getLogger("gateway.usage")

GROUP = "ledger"


@dataclass(frozen=True, slots=True)
class Entry:
    shard: int
    entry_id: bytes | str  # as Redis gave it
    raw: bytes


def _entries(shard: int, reply: Any) -> list[Entry]:
    """Entries from a reply's [(id, fields)] list; fields a dict, or (XREADGROUP, read
    raw) a flat [name, value, ...] list."""
    found = []
    for entry_id, fields in reply or ():
        if fields is None:  # deleted (trimmed) while pending: nothing to deliver
            continue
        if isinstance(fields, dict):
            raw = fields.get(b"e", b"")
        else:
            raw = fields[1] if len(fields) == 2 and fields[0] == b"e" else b""
        found.append(Entry(shard, entry_id, raw))
    return found


def _raw(response: Any, **options: Any) -> Any:
    return response


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class UsageStreams:
    """The shard streams, as one consumer of one group sees them."""

    def __init__(self, client: Client, shards: int, consumer: str, group: str = GROUP) -> None:
        self._client = client
        # The worker reads every event through here: skip redis-py's per-entry
        # dicts and take the reply as it comes (see `_entries`).
        client.set_response_callback("XREADGROUP", _raw)
        self.shards = shards
        self.consumer = consumer
        self.group = group

    async def ensure_groups(self) -> None:
        """Create the group on every shard's stream (and the stream), from its beginning."""
        for shard in range(self.shards):
            try:
                await self._client.xgroup_create(
                    keyspace.shard_stream(shard), self.group, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, shard: int, count: int, pending: bool = False) -> list[Entry]:
        """New entries for this consumer; `pending`: its own delivered but unacknowledged."""
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {keyspace.shard_stream(shard): "0" if pending else ">"},
            count=count,
        )  # fmt: skip
        if not reply:
            return []
        # Raw, RESP2 gives [[stream, entries]] and RESP3 a {stream: entries} map.
        entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))
        return _entries(shard, entries)

    async def claim_stale(self, shard: int, min_idle_ms: int, count: int) -> list[Entry]:
        """Entries another consumer took and left unacknowledged for `min_idle_ms`."""
        reply = await self._client.xautoclaim(
            keyspace.shard_stream(shard), self.group, self.consumer, min_idle_ms, "0-0", count=count
        )
        return _entries(shard, reply[1])

    async def ack(self, shard: int, entry_ids: list[bytes | str]) -> None:
        if entry_ids:
            await self._client.xack(keyspace.shard_stream(shard), self.group, *entry_ids)

    async def trim(self, shard: int) -> int:
        """Drop entries every group has acknowledged; how many went."""
        stream = keyspace.shard_stream(shard)
        groups = await self._client.xinfo_groups(stream)
        if not groups:
            return 0  # no reader yet: nothing may go
        floor: tuple[int, int] | None = None
        for group in groups:
            name = _text(group["name"])
            if int(group["pending"]):
                summary = await self._client.xpending(stream, name)
                keep = _id(_text(summary["min"]))
            else:
                # Everything up to last-delivered-id is acknowledged: keep what follows.
                ms, seq = _id(_text(group["last-delivered-id"]))
                keep = (ms, seq + 1)
            floor = keep if floor is None else min(floor, keep)
        assert floor is not None
        return int(
            await self._client.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        )

    async def lag(self, shard: int) -> int:
        """Entries of the shard this group has not read yet, plus those not acknowledged."""
        stream = keyspace.shard_stream(shard)
        for group in await self._client.xinfo_groups(stream):
            if _text(group["name"]) == self.group:
                unread = group.get("lag")
                return int(unread or 0) + int(group["pending"])
        return int(await self._client.xlen(stream))


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
