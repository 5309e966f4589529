"""Coalescing: calls made while a round trip is under way go together in the next one.

At high rates the per-call client work and system calls dominate a Redis round
trip; sending everything that queued up during the previous one as one
pipeline spares them without delaying anyone (there is no timer: a lone call
goes out at once). The Redis script calls and the usage queue's appends both
go through `Coalescer`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from gateway.lifecycle import stop_task

T = TypeVar("T")
R = TypeVar("R")

# Sends one batch; the answer per item, in order, an exception for an item that failed.
Send = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    """Batches items submitted while a `send` is in flight into the next `send`."""

    def __init__(self, send: Send[T, R], name: str) -> None:
        self._send = send
        self._name = name
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """The item's answer, once the batch it joins has been sent."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=self._name)
        return future

    async def _flush(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    answers: Sequence[R | BaseException] = await self._send([i for i, _ in batch])
                except Exception as exc:  # a bug in `send`: no caller may wait forever
                    answers = [exc] * len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():  # its caller gave up waiting
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait until everything submitted so far has been sent."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def close(self) -> None:
        """Stop sending; what is still queued is dropped."""
        await stop_task(self._flusher)
