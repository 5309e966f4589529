"""The private Redis and PostgreSQL servers that fault tests stop and kill."""

from __future__ import annotations

import asyncpg
import redis

from tests.servers import PostgresServer, RedisServer


def test_private_redis_keeps_its_data_across_a_restart(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    client.close()
    redis_server.restart()  # SIGTERM: AOF flushed, then replayed on start
    client = redis.Redis.from_url(redis_server.url)
    assert client.get("k") == b"v"
    client.close()
    redis_server.kill()
    assert redis_server.proc is None


async def test_private_postgres_runs_stops_and_restarts(postgres_server: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres_server.dsn)
    await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    await conn.close()
    postgres_server.kill()
    postgres_server.start()  # crash recovery replays the WAL
    conn = await asyncpg.connect(postgres_server.dsn)
    assert await conn.fetchval("SELECT x FROM t") == 1
    await conn.close()
