"""A counter-store call's timeout, by the store's lateness and not the busy process's.

`storage.timeout_ms` bounds how long Redis may take. A process busy with other
requests runs its event loop late, and a call's timer then falls due in the
same turn as the arrival of the answer, before the loop has read it: the
timeout would blame Redis for the process's own lateness (and a loaded
gateway would answer 503 with Redis answering in time).
"""

from __future__ import annotations

import asyncio
from typing import Any

# A call's timer that falls due this late found the event loop busy.
BUSY_LATE_S = 0.005


def expire(
    answer: asyncio.Future[Any], timeout_s: float, due: float, grace_until: float | None = None
) -> None:
    """A call's timer: its answer fails with TimeoutError unless it came meanwhile.

    A timer that falls due late found the loop busy (other requests' work, a
    collection), and an answer that came meanwhile still waits to be read, which
    takes a few more turns of that busy loop. Then the timer looks again every
    BUSY_LATE_S for up to one more timeout, so that a busy gateway does not take
    its own lateness for the store's.
    """
    if answer.done():
        return
    loop = asyncio.get_running_loop()
    now = loop.time()
    if grace_until is None and now - due > BUSY_LATE_S:
        grace_until = now + timeout_s
    if grace_until is not None and now < grace_until:
        loop.call_later(BUSY_LATE_S, expire, answer, timeout_s, now + BUSY_LATE_S, grace_until)
    else:
        answer.set_exception(TimeoutError("no answer within the counter store's timeout"))


def pass_on(answer: asyncio.Future[Any], call: asyncio.Future[Any]) -> None:
    """A finished call's outcome to its `answer`, unless that timed out first."""
    if call.cancelled():
        if not answer.done():
            answer.cancel()
        return
    exc = call.exception()  # retrieved, whether or not anyone waits for it still
    if answer.done():
        return
    if exc is not None:
        answer.set_exception(exc)
    else:
        answer.set_result(call.result())
