"""Waiting for something to happen: poll a condition up to a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10) -> None:
    """Return once `check()` (awaited if it returns an awaitable) holds; fail past `timeout_s`.

    A fixed sleep is either too short on a loaded machine or wastes time on
    an idle one; the deadline only bounds how long a broken run takes to fail.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert loop.time() < deadline, f"condition not reached within {timeout_s} s"
        await asyncio.sleep(0.02)
