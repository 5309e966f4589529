"""One client connection of the public listener: an asyncio Protocol around llhttp.

Requests on a connection are handled one at a time, in order, by one worker
task per connection (started with the first request, kept while the connection
is open): no task is created per request, so the requests of a connection share
the worker's context (`contextvars`) and `asyncio.current_task()`. A pipelined
request waits in the queue with its body, and reading pauses while a complete
one waits or a body buffers past `BUFFER_HIGH_BYTES`, so memory stays bounded.
One timer per connection enforces the head, body-idle and keep-alive limits
without a timer per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from gateway.http import answers, wire
from gateway.http.deadline import HEAD, IDLE, NOTHING
from gateway.http.message import BodyTimeout, ClientDisconnected, Request, Response, Upgraded
from gateway.http.parsing import ALL_PARSED, MAX_QUEUED, Exchange, HeadTooLarge, RequestParser
from gateway.http.reading import BUFFER_HIGH_BYTES, ConnectionState
from gateway.http.shared import log, refusals, shed_reason
from gateway.http.upgrade import UpgradeBuffer

# The listener's own answers (status, problem kind, detail), encoded when sent for their Date.
_INTERNAL_ERROR = (500, "internal-error", "the gateway failed")
_BODY_TIMEOUT = (408, "request-timeout", "the request body stopped coming")
# Shed under overload: the body is left unread and the connection closed, which
# also sheds the connection; the client may come back in a second.
_SHED = (503, "overloaded", "the gateway is overloaded; retry later")
_SHED_FIELDS = "Retry-After: 1\r\n"


class HttpConnection(ConnectionState, asyncio.Protocol):
    """A client connection: parses requests, runs the handler on each, writes its answer."""

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        self._out = answers.Output(transport)
        state = self._state
        if len(state.connections) >= self._limits.max_connections:
            self._out.closed = True
            transport.abort()
            return
        state.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = str(peer[0])
        self._parser = RequestParser(self, self._peer, state.scheme, self._limits.max_head_bytes)
        self._deadline.set(IDLE, self._limits.keepalive_idle_s)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        state.connections.discard(self)
        if not state.connections and state.emptied is not None:
            state.emptied.set()
        self._out.lost()
        self._deadline.cancel()
        self._wake_reader()
        if self._upgrade is not None:
            self._upgrade.end()
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if self._streaming and self._task is not None:
            # The stream may wait long for its next piece (an idle upstream):
            # cancelling the wait lets its cleanup run now.
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:
            self._upgrade.feed(data)
            self._update_reading()
            return
        if self._ignore_input:
            return
        if self._backlog is not None:
            self._backlog += data  # read before reading paused
            return
        self._feed(data)
        parsing = self._parser.parsing
        if (
            self._reading_paused
            or len(self._queue) > 1
            or (parsing is not None and parsing.buffered > BUFFER_HIGH_BYTES)
            or self._upgrade is not None
            or self._backlog is not None
        ):
            self._update_reading()

    def _feed(self, data: bytes) -> bool:
        """Parse `data`; False when parsing stops (a malformed request, an upgrade)."""
        try:
            fed = self._parser.feed(data)
        except (httptools.HttpParserError, HeadTooLarge) as exc:
            self._parse_failed(exc)
            return False
        if fed is ALL_PARSED:
            return True
        if fed.upgraded is not None:
            self._upgrade = UpgradeBuffer(fed.upgraded, self._update_reading)
            return False
        self._backlog = bytearray(fed.rest)  # parsed once fewer requests wait
        return True

    def eof_received(self) -> bool | None:
        if not self._queue or self._tls or self._streaming:
            # Idle, TLS (asyncio cannot keep it half-open) or a stream under way
            # (most likely the client left: a stream would wait on in vain).
            return None
        # The client sent all it will: answer what came, then close.
        self._eof = self._closing = True
        self._wake_reader()
        if self._upgrade is not None:
            self._upgrade.end()  # an upgraded session reads b"" now
        return True

    def pause_writing(self) -> None:
        self._out.pause()

    def resume_writing(self) -> None:
        self._out.resume()

    # -- parsing.Owner

    def request_parsed(self, exchange: Exchange) -> None:
        self._queue.append(exchange)
        if not self._busy:
            self._start()

    # -- message.Connection

    async def send(self, request: Request, response: Response) -> None:
        """Write the answer to the current request."""
        if self._preempted:
            return  # a broken body was answered already
        exchange = self._queue[0] if self._queue else None
        if exchange is None or exchange.request is not request or self._head_written:
            raise RuntimeError("an answer to a request that is not waiting for one")
        await self._answer(exchange, response)

    def abort(self) -> None:
        """Cut the connection now."""
        self._closing = True
        self._transport.abort()

    # -- serving

    def shutdown(self) -> None:
        """Close now when idle, else after the answer in progress (the listener stops)."""
        self._closing = True
        if not self._busy:
            self._transport.close()

    def cut(self) -> asyncio.Task[None] | None:
        """Abort the connection and cancel its handler (the listener's stop ran out of time)."""
        self.abort()
        task = self._task
        if task is not None:
            task.cancel()
        return task

    def _start(self) -> None:
        """Hand the next queued request to the worker, starting it if need be."""
        self._busy = True
        self._head_written = False
        self._keep_alive = False
        self._body_waited_s = 0.0
        self._deadline.what = NOTHING
        idle = self._idle
        if idle is not None:
            if not idle.done():
                idle.set_result(None)
        elif self._task is None:
            self._task = self._loop.create_task(self._work())

    async def _work(self) -> None:
        """The connection's requests, one after the other, each to its answer."""
        state = self._state
        try:
            while self._busy:
                exchange = self._queue[0]
                request = exchange.request
                shed = shed_reason(state, request.target, self._fresh)
                self._fresh = False
                if shed is not None:
                    self._shed(shed)
                    self._finish()  # closes the connection
                    return
                state.in_flight += 1
                try:
                    response = await state.handler(request)
                    if not request.responded:
                        request.responded = True
                        body = response.body
                        if type(body) is bytes and response.upgrade is None:
                            self._write_whole(exchange, response, body)  # no coroutine more
                        else:
                            await self._answer(exchange, response)
                except BodyTimeout:
                    self._fail(_BODY_TIMEOUT)
                except ClientDisconnected:
                    self._fail(None)
                except Exception as exc:
                    log.error(
                        "the handler failed on %s %s", request.method, request.path, exc_info=exc
                    )
                    if state.on_error is not None:
                        state.on_error(exc)
                    self._fail(_INTERNAL_ERROR)
                except asyncio.CancelledError:  # the listener stopped and its time ran out
                    self._fail(None)
                    raise
                finally:
                    state.in_flight -= 1
                if not self._finish():
                    return
                while not self._busy:  # idle: wait for the next request
                    self._idle = self._loop.create_future()
                    try:
                        await self._idle
                    finally:
                        self._idle = None
                    if self._out.closed:
                        return
        finally:
            self._task = None

    def _shed(self, reason: str) -> None:
        """Answer 503 without running the handler or reading the body."""
        self._keep_alive = False
        self._head_written = True
        self._out.write(wire.problem_answer(*_SHED, _SHED_FIELDS))
        on_shed = self._state.on_shed
        if on_shed is not None:
            on_shed(reason)

    def _may_keep(self, exchange: Exchange) -> bool:
        """The connection may outlive this exchange's answer (the answer may still end it)."""
        return (
            exchange.keep_alive
            and exchange.complete  # an unread body is not read to throw away
            and not self._closing
            and (self._upgrade is None or exchange is not self._parser.parsing)
        )

    def _write_whole(self, exchange: Exchange, response: Response, body: bytes) -> None:
        may_keep = self._may_keep(exchange)
        keep = answers.write_whole(self._out, exchange.request, response, body, may_keep)
        self._head_written = True
        self._keep_alive = keep

    async def _answer(self, exchange: Exchange, response: Response) -> None:
        request = exchange.request
        body = response.body
        if response.status == 101:
            if response.upgrade is None or self._upgrade is None:
                raise RuntimeError("a 101 answer without an upgrade on both sides")
            await self._hand_over(response, self._upgrade, response.upgrade)
            return
        if isinstance(body, bytes):
            self._write_whole(exchange, response, body)
            return
        try:
            if answers.bodiless(request, response.status):
                keep = answers.write_head_only(
                    self._out, request, response, self._may_keep(exchange)
                )
                self._head_written = True
                self._keep_alive = keep
                return
            head, length, chunked, keep = answers.stream_head(
                request, response, self._may_keep(exchange)
            )
            self._out.write(head)
            self._head_written = self._streaming = True
            try:
                sent = await answers.send_stream(self._out, body, length, chunked)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._out.closed or task is None or task.uncancel() > 0:
                    raise
                return  # the client left while the stream waited: cancelled by connection_lost
            finally:
                self._streaming = False
            self._keep_alive = sent and keep
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    def _fail(self, answer: tuple[int, str, str] | None) -> None:
        """After a failed handler: the error answer if none was started, else a cut."""
        self._keep_alive = False
        if self._out.closed or self._preempted:
            return  # gone, or the listener's 400 is out: close once it is written
        if answer is not None and not self._head_written:
            self._head_written = True
            self._out.write(wire.problem_answer(*answer))
        else:
            self.abort()

    def _finish(self) -> bool:
        """After an answer: whether the connection goes on (perhaps idle for now)."""
        self._queue.popleft()
        self._busy = False
        if self._out.closed:
            return False
        if not self._keep_alive or self._closing:
            self._ignore_input = True
            self._transport.close()
            return False
        if self._backlog is not None and len(self._queue) <= MAX_QUEUED:
            backlog, self._backlog = self._backlog, None
            self._feed(bytes(backlog))
            if self._ignore_input:
                return False  # it held a malformed request, answered already
        if self._busy:
            pass  # the backlog's first request has started
        elif self._queue:
            self._start()
        elif self._pending_error is not None:
            self._out.write(self._pending_error)
            self._transport.close()
            return False
        elif self._parser.in_head:
            self._deadline.set(HEAD, self._limits.header_timeout_s)
        else:
            self._deadline.set(IDLE, self._limits.keepalive_idle_s)
        if self._reading_paused or self._queue:
            self._update_reading()
        return True

    def _parse_failed(self, exc: Exception) -> None:
        self._ignore_input = True
        if isinstance(exc, HeadTooLarge) or isinstance(exc.__context__, HeadTooLarge):
            status, kind = 431, "request-header-fields-too-large"
            detail = f"the request head is over {self._limits.max_head_bytes} bytes"
        else:
            status, kind = 400, "bad-request"
            detail = (str(exc) or type(exc).__name__)[:100]  # llhttp's reason, no raw bytes
        refusals.note(status, self._peer, detail)
        answer = wire.problem_answer(status, kind, detail)
        parsing = self._parser.parsing
        if parsing is not None and not parsing.complete and parsing in self._queue:
            # The broken part is a body: its reader gets ClientDisconnected.
            if parsing is self._queue[0] and self._busy:
                self._closing = True
                if self._head_written:
                    self.abort()
                    return
                # The handler's own answer, if it still gives one, is dropped.
                self._head_written = self._preempted = True
                parsing.request.responded = True
                self._out.write(answer)
                self._wake_reader()
                return
            self._queue.pop()
        if self._busy:
            self._pending_error = answer
            self._transport.pause_reading()
            self._reading_paused = True
        else:
            self._out.write(answer)
            self._transport.close()

    # -- upgrades

    async def _hand_over(
        self,
        response: Response,
        buffer: UpgradeBuffer,
        session: Callable[[Upgraded], Awaitable[None]],
    ) -> None:
        head = wire.encode_head(101, response.reason, response.headers, wire.DROP_FOR_UPGRADE, "")
        self._out.write(head)
        self._head_written = self._upgraded = True
        self._keep_alive = False
        self._update_reading()
        transport = self._transport
        out = self._out
        try:
            await session(Upgraded(buffer.receive, out.write, out.drain, transport.close))
        finally:
            transport.close()
