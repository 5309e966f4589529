"""What a client sends after an Upgrade request's head, kept for the session after a 101."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class UpgradeBuffer:
    """The bytes after the head: buffered until the handler decides, then read by the
    upgraded session (`Upgraded.receive`)."""

    __slots__ = ("data", "ended", "_waiter", "_on_read")

    def __init__(self, first: bytes, on_read: Callable[[], None]) -> None:
        self.data = bytearray(first)
        self.ended = False  # the client closed or half-closed: nothing more comes
        self._waiter: asyncio.Future[None] | None = None
        self._on_read = on_read  # the buffer shrank: reading may resume

    def feed(self, data: bytes) -> None:
        self.data += data
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    async def receive(self) -> bytes:
        """What has come since the last call, b"" once the client has closed."""
        while not self.data:
            if self.ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = bytes(self.data)
        self.data.clear()
        self._on_read()
        return chunk

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
