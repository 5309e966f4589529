"""Background loops (`lifecycle.Rounds`): a failed round never ends the loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.lifecycle import Rounds, stop_task


class Flaky(Rounds):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.done = asyncio.Event()

    def pause_s(self) -> float:
        return 0.01

    async def step(self) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in one round")
        if self.calls == 3:
            self.done.set()
        return self.calls == 2  # more to do at once: no pause before the third


async def test_a_failed_round_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds = Flaky()
    task = asyncio.create_task(rounds.run())
    await asyncio.wait_for(rounds.done.wait(), 5)
    rounds.stop()
    await asyncio.wait_for(task, 5)  # a stop ends it at once, mid-pause
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and "Flaky round failed" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    await stop_task(task)
