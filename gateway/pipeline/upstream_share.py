"""Each client's share of an upstream's connections.

A client (its address, see `headers.client_key`) may have at most
`max_per_client` exchanges under way with one upstream, on a connection or
waiting for one: a client that trickles its request bodies, or simply sends
too many at once, cannot take the whole pool from the others. One over its
share waits, up to a bounded time, for one of its own exchanges to end (a
short burst is queued, not refused), then is refused with OverShare.
"""

from __future__ import annotations

import asyncio
from collections import deque


class OverShare(Exception):
    """A client had its share of the upstream's exchanges under way for the whole wait."""


class Shares:
    """Exchanges under way per client, at most `max_per_client` each."""

    def __init__(self, max_per_client: int) -> None:
        self._max = max_per_client
        self._held: dict[str, int] = {}  # only clients with an exchange under way
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def held(self, client: str) -> int:
        """Exchanges of `client` under way now."""
        return self._held.get(client, 0)

    async def enter(self, client: str, timeout_s: float) -> None:
        """Take a place for one exchange of `client`; OverShare when none frees up in time."""
        held = self._held.get(client, 0)
        if held < self._max:
            self._held[client] = held + 1
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(client, deque())
        waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter  # `leave` hands its place over: the count stays
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.leave(client)  # handed over just as the wait ended: pass it on
            if isinstance(exc, TimeoutError):
                raise OverShare(f"{held} requests of this client are under way") from None
            raise
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(client) is waiters:
                del self._waiters[client]

    def leave(self, client: str) -> None:
        """One exchange of `client` is over: its place goes to the client's next waiter."""
        waiters = self._waiters.get(client)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        held = self._held.pop(client, 1) - 1
        if held > 0:
            self._held[client] = held
