"""One client connection of the public listener: an asyncio Protocol around llhttp.

Requests on a connection are handled one at a time, in order: a pipelined
request waits in the queue with its body, and reading pauses while a complete
one waits or a body buffers past `BUFFER_HIGH_BYTES`, so memory stays bounded.
One timer per connection enforces the head, body-idle and keep-alive limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.http import wire
from gateway.http.limits import Limits
from gateway.http.message import (
    BodyTimeout,
    ClientDisconnected,
    Handler,
    Request,
    Response,
    Upgraded,
)

log = logging.getLogger("gateway.http")

# Reading pauses while this much body waits for the handler.
BUFFER_HIGH_BYTES = 256 * 1024
_BAD_REQUEST_LOG_EVERY_S = 1.0

_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_METHODS: dict[bytes, str] = {}
_NO_BODY_STATUSES = frozenset({204, 304})
_INTERNAL_ERROR = wire.problem_answer(500, "internal-error", "the gateway failed")
_HEAD_TIMEOUT = wire.problem_answer(408, "request-timeout", "the request head came too slowly")
_BODY_TIMEOUT = wire.problem_answer(408, "request-timeout", "the request body stopped coming")

# What the connection's one timer is waiting for (_BODY_EXPIRED: read_body_chunk raises).
_NOTHING, _HEAD, _BODY, _IDLE, _BODY_EXPIRED = range(5)


class ServerState:
    """What a listener's connections share: the handler, the limits and the counts."""

    __slots__ = ("handler", "scheme", "limits", "on_error", "connections", "in_flight", "emptied")

    def __init__(
        self,
        handler: Handler,
        scheme: str,
        limits: Limits,
        on_error: Callable[[BaseException], None] | None,
    ) -> None:
        self.handler = handler
        self.scheme = scheme
        self.limits = limits
        self.on_error = on_error
        self.connections: set[HttpConnection] = set()
        self.in_flight = 0  # requests whose handler runs
        self.emptied: asyncio.Event | None = None  # set when the last connection ends (stop)


class _BadRequestLog:
    """One INFO line per interval at most: a flood of garbage must not flood the log."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.dropped = 0

    def note(self, status: int, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.dropped += 1
            return
        log.info("answered %d to %s: %s (%d not logged)", status, peer, reason, self.dropped)
        self.next_at = now + _BAD_REQUEST_LOG_EVERY_S
        self.dropped = 0


_bad_requests = _BadRequestLog()


class _HeadTooLarge(Exception):
    pass


class _Exchange:
    """A parsed request and its body as it arrives."""

    __slots__ = ("request", "chunks", "buffered", "complete", "keep_alive", "expect_continue")

    def __init__(self, request: Request, keep_alive: bool, expect_continue: bool) -> None:
        self.request = request
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue


class HttpConnection(asyncio.Protocol):
    """A client connection: parses requests, runs the handler on each, writes its answer."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._limits = state.limits
        self._check_every_s = state.limits.check_every_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport  # set by connection_made
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._queue: deque[_Exchange] = deque()  # [0] is handled when _busy
        self._parsing: _Exchange | None = None  # the exchange whose body the parser fills
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._in_head = False
        self._url = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0  # what the callbacks have seen of the head in progress
        self._head_spill = 0  # bytes of later reads while a head is in progress
        self._framing_given = False  # a header that may frame a body was seen
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._waiting_for = _NOTHING
        self._reader: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False  # the transport is gone
        self._closing = False  # close once the answer in progress is written
        self._ignore_input = False  # a parse error or a close is under way
        self._head_written = False  # the current answer's head is out
        self._keep_alive = False  # decided when the current answer's head is written
        self._pending_error: bytes | None = None  # answered once the queue is done
        self._upgrade_data: bytearray | None = None  # bytes after an Upgrade request's head
        self._upgrade_waiter: asyncio.Future[None] | None = None
        self._upgraded = False  # the 101 is out: the bytes belong to the session
        self._preempted = False  # the listener answered a request with a broken body

    @property
    def body_bytes_buffered(self) -> int:
        """Request body bytes parsed and not yet read by a handler."""
        return sum(exchange.buffered for exchange in self._queue)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        state = self._state
        if len(state.connections) >= self._limits.max_connections:
            self._closed = True
            transport.abort()
            return
        state.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = str(peer[0])
        self._set_deadline(_IDLE, self._limits.keepalive_idle_s)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        state.connections.discard(self)
        if not state.connections and state.emptied is not None:
            state.emptied.set()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiter in (self._reader, self._drain_waiter, self._upgrade_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._upgrade_data is not None:
            self._upgrade_data += data
            self._wake_upgrade()
            self._update_reading()
            return
        if self._ignore_input:
            return
        in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_data = bytearray(data[cast(int, exc.args[0]) :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if in_head and self._in_head:
            # The callbacks count what llhttp has finished; this keeps a field
            # it is still buffering (a long header value) from growing without end.
            self._head_spill += len(data)
            if self._head_spill > self._limits.max_head_bytes:
                self._parse_failed(_HeadTooLarge())
                return
        parsing = self._parsing
        if (
            self._reading_paused
            or len(self._queue) > 1
            or (parsing is not None and parsing.buffered > BUFFER_HIGH_BYTES)
        ):
            self._update_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed client gets no more answers

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._raw_headers = []
        self._head_bytes = 0
        self._head_spill = 0
        self._framing_given = False
        if not self._busy:
            self._waiting_for = _HEAD
            self._deadline = self._loop.time() + self._limits.header_timeout_s
            if self._timer is None:
                self._arm()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_head_bytes:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 or size == 17:  # maybe Content-Length or Transfer-Encoding
            self._framing_given = True
        self._head_bytes += size + len(value) + 4
        if self._head_bytes > self._limits.max_head_bytes:
            raise _HeadTooLarge
        self._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = _METHODS.setdefault(raw_method, raw_method.decode("ascii"))
        version = _VERSIONS.get(parser.get_http_version(), (1, 1))
        content_length = None
        chunked = expect = False
        if not self._framing_given or parser.should_upgrade():
            pass  # no body, or what follows the head is the upgraded stream
        elif (te := headers.get("transfer-encoding")) is not None:
            chunked = te.rpartition(",")[2].strip().lower() == "chunked"
        elif (length := headers.get("content-length")) is not None:
            content_length = int(length)  # llhttp has checked it is one number
        if (chunked or content_length) and version == (1, 1):
            expect = headers.get("expect", "").lower() == "100-continue"
        request = Request(
            method,
            self._url.decode("latin-1"),
            version,
            headers,
            self._peer,
            self._state.scheme,
            content_length,
            chunked,
            self,
        )
        exchange = _Exchange(request, parser.should_keep_alive(), expect)
        self._parsing = exchange
        self._queue.append(exchange)
        if not self._busy:
            self._start(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.chunks.append(body)
        exchange.buffered += len(body)
        if self._waiting_for == _BODY:
            self._deadline = self._loop.time() + self._limits.body_idle_timeout_s
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.complete = True
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- message.Connection

    async def read_body_chunk(self) -> bytes:
        """The next piece of the current request's body, b"" at its end."""
        exchange = self._queue[0]
        if exchange.expect_continue:
            exchange.expect_continue = False
            # RFC 9110 10.1.1: no need to invite a body that has already come.
            if not exchange.complete and not exchange.buffered and not self._closed:
                self._write(wire.CONTINUE)
        while not exchange.chunks:
            if exchange.complete:
                return b""
            if self._closed or self._preempted:
                raise ClientDisconnected("the client closed the connection mid-body")
            self._reader = self._loop.create_future()
            self._set_deadline(_BODY, self._limits.body_idle_timeout_s)
            try:
                await self._reader
            finally:
                self._reader = None
                if self._waiting_for == _BODY:
                    self._waiting_for = _NOTHING
            if self._waiting_for == _BODY_EXPIRED:
                raise BodyTimeout("the client sent no body for the idle timeout")
        chunk = exchange.chunks.popleft()
        exchange.buffered -= len(chunk)
        if self._reading_paused:
            self._update_reading()
        return chunk

    async def send(self, request: Request, response: Response) -> None:
        """Write the answer to the current request."""
        if self._preempted:
            return  # a broken body was answered already
        exchange = self._queue[0] if self._queue else None
        if exchange is None or exchange.request is not request or self._head_written:
            raise RuntimeError("an answer to a request that is not waiting for one")
        if type(response.body) is bytes and response.upgrade is None:
            self._write_whole(exchange, response, response.body)
        else:
            await self._write_other(exchange, response)

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

    def _start(self, exchange: _Exchange) -> None:
        self._busy = True
        self._head_written = False
        self._keep_alive = False
        self._waiting_for = _NOTHING
        self._task = self._loop.create_task(self._run(exchange))

    async def _run(self, exchange: _Exchange) -> None:
        request = exchange.request
        state = self._state
        state.in_flight += 1
        try:
            response = await state.handler(request)
            if not request.responded:
                request.responded = True
                body = response.body
                if type(body) is bytes and response.upgrade is None:
                    self._write_whole(exchange, response, body)
                else:
                    await self._write_other(exchange, response)
        except BodyTimeout:
            self._fail(_BODY_TIMEOUT)
        except ClientDisconnected:
            self._fail(None)
        except Exception as exc:
            log.error("the handler failed on %s %s", request.method, request.path, exc_info=exc)
            if state.on_error is not None:
                state.on_error(exc)
            self._fail(_INTERNAL_ERROR)
        except asyncio.CancelledError:  # the listener stopped and its time ran out
            self._fail(None)
            raise
        finally:
            state.in_flight -= 1
            self._finish()

    def _fail(self, answer: bytes | None) -> None:
        """After a failed handler: the error answer if none was started, else a cut."""
        self._keep_alive = False
        if self._closed:
            return
        if answer is not None and not self._head_written:
            self._head_written = True
            self._write(answer)
        else:
            self.abort()

    def _finish(self) -> None:
        self._queue.popleft()
        self._busy = False
        self._task = None
        if self._closed:
            return
        transport = self._transport
        if not self._keep_alive or self._closing:
            self._ignore_input = True
            transport.close()
            return
        if self._queue:
            self._start(self._queue[0])
        elif self._pending_error is not None:
            self._write(self._pending_error)
            transport.close()
            return
        elif self._in_head:
            self._set_deadline(_HEAD, self._limits.header_timeout_s)
        else:
            self._waiting_for = _IDLE
            self._deadline = self._loop.time() + self._limits.keepalive_idle_s
            if self._timer is None:
                self._arm()
        if self._reading_paused or self._queue:
            self._update_reading()

    def _parse_failed(self, exc: Exception) -> None:
        self._ignore_input = True
        if isinstance(exc, _HeadTooLarge) or isinstance(exc.__context__, _HeadTooLarge):
            status, kind = 431, "request-header-fields-too-large"
            detail = f"the request head is over {self._limits.max_head_bytes} bytes"
        else:
            status, kind = 400, "bad-request"
            detail = (str(exc) or type(exc).__name__)[:100]
        _bad_requests.note(status, self._peer, detail)
        answer = wire.problem_answer(status, kind, detail)
        transport = self._transport
        parsing = self._parsing
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
                self._write(answer)
                if self._reader is not None and not self._reader.done():
                    self._reader.set_result(None)
                return
            self._queue.pop()
        if self._busy:
            self._pending_error = answer
            transport.pause_reading()
            self._reading_paused = True
        else:
            self._write(answer)
            transport.close()

    # -- writing answers

    def _write(self, data: bytes) -> None:
        if not self._closed:
            # Not closed means connection_made has run.
            self._transport.write(data)

    def _decide_keep_alive(self, exchange: _Exchange, response: Response, framed: bool) -> str:
        """Whether the connection outlives this answer; the Connection line that says so."""
        request = exchange.request
        keep = (
            exchange.keep_alive
            and exchange.complete
            and framed
            and not response.close
            and not self._closing
            and (self._upgrade_data is None or exchange is not self._parsing)
        )
        self._keep_alive = keep
        if not keep:
            return "Connection: close\r\n"
        return "Connection: keep-alive\r\n" if request.version == (1, 0) else ""

    def _write_whole(self, exchange: _Exchange, response: Response, body: bytes) -> None:
        status = response.status
        if status < 200 or status in _NO_BODY_STATUSES:
            self._write_no_body(exchange, response)
            return
        framing = f"Content-Length: {len(body)}\r\n" + self._decide_keep_alive(
            exchange, response, True
        )
        head = wire.encode_head(
            status, response.reason, response.headers, wire.DROP_FOR_LENGTH, framing
        )
        self._head_written = True
        # One write: head and body leave in one segment.
        self._write(head if exchange.request.method == "HEAD" else head + body)

    def _write_no_body(self, exchange: _Exchange, response: Response) -> None:
        status = response.status
        # RFC 9110 8.6: no Content-Length on 1xx and 204; a 304 keeps the GET's.
        drop = wire.DROP_FOR_STREAM if status == 304 else wire.DROP_FOR_LENGTH
        framing = self._decide_keep_alive(exchange, response, True)
        self._head_written = True
        self._write(wire.encode_head(status, response.reason, response.headers, drop, framing))

    async def _write_other(self, exchange: _Exchange, response: Response) -> None:
        status = response.status
        body = response.body
        if status == 101:
            if response.upgrade is None or exchange.request.method == "HEAD":
                raise RuntimeError("a 101 answer without an upgrade")
            await self._upgrade(exchange, response, response.upgrade)
            return
        if isinstance(body, bytes):
            self._write_whole(exchange, response, body)
            return
        try:
            if exchange.request.method == "HEAD" or status < 200 or status in _NO_BODY_STATUSES:
                if exchange.request.method == "HEAD" and status not in _NO_BODY_STATUSES:
                    framing = self._decide_keep_alive(exchange, response, True)
                    head = wire.encode_head(
                        status, response.reason, response.headers, wire.DROP_FOR_STREAM, framing
                    )
                    self._head_written = True
                    self._write(head)
                else:
                    self._write_no_body(exchange, response)
                return
            await self._stream(exchange, response, body)
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _stream(
        self, exchange: _Exchange, response: Response, body: AsyncIterator[bytes]
    ) -> None:
        length_field = response.headers.get("content-length")
        length = int(length_field) if length_field is not None else None
        chunked = length is None and exchange.request.version >= (1, 1)
        framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
        framing += self._decide_keep_alive(exchange, response, length is not None or chunked)
        head = wire.encode_head(
            response.status, response.reason, response.headers, wire.DROP_FOR_STREAM, framing
        )
        self._head_written = True
        self._write(head)
        sent = 0
        try:
            async for chunk in body:
                if self._closed:
                    return  # the client left: the caller closes the stream
                if not chunk:
                    continue
                sent += len(chunk)
                if length is not None and sent > length:
                    raise ValueError(f"the stream outran its Content-Length {length}")
                self._write(wire.frame_chunk(chunk) if chunked else chunk)
                if self._writing_paused:
                    await self._drain()
        except Exception as exc:
            # Usually the upstream cut its answer: the client must see a cut too.
            log.debug("the answer stream failed, cutting the connection", exc_info=exc)
            self.abort()
            return
        if self._closed:
            return
        if chunked:
            self._write(wire.LAST_CHUNK)
        elif length is not None and sent != length:
            log.debug("the answer stream ended %d bytes short", length - sent)
            self.abort()

    async def _drain(self) -> None:
        while self._writing_paused and not self._closed:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    # -- upgrades

    async def _upgrade(
        self,
        exchange: _Exchange,
        response: Response,
        session: Callable[[Upgraded], Awaitable[None]],
    ) -> None:
        if self._upgrade_data is None:
            raise RuntimeError("a 101 answer to a request that asked for no upgrade")
        head = wire.encode_head(101, response.reason, response.headers, wire.DROP_FOR_UPGRADE, "")
        self._head_written = True
        self._keep_alive = False
        self._upgraded = True
        self._write(head)
        self._update_reading()
        transport = self._transport
        upgraded = Upgraded(self._receive_upgraded, self._write, self._drain, transport.close)
        try:
            await session(upgraded)
        finally:
            transport.close()

    async def _receive_upgraded(self) -> bytes:
        data = self._upgrade_data
        assert data is not None
        while not data:
            if self._closed:
                return b""
            self._upgrade_waiter = self._loop.create_future()
            try:
                await self._upgrade_waiter
            finally:
                self._upgrade_waiter = None
        chunk = bytes(data)
        data.clear()
        self._update_reading()
        return chunk

    def _wake_upgrade(self) -> None:
        waiter = self._upgrade_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- flow control and timing

    def _update_reading(self) -> None:
        """Pause reading while a whole request or a full buffer waits, resume after."""
        if self._closed or self._pending_error is not None:
            return
        if self._upgrade_data is not None:
            # Before the 101 is out the handler may still answer otherwise.
            pause = len(self._upgrade_data) > BUFFER_HIGH_BYTES or not self._upgraded
        else:
            parsing = self._parsing
            queue = self._queue
            pause = (len(queue) > 1 and queue[-1].complete) or (
                parsing is not None and parsing.buffered > BUFFER_HIGH_BYTES
            )
        if pause != self._reading_paused:
            transport = self._transport
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _set_deadline(self, waiting_for: int, delay_s: float) -> None:
        self._waiting_for = waiting_for
        self._deadline = self._loop.time() + delay_s
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        # Never further ahead than the shortest limit, so a deadline set later
        # is never earlier than the timer: no timer is cancelled per request.
        when = min(self._deadline, self._loop.time() + self._check_every_s)
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        waiting_for = self._waiting_for
        if self._closed or waiting_for not in (_HEAD, _BODY, _IDLE):
            return
        if self._loop.time() < self._deadline:
            self._arm()
            return
        transport = self._transport
        if waiting_for == _BODY:
            self._waiting_for = _BODY_EXPIRED
            self._closing = True
            if self._reader is not None and not self._reader.done():
                self._reader.set_result(None)
            return
        self._waiting_for = _NOTHING
        self._ignore_input = True
        if waiting_for == _HEAD and not self._busy:
            _bad_requests.note(408, self._peer, "the request head came too slowly")
            self._write(_HEAD_TIMEOUT)
        transport.close()
