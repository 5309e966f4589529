"""Telling every gateway process that a tenant or an API key changed.

Processes cache tenants and keys; a change made through one process's admin
API or the CLI is published on a Redis channel (or, without a shared Redis,
appended to the ledger's change feed) and every process drops its copy within
a second. A subscriber that loses its connection forgets its whole cache when
it reconnects, because it may have missed messages meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.directory import Directory
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.store import Ledger
from gateway.lifecycle import stop_task

log = logging.getLogger("gateway.invalidation")

CHANNEL = "gateway:invalidate"
RECONNECT_S = 0.5
CHANGE_POLL_S = 0.5
PRUNE_EVERY_POLLS = 1200  # ten minutes
CHANGE_RETENTION = timedelta(hours=1)


class Bus(Protocol):
    """Announces changes to every process, this one included."""

    async def publish(self, kind: str, key: str) -> bool:
        """Tell every process; False when the others could not be told (they fall back on
        their cache TTL)."""
        ...

    async def close(self) -> None: ...


class LedgerBus:
    """Without a shared Redis (`memory://` counters): the ledger's change feed.

    Writers (this process's admin API, or the CLI in another process) append
    to the feed; every serving process polls it twice a second.
    """

    def __init__(self, ledger: Ledger, directory: Directory | None) -> None:
        self._ledger = ledger
        self._directory = directory
        self._task: asyncio.Task[None] | None = None
        if directory is not None:
            self._task = asyncio.create_task(self._poll(directory), name="change-feed")

    async def publish(self, kind: str, key: str) -> bool:
        if self._directory is not None:
            self._directory.invalidate(kind, key)
        try:
            await self._ledger.record_change(kind, key, datetime.now(UTC))
        except LedgerUnavailable as exc:
            log.warning("could not record the change of %s %s: %s", kind, key, exc)
            return False
        return True

    async def _poll(self, directory: Directory) -> None:
        last = await self._ledger.latest_change()
        polls = 0
        while True:
            await asyncio.sleep(CHANGE_POLL_S)
            polls += 1
            try:
                for change_id, kind, key in await self._ledger.changes_after(last):
                    directory.invalidate(kind, key)
                    last = change_id
                if polls % PRUNE_EVERY_POLLS == 0:
                    await self._ledger.prune_changes(datetime.now(UTC) - CHANGE_RETENTION)
            except LedgerUnavailable:
                # The feed keeps what was missed; it is read once the ledger is back.
                continue

    async def close(self) -> None:
        await stop_task(self._task)


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

    async def publish(self, kind: str, key: str) -> bool:
        if self._directory is not None:  # this process at once, whatever Redis does
            self._directory.invalidate(kind, key)
        try:
            await self._client.publish(CHANNEL, f"{kind}:{key}")
        except (RedisError, OSError) as exc:
            log.warning("could not announce the change of %s %s: %s", kind, key, exc)
            return False
        return True

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
        await stop_task(self._task)
        await self._client.aclose()
        await self._listener.aclose()
