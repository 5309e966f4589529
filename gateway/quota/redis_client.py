"""Redis connections, and script calls pipelined across concurrent requests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Histogram
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.batching import Coalescer
from gateway.quota.queue import EventQueue

log = logging.getLogger("gateway.quota")
POOL_CONNECTIONS = 64
# Keys waiting for a round to delete them (`ScriptPipeline.forget`); past this many
# (no round goes out: Redis unreachable) the rest are left to expire by themselves.
FORGET_MAX = 100_000

Client = aioredis.Redis | RedisCluster


class CallTemplate:
    """A script call's KEYS and ARGV, fixed but for the positions `varying` (indexes into
    KEYS followed by ARGV), whose values each call brings (`ScriptPipeline.fill`).

    On one Redis the fixed parts are encoded once, in RESP, between the varying
    positions: a call encodes only its own few values.
    """

    __slots__ = ("key_list", "args", "_sha", "_varying", "_chunks")

    def __init__(
        self, sha: str, key_list: list[str], args: list[int | str], varying: Sequence[int] = ()
    ) -> None:
        self.key_list = key_list  # the varying positions hold placeholders
        self.args = args
        self._sha = sha
        self._varying = tuple(varying)
        self._chunks: list[bytes] | None = None  # encoded on first use (never on a cluster)

    def lists(self, values: Sequence[str]) -> tuple[list[str], list[int | str]]:
        """KEYS and ARGV with `values` in the varying positions."""
        key_list, args = list(self.key_list), list(self.args)
        for position, value in zip(self._varying, values, strict=True):
            if position < len(key_list):
                key_list[position] = value
            else:
                args[position - len(key_list)] = value
        return key_list, args

    def encode(self, out: list[bytes], values: Sequence[str]) -> None:
        """Append `EVALSHA sha numkeys keys... args...` in RESP to `out`."""
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = self._encode_fixed()
        out.append(chunks[0])
        for value, chunk in zip(values, chunks[1:], strict=True):
            encoded = value.encode()
            out.append(b"$%d\r\n%b\r\n" % (len(encoded), encoded))
            out.append(chunk)

    def _encode_fixed(self) -> list[bytes]:
        everything = [*self.key_list, *self.args]
        current = b"*%d\r\n" % (3 + len(everything)) + _bulk(b"EVALSHA") + _bulk(self._sha.encode())
        current += _bulk(b"%d" % len(self.key_list))
        chunks = []
        for position, value in enumerate(everything):
            if position in self._varying:
                chunks.append(current)
                current = b""
            else:
                current += _bulk(value.encode() if isinstance(value, str) else b"%d" % value)
        chunks.append(current)
        return chunks


Call = tuple[CallTemplate, Sequence[str]]  # a call: its template and its varying values


class ScriptPipeline:
    """Script calls, coalesced across concurrent requests (batching.Coalescer).

    Each EVALSHA still runs atomically on its own; batching only spares the
    per-call client work and system calls, which dominate at high rates.
    Entries that hit NOSCRIPT never ran, so resending them is safe. Keys to delete
    (`forget`) go with the next round, as one DEL before its calls.

    With a separate usage queue, a script returns its events with its answer
    ({answer, events...}); they go to the queue here, whether or not the caller
    still waits (one that timed out may have charged all the same), and the
    call's future gets (answer, the queue's future for them, or None).
    """

    def __init__(
        self,
        client: Client,
        source: str,
        queue: EventQueue | None = None,
        latency: Histogram | None = None,  # a child: observes each round trip
    ) -> None:
        self._client = client
        self._latency = latency
        self._source = source
        self._events = queue
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._calls: Coalescer[Call, Any] = Coalescer(self._round, "redis-pipeline")
        self._conn: AbstractConnection | None = None  # held between rounds (one Redis)
        self._forgotten: list[str] = []

    def forget(self, key: str) -> None:
        """Delete `key` with the next round, without waiting for it; if that round
        fails, the key is not deleted (it must expire by itself)."""
        if len(self._forgotten) < FORGET_MAX:
            self._forgotten.append(key)

    def call(self, key_list: list[str], args: list[int | str]) -> asyncio.Future[Any]:
        return self._calls.submit((CallTemplate(self._sha, key_list, args), ()))

    def template(
        self, key_list: list[str], args: list[int | str], varying: Sequence[int]
    ) -> CallTemplate:
        """A template of this script's calls (see CallTemplate)."""
        return CallTemplate(self._sha, key_list, args, varying)

    def fill(self, template: CallTemplate, values: Sequence[str]) -> asyncio.Future[Any]:
        """Call the script as `template` with `values` in its varying positions."""
        return self._calls.submit((template, values))

    async def _round(self, batch: list[Call]) -> list[Any]:
        started = time.perf_counter()
        try:
            results = await self._execute(batch)
        except (RedisError, OSError) as exc:
            return [exc] * len(batch)
        finally:
            # Once per round trip, however many calls it carried.
            if self._latency is not None:
                self._latency.observe(time.perf_counter() - started)
        answers: list[Any] = []
        for (template, _), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                answers.append(result)
                continue
            appended = None
            if isinstance(result, list) and self._events is not None:
                # The stream key is the one before last (the scripts' KEYS).
                appended = self._events.put(template.key_list[-2], [_text(e) for e in result[1:]])
                result = result[0]
            answers.append((result, appended))
        return answers

    async def _execute(self, batch: list[Call]) -> list[Any]:
        results = await self._send(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # a restarted or flushed Redis
            await self._client.script_load(self._source)
            resent = await self._send([batch[i] for i in missing])
            for i, result in zip(missing, resent, strict=True):
                results[i] = result
        return results

    async def _send(self, calls: list[Call]) -> list[Any]:
        forgotten, self._forgotten = self._forgotten, []
        if isinstance(self._client, RedisCluster):
            pipe = self._client.pipeline(transaction=False)
            # One DEL per hash tag: a cluster command's keys must share a slot.
            by_tag: dict[str, list[str]] = {}
            for key in forgotten:
                by_tag.setdefault(key[key.find("{") : key.find("}") + 1], []).append(key)
            for keys in by_tag.values():
                pipe.execute_command("DEL", *keys)
            for template, values in calls:
                key_list, args = template.lists(values)
                # execute_command, not evalsha: a cluster pipeline refuses the
                # latter by name, yet routes the command by its keys all the same.
                pipe.execute_command("EVALSHA", self._sha, len(key_list), *key_list, *args)
            return list(await pipe.execute(raise_on_error=False))[len(by_tag) :]
        # One Redis: the frames are written here, their fixed parts encoded once
        # (CallTemplate), and sent in one write on one connection (redis-py's
        # packing of every argument cost more than the rest of the call).
        pool = self._client.connection_pool
        # The connection stays with the pipeline while it works: its rounds are
        # sent one at a time, and checking it out of the pool and back in for
        # each cost as much as the rest of a small round.
        conn, self._conn = self._conn, None
        kept = conn is not None
        if conn is None:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            if kept:
                await pool.ensure_connection(conn)  # as the pool checks one it hands out
            frames = self._frames(calls)
            if forgotten:
                frames = _delete(forgotten) + frames
            await conn.send_packed_command(frames, check_health=False)
            results: list[Any] = []
            # One socket timeout for the batch's answers, not one per answer (what
            # redis-py's read_response sets up unless told to wait without one).
            async with asyncio.timeout(conn.socket_timeout):
                if forgotten:  # how many existed: nobody asks
                    with contextlib.suppress(ResponseError):
                        await conn.read_response(timeout=math.inf)
                for _ in calls:
                    try:
                        results.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:  # this call's error; the others still answer
                        results.append(exc)
        except BaseException:
            try:
                await conn.disconnect()
            finally:
                await pool.release(conn)
            raise
        self._conn = conn
        return results

    def _frames(self, calls: list[Call]) -> bytes:
        """`EVALSHA sha numkeys keys... args...` per call, in RESP."""
        out: list[bytes] = []
        for template, values in calls:
            template.encode(out, values)
        return b"".join(out)

    async def close(self) -> None:
        await self._calls.close()
        conn, self._conn = self._conn, None
        if conn is not None and not isinstance(self._client, RedisCluster):
            await self._client.connection_pool.release(conn)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _delete(keys: list[str]) -> bytes:
    """`DEL keys...` in RESP (one Redis: keys of any hash tag together)."""
    return b"*%d\r\n$3\r\nDEL\r\n" % (len(keys) + 1) + b"".join(_bulk(key.encode()) for key in keys)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def redis_client(url: str, cluster: bool | None) -> Client:
    """A client for a single Redis or (`cluster` True, or None and the server says so) a
    Redis Cluster, with a bounded pool (per node)."""
    if cluster is None:
        cluster = await is_cluster(url)
    if cluster:
        return RedisCluster.from_url(
            url, max_connections=POOL_CONNECTIONS, socket_connect_timeout=2
        )
    # A bounded pool whose callers wait for a free connection; the wait
    # counts against the caller's timeout like the call itself.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_CONNECTIONS, timeout=None, socket_connect_timeout=2
    )
    return aioredis.Redis(connection_pool=pool)


async def close_client(client: Client) -> None:
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        # The client was given its pool, so it does not close it unless told.
        await client.aclose(close_connection_pool=True)


async def is_cluster(url: str) -> bool:
    """Whether the Redis at `url` is a Redis Cluster node; False (with a warning) if it
    cannot be asked, in which case `storage.redis_cluster` should say."""
    probe = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        info = await probe.info("cluster")
    except (RedisError, OSError) as exc:
        log.warning(
            "could not ask %s whether it is a Redis Cluster (%s): using it as a single Redis; "
            "set storage.redis_cluster to say",
            url.split("@")[-1], exc,
        )  # fmt: skip
        return False
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))
