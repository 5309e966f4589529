"""Running the event loop, and stopping background tasks without trusting them to
honour cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("gateway")
STOP_TIMEOUT_S = 2.0
LAG_SAMPLE_S = 0.25  # how often `watch_lag` sets its timer


async def stop_task(task: asyncio.Task[None] | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancel `task` and wait for it, at most `timeout_s`.

    A cancellation that lands while a task's own `asyncio.timeout` expires can
    be turned into a TimeoutError (Python 3.11) and swallowed by a retry loop;
    shutting down must not hang on that.
    """
    if task is None:
        return
    if not task.done():
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            log.warning("background task %s did not stop within %.0fs", task.get_name(), timeout_s)
            return
    if not task.cancelled() and task.exception() is not None:
        # Retrieved and logged here, not as "never retrieved" when it is collected.
        log.error("background task %s had failed", task.get_name(), exc_info=task.exception())


class Rounds:
    """A background loop: a round, then a pause that `stop` cuts short, until stopped.
    A failed round is reported by `failed` and the loop goes on: neither an outage nor
    a bug in one round ends the task."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    def pause_s(self) -> float:
        """How long to wait after a round that left nothing to do at once."""
        raise NotImplementedError

    async def step(self) -> bool:
        """One round; True when there is more to do at once (no pause)."""
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """A round raised `exc` (called in its `except`): logged with its traceback."""
        log.exception("%s round failed; retrying", type(self).__name__)

    async def run(self) -> None:
        while not self._stopping.is_set():
            busy = False
            try:
                busy = await self.step()
            except Exception as exc:
                self.failed(exc)
            if not busy:
                await pause(self._stopping, self.pause_s())


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `stopping` is set meanwhile (a loop's wait between
    rounds that a stop cuts short)."""
    try:
        async with asyncio.timeout(seconds):
            await stopping.wait()
    except TimeoutError:
        pass


async def watch_lag(observe: Callable[[float], None], every_s: float = LAG_SAMPLE_S) -> None:
    """Until cancelled: how late the event loop wakes from each sleep of `every_s`
    (how long the process's other work held its callbacks back), to `observe`."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        observe(max(0.0, loop.time() - due))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` to completion on uvloop where it is installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
