"""One HTTP/1.1 connection to an upstream: an asyncio Protocol around llhttp (httptools).

The connection writes what it is given and parses one response per exchange,
buffering its body with flow control; `upstream_client` pools connections and
frames requests. Every failure is an `UpstreamError` with the kind the
forwarder reports.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Literal, cast

import httptools
from multidict import CIMultiDict

from gateway.headers import connection_tokens

FailureKind = Literal["connect", "timeout", "reset"]

# Reading pauses while this much body waits for the consumer: memory stays
# flat when the client downloads slower than the upstream sends.
_BUFFER_HIGH_BYTES = 256 * 1024
# The status line and headers of one answer (interim ones included) may not
# grow past this: llhttp itself sets no limit.
_MAX_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamError(Exception):
    """The exchange with the upstream failed; `kind` is connect, timeout or reset."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: FailureKind = kind


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamError("timeout", "the upstream went quiet"))


def _decode(raw: bytes) -> str:
    # The same decoding aiohttp's parsers use, so bytes survive the round trip.
    return raw.decode("utf-8", "surrogateescape")


class Connection(asyncio.Protocol):
    """A connection's state for the exchange in progress: the answer's head, body and end."""

    def __init__(self, idle_timeout_s: float, on_lost: Callable[[Connection], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle_timeout_s = idle_timeout_s
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = False  # taken from the idle pool, not freshly opened
        self.idle_since = 0.0
        self._lost_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._new_exchange(head_only=False)
        self._parser: httptools.HttpResponseParser | None = None  # None: no exchange open

    def _new_exchange(self, head_only: bool) -> None:
        self._head_only = head_only
        self._head_bytes = 0
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self.status = 0
        self.reason = ""
        self.version = (1, 1)
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.request_sent = False
        self._until_close = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def begin(self, head_only: bool) -> None:
        """Start an exchange; `head_only` when the request is HEAD (no body follows)."""
        self._new_exchange(head_only)
        # A fresh parser per answer: llhttp cannot be told that one answered a HEAD.
        self._parser = httptools.HttpResponseParser(self)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.complete:
            # Nothing was asked: whatever this is, the connection cannot be trusted.
            self.fail(UpstreamError("reset", "the upstream sent bytes nobody asked for"))
            return
        self.received_any = True
        self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError("reset", "the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError("reset", f"malformed response: {exc}"))
        else:
            if not self.head_done and self._head_bytes > _MAX_HEAD_BYTES:
                self.fail(UpstreamError("reset", "response head too large"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.head_done and not self.complete and self._until_close and exc is None:
            self.complete = True  # the body ran until the upstream closed
            self.keep_alive = False
        elif self._parser is not None and not self.complete and self._error is None:
            self._error = UpstreamError("reset", f"the upstream closed the connection ({exc})")
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((_decode(name), _decode(value)))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one
            # follows on the same connection. 101 ends in HttpParserUpgrade.
            self._reason, self._raw_headers = b"", []
            return
        self.status, self.reason = status, _decode(self._reason)
        version = self._parser.get_http_version()
        self.version = (int(version[0]), int(version[2])) if len(version) == 3 else (1, 1)
        self.headers = CIMultiDict(self._raw_headers)
        self.head_done = True
        if self._head_only:
            # llhttp would wait for the body its Content-Length describes.
            self.complete = True
            self.keep_alive = self._persistent()
        elif status not in _NO_BODY_STATUSES:
            te = self.headers.get("Transfer-Encoding", "")
            chunked = te.rsplit(",", 1)[-1].strip().lower() == "chunked"
            self._until_close = not chunked and (bool(te) or "Content-Length" not in self.headers)
        self._wake()

    def _persistent(self) -> bool:
        tokens = connection_tokens(self.headers)
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return  # the answer to a HEAD has no body, whatever follows it
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _BUFFER_HIGH_BYTES and not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done or self.complete:
            return  # the end of an interim answer, or of a HEAD's
        assert self._parser is not None
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # the exchange, for the client

    def fail(self, error: UpstreamError) -> None:
        """End the exchange with `error` and drop the connection (no graceful close)."""
        if self._error is None and not self.complete:
            self._error = error
        self._wake()
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    async def wait_lost(self) -> None:
        if not self.lost:
            self._lost_waiter = self._loop.create_future()
            await self._lost_waiter

    def write(self, *parts: bytes) -> None:
        """Send `parts` (gathered into one system call where the loop can)."""
        transport = self.transport
        if transport is None or self.lost or self._error is not None or transport.is_closing():
            raise self._error or UpstreamError("reset", "the connection is closed")
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)

    async def drain(self, deadline: float | None) -> None:
        """Wait while the upstream reads slower than we write."""
        while self._writing_paused and not self.lost:
            self._drain_waiter = waiter = self._loop.create_future()
            await self._wait_on(waiter, deadline)
        if self._error is not None or self.lost:
            raise self._error or UpstreamError("reset", "the connection is closed")

    def sent(self) -> None:
        """The whole request is out: from now on the upstream's silence counts."""
        self.request_sent = True
        self._wake()

    async def read_head(self, deadline: float | None) -> None:
        """Wait for the final answer's status and headers."""
        while not self.head_done:
            if self._error is not None:
                raise self._error
            # While the body still uploads, only the total timeout applies: a
            # stalled upload is caught by `drain`, a slow client by the server.
            await self._wait(deadline, idle=self.request_sent)

    async def read_chunk(self, deadline: float | None) -> bytes:
        """The body received so far and not yet read; b"" at its end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(deadline)
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return data

    @property
    def drained(self) -> bool:
        """The whole answer arrived and was read: the connection may serve another."""
        return self.complete and not self._chunks

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float | None, idle: bool = True) -> None:
        self._waiter = waiter = self._loop.create_future()
        await self._wait_on(waiter, deadline, idle)

    async def _wait_on(
        self, waiter: asyncio.Future[None], deadline: float | None, idle: bool = True
    ) -> None:
        # Idle counts from now: callers wait only once what arrived is read.
        at = self._loop.time() + self._idle_timeout_s if idle else deadline
        if deadline is not None and at is not None and deadline < at:
            at = deadline
        timer = None if at is None else self._loop.call_at(at, _expire, waiter)
        try:
            await waiter
        except UpstreamError as exc:
            self.fail(exc)
            raise
        finally:
            if timer is not None:
                timer.cancel()
