"""Redis connections, and script calls pipelined across concurrent requests."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.batching import Coalescer
from gateway.quota.queue import EventQueue

log = logging.getLogger("gateway.quota")
POOL_CONNECTIONS = 64

Client = aioredis.Redis | RedisCluster
Call = tuple[list[str], list[int | str]]  # a script's KEYS and ARGV


class ScriptPipeline:
    """Script calls, coalesced across concurrent requests (batching.Coalescer).

    Each EVALSHA still runs atomically on its own; batching only spares the
    per-call client work and system calls, which dominate at high rates.
    Entries that hit NOSCRIPT never ran, so resending them is safe.

    With a separate usage queue, a script returns its events with its answer
    ({answer, events...}); they go to the queue here, whether or not the caller
    still waits (one that timed out may have charged all the same), and the
    call's future gets (answer, the queue's future for them, or None).
    """

    def __init__(self, client: Client, source: str, queue: EventQueue | None = None) -> None:
        self._client = client
        self._source = source
        self._events = queue
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._evalsha = _bulk(b"EVALSHA") + _bulk(self._sha.encode())
        self._calls: Coalescer[Call, Any] = Coalescer(self._round, "redis-pipeline")

    def call(self, key_list: list[str], args: list[int | str]) -> asyncio.Future[Any]:
        return self._calls.submit((key_list, args))

    async def _round(self, batch: list[Call]) -> list[Any]:
        try:
            results = await self._execute(batch)
        except (RedisError, OSError) as exc:
            return [exc] * len(batch)
        answers: list[Any] = []
        for (key_list, _), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                answers.append(result)
                continue
            appended = None
            if isinstance(result, list) and self._events is not None:
                # The stream key is the one before last (the scripts' KEYS).
                appended = self._events.put(key_list[-2], [_text(e) for e in result[1:]])
                result = result[0]
            answers.append((result, appended))
        return answers

    async def _execute(self, batch: list[Call]) -> list[Any]:
        results = await self._send(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # a restarted or flushed Redis
            await self._client.script_load(self._source)
            resent = await self._send([(batch[i][0], batch[i][1]) for i in missing])
            for i, result in zip(missing, resent, strict=True):
                results[i] = result
        return results

    async def _send(self, calls: list[Call]) -> list[Any]:
        if isinstance(self._client, RedisCluster):
            pipe = self._client.pipeline(transaction=False)
            for key_list, args in calls:
                # execute_command, not evalsha: a cluster pipeline refuses the
                # latter by name, yet routes the command by its keys all the same.
                pipe.execute_command("EVALSHA", self._sha, len(key_list), *key_list, *args)
            return list(await pipe.execute(raise_on_error=False))
        # One Redis: the frames are written here, the script's name encoded once,
        # and sent in one write on one connection (redis-py's packing of every
        # argument cost more than the rest of the call).
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(self._frames(calls), check_health=False)
            results: list[Any] = []
            for _ in calls:
                try:
                    results.append(await conn.read_response())
                except ResponseError as exc:  # this call's error; the others still answer
                    results.append(exc)
            return results
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    def _frames(self, calls: list[Call]) -> bytes:
        """`EVALSHA sha numkeys keys... args...` per call, in RESP."""
        out = bytearray()
        for key_list, args in calls:
            out += b"*%d\r\n" % (3 + len(key_list) + len(args))
            out += self._evalsha
            out += _bulk(str(len(key_list)).encode())
            for value in (*key_list, *args):
                out += _bulk(value.encode() if isinstance(value, str) else b"%d" % value)
        return bytes(out)

    async def close(self) -> None:
        await self._calls.close()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


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
