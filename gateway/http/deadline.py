"""A connection's one timer: what it waits for (a head, a body, the next request) and until when.

Setting a deadline costs two attribute writes: the timer never sleeps further
ahead than the shortest limit, so a deadline set later is never earlier than
the timer and no timer is cancelled or made per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

NOTHING, HEAD, BODY, IDLE = range(4)  # what the connection waits for


class Deadline:
    """Calls `on_expired(what)` once `what` has been waited for past its deadline."""

    __slots__ = ("what", "at", "_loop", "_check_every_s", "_timer", "_timer_at", "_on_expired")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        check_every_s: float,
        on_expired: Callable[[int], None],
    ) -> None:
        self.what = NOTHING
        self.at = 0.0  # loop time
        self._loop = loop
        self._check_every_s = check_every_s  # the shortest limit
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the timer fires
        self._on_expired = on_expired

    def set(self, what: int, delay_s: float) -> None:
        """Wait for `what` until `delay_s` from now (not shorter than the shortest limit)."""
        self.what = what
        self.at = self._loop.time() + delay_s
        if self._timer is None:
            self._arm()

    def set_at(self, what: int, at: float) -> None:
        """Wait for `what` until loop time `at`, which may be closer than the shortest
        limit (the timer is then moved up)."""
        self.what = what
        self.at = at
        if self._timer is not None and at < self._timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._arm()

    def cancel(self) -> None:
        self.what = NOTHING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        when = self._timer_at = min(self.at, self._loop.time() + self._check_every_s)
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        what = self.what
        if what == NOTHING:
            return
        if self._loop.time() < self.at:
            self._arm()
            return
        self.what = NOTHING
        self._on_expired(what)
