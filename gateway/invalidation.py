"""Telling every gateway process that a tenant or an API key changed.

Processes cache tenants and keys; a change made through one process's admin
API is published on a Redis channel and every process drops its copy within
a second. A subscriber that loses its connection forgets its whole cache when
it reconnects, because it may have missed messages meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.directory import Directory

log = logging.getLogger("gateway.invalidation")

CHANNEL = "gateway:invalidate"
RECONNECT_S = 0.5


class Bus(Protocol):
    """Announces changes to every process, this one included."""

    async def publish(self, kind: str, key: str) -> None: ...

    async def close(self) -> None: ...


class LocalBus:
    """One process (memory:// counters): invalidate in place."""

    def __init__(self, directory: Directory | None) -> None:
        self._directory = directory

    async def publish(self, kind: str, key: str) -> None:
        if self._directory is not None:
            self._directory.invalidate(kind, key)

    async def close(self) -> None:
        return None


class RedisBus:
    """Redis pub/sub on the counter store; without a directory it only publishes (the CLI)."""

    def __init__(self, url: str, directory: Directory | None) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        # The listener waits for messages indefinitely: a read timeout would
        # make it "reconnect", and forget every cache entry, every few seconds.
        self._listener = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_keepalive=True
        )
        self._directory = directory
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if directory is not None:
            self._task = asyncio.create_task(self._listen(directory), name="invalidation")

    async def wait_subscribed(self, timeout_s: float) -> bool:
        """True once listening (tests and startup use it; serving does not wait)."""
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def publish(self, kind: str, key: str) -> None:
        if self._directory is not None:  # this process at once, whatever Redis does
            self._directory.invalidate(kind, key)
        try:
            await self._client.publish(CHANNEL, f"{kind}:{key}")
        except (RedisError, OSError) as exc:
            # Other processes fall back on their cache TTL for this change.
            log.warning("could not announce the change of %s %s: %s", kind, key, exc)

    async def _listen(self, directory: Directory) -> None:
        first = True
        while True:
            pubsub = self._listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                if not first:
                    directory.invalidate_all()
                first = False
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        kind, _, key = message["data"].decode().partition(":")
                        directory.invalidate(kind, key)
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                log.warning("invalidation channel lost (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()
        await self._listener.aclose()
