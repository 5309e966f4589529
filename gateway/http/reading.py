"""A client connection's state and its reading side: the queue of parsed requests,
the body reads of the request in hand, pauses of reading and the deadlines.

`connection.HttpConnection` builds on it with the protocol callbacks, the worker
that runs the handler and the writing of answers.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from gateway.http import answers, wire
from gateway.http.deadline import BODY, HEAD, NOTHING, Deadline
from gateway.http.message import BodyTimeout, ClientDisconnected
from gateway.http.parsing import Exchange, RequestParser
from gateway.http.shared import ServerState, refusals
from gateway.http.upgrade import UpgradeBuffer

# Reading pauses while this much body (or upgraded stream) waits for the handler.
BUFFER_HIGH_BYTES = 256 * 1024

_HEAD_TIMEOUT = (408, "request-timeout", "the request head came too slowly")


class ConnectionState:
    """What one connection holds between the protocol's callbacks and its worker."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._limits = limits = state.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport  # these three are set by connection_made
        self._out: answers.Output
        self._parser: RequestParser
        self._peer = ""
        self._tls = False
        self._queue: deque[Exchange] = deque()  # [0] is handled when _busy
        self._busy = False
        self._task: asyncio.Task[None] | None = None  # the worker, while it runs
        self._idle: asyncio.Future[None] | None = None  # the worker waits for a request
        self._deadline = Deadline(self._loop, limits.check_every_s, self._expired)
        self._body_expired = False  # read_body_chunk raises BodyTimeout
        self._body_waited_s = 0.0  # the handler waited this long for the current body
        self._body_rate_at = 0.0  # loop time the body's minimum rate runs out (while read)
        self._reader: asyncio.Future[None] | None = None  # a body read waits
        self._reading_paused = False
        self._closing = False  # close once the answer in progress is written
        self._ignore_input = False  # a parse error or a close is under way
        self._eof = False  # the client half-closed: nothing more will come
        self._head_written = False  # the current answer's head is out
        self._keep_alive = False  # decided when the current answer's head is written
        self._preempted = False  # the listener answered a request whose body broke
        self._pending_error: bytes | None = None  # answered once the queue is done
        self._upgrade: UpgradeBuffer | None = None  # after an Upgrade request's head
        self._backlog: bytearray | None = None  # read, not parsed: many requests queued
        self._upgraded = False  # the 101 is out: the bytes belong to the session
        self._streaming = False  # a streamed body is being sent
        self._fresh = True  # no request of this connection has been handled yet

    @property
    def requests_parsed(self) -> int:
        """Requests parsed and not yet answered (the one in hand included)."""
        return len(self._queue)

    @property
    def body_bytes_buffered(self) -> int:
        """Request body bytes parsed and not yet read by a handler."""
        return sum(exchange.buffered for exchange in self._queue)

    # -- parsing.Owner, message.Connection: the body side

    def head_started(self) -> None:
        if not self._busy:
            self._deadline.set(HEAD, self._limits.header_timeout_s)

    def body_arrived(self) -> None:
        reader = self._reader
        if reader is not None:
            idle_at = self._loop.time() + self._limits.body_idle_timeout_s
            self._deadline.at = min(idle_at, self._body_rate_at)
            if not reader.done():
                reader.set_result(None)

    async def read_body_chunk(self) -> bytes:
        """The next piece of the current request's body, b"" at its end."""
        exchange = self._queue[0]
        if exchange.expect_continue:
            exchange.expect_continue = False
            # RFC 9110 10.1.1: no need to invite a body that has already come.
            if not exchange.complete and not exchange.buffered:
                self._out.write(wire.CONTINUE)
        while not exchange.chunks:
            if exchange.complete:
                return b""
            if self._body_expired:
                raise BodyTimeout("the client sent no body for the idle timeout")
            if self._out.closed or self._preempted or self._eof:
                raise ClientDisconnected("the client closed the connection mid-body")
            waiting_since = self._loop.time()
            self._deadline.set_at(BODY, self._body_deadline(exchange, waiting_since))
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
                self._body_waited_s += self._loop.time() - waiting_since
                if self._deadline.what == BODY:
                    self._deadline.what = NOTHING
        chunk = exchange.chunks.popleft()
        exchange.buffered -= len(chunk)
        if self._reading_paused:
            self._update_reading()
        return chunk

    # -- flow control and timing

    def _body_deadline(self, exchange: Exchange, now: float) -> float:
        """When the wait for more of the body that starts `now` fails: after the idle
        timeout, or sooner when the body falls under its minimum rate.

        Only the time the handler waited for the client counts against the rate:
        while the upstream reads slowly, reading from the client pauses, and that
        is not the client's doing. Raises BodyTimeout when the rate is already missed.
        """
        limits = self._limits
        at = now + limits.body_idle_timeout_s
        rate = limits.body_min_bytes_per_s
        if rate > 0:
            allowed_s = limits.body_rate_grace_s + exchange.request.body_bytes_read / rate
            self._body_rate_at = now + allowed_s - self._body_waited_s
            if self._body_rate_at <= now:
                self._closing = True
                raise BodyTimeout(f"the request body came slower than {rate:g} bytes/s")
            at = min(at, self._body_rate_at)
        else:
            self._body_rate_at = math.inf
        return at

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _update_reading(self) -> None:
        """Pause reading while a whole request or a full buffer waits, resume after."""
        if self._out.closed or self._pending_error is not None:
            return
        if self._upgrade is not None:
            # Before the 101 is out the handler may still answer otherwise.
            pause = len(self._upgrade.data) > BUFFER_HIGH_BYTES or not self._upgraded
        else:
            parsing = self._parser.parsing
            queue = self._queue
            pause = (
                (len(queue) > 1 and queue[-1].complete)
                or (parsing is not None and parsing.buffered > BUFFER_HIGH_BYTES)
                or self._backlog is not None
            )
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def _expired(self, what: int) -> None:
        """The head, a body read or the next request took longer than its limit."""
        if self._out.closed:
            return
        if what == BODY:
            self._body_expired = self._closing = True
            self._wake_reader()
            return
        self._ignore_input = True
        if what == HEAD and not self._busy:
            refusals.note(408, self._peer, "the request head came too slowly")
            self._out.write(wire.problem_answer(*_HEAD_TIMEOUT))
        self._transport.close()
