"""A lean pooled HTTP/1.1 client for forwarding: keep-alive connections per upstream.

Built for a proxy rather than for applications: it sends the method, target
and headers exactly as given (no defaults of its own, no cookies, no
redirects, no decompression), frames the body (Content-Length when known,
else chunked) and hands back the answer as it arrives. Connections are
`upstream_conn.Connection`s; this module pools them, bounds them and retries
once where that is safe.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable

from multidict import CIMultiDict

from gateway.pipeline.upstream_conn import Connection, UpstreamError
from gateway.pipeline.upstream_share import Shares

Body = AsyncIterable[bytes] | bytes | None

# A retry is safe only for methods the upstream may see twice (RFC 9110
# 9.2.2) and only when the body can be sent again, i.e. is in memory.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# An idle connection older than this is closed rather than reused: servers
# drop idle connections after a few seconds, and a request sent just as they
# do fails (and only the idempotent ones are retried). aiohttp's default.
_IDLE_KEEP_S = 15.0
# What no field may carry: a CR or LF would end the header early (smuggling). Checked on
# the whole head at once: control characters other than CR and LF (TAB is allowed in a
# value), then that CR and LF occur only as the head's own line ends.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def request_head(
    method: str, target: str, headers: CIMultiDict[str], body: Body, host: str
) -> tuple[bytes, bool]:
    """The request line and header block for `body`, and whether the body goes chunked.

    Headers go out as given, in order; the client adds only the framing the
    body needs and `Host` (RFC 9112 3.2) when the caller gave none.
    """
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    lines = len(headers) + 2  # the request line, the headers, the empty line
    if "Host" not in headers:
        parts.append(f"Host: {host}\r\n")
        lines += 1
    chunked = False
    if isinstance(body, bytes):
        if "Content-Length" not in headers:
            parts.append(f"Content-Length: {len(body)}\r\n")
            lines += 1
    elif body is not None and "Content-Length" not in headers:
        parts.append("Transfer-Encoding: chunked\r\n")
        lines += 1
        chunked = True
    parts.append("\r\n")
    text = "".join(parts)
    if _CONTROL.search(text) or text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("forbidden control character in the request line or headers")
    return text.encode("utf-8", "surrogateescape"), chunked


async def _send_stream(
    conn: Connection, body: AsyncIterable[bytes], chunked: bool, deadline: float | None
) -> None:
    """Stream `body` after the head; a failure aborts the connection.

    The connection is cut before the final chunk (or short of the length), so
    the upstream sees an aborted request, never a short body that looks whole.
    """
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                conn.write(b"%x\r\n" % len(chunk), chunk, b"\r\n")
            else:
                conn.write(chunk)
            await conn.drain(deadline)
        if chunked:
            conn.write(b"0\r\n\r\n")
        conn.sent()
    except UpstreamError as exc:
        conn.fail(exc)
    except asyncio.CancelledError:
        conn.abort()
        raise
    except Exception as exc:  # the client's body failed, or passed its limit
        conn.fail(UpstreamError("reset", f"request body: {exc!r}"))


class UpstreamResponse:
    """An upstream's answer: status and headers at once, the body as it arrives."""

    __slots__ = (
        "status", "reason", "version", "headers", "content_length",
        "_client", "_conn", "_writer", "_deadline", "_released", "_holder",
    )  # fmt: skip

    def __init__(
        self,
        client: UpstreamClient,
        conn: Connection,
        writer: asyncio.Task[None] | None,
        deadline: float | None,
        holder: str | None,
    ) -> None:
        self.status, self.reason, self.version = conn.status, conn.reason, conn.version
        self.headers = conn.headers  # in order, duplicates kept
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._client, self._conn, self._writer = client, conn, writer
        self._deadline = deadline
        self._released = False
        self._holder = holder

    async def read_chunk(self) -> bytes:
        """The next part of the body; b"" at its end. Raises UpstreamError."""
        return await self._conn.read_chunk(self._deadline)

    async def read(self) -> bytes:
        """The whole body. Raises UpstreamError."""
        parts = []
        while chunk := await self._conn.read_chunk(self._deadline):
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back: to the pool if the answer was read to its end."""
        if not self._released:
            self._released = True
            self._client.release(self._conn, self._writer)
            self._client.leave(self._holder)


class UpstreamClient:
    """Keep-alive connections to one upstream origin, at most `max_connections` open."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        max_connections: int,
        max_per_client: int | None = None,
        connect_timeout_s: float,
        timeout_s: float,
        total_timeout_s: float | None,
        host_header: str,
    ) -> None:
        self._host, self._port, self._ssl = host, port, ssl_context
        self._max = max_connections
        self._shares = Shares(max_per_client or max_connections)
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._total_timeout_s = total_timeout_s
        self._host_header = host_header
        self._idle: list[Connection] = []  # most recently used last
        self._open: set[Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body = None,
        client: str | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for its answer's head; the caller must `release()` it.

        Raises UpstreamError (connect, timeout, reset), and OverShare when
        `client` (the requester's address) had its share of exchanges under way
        for the whole connect timeout (see `upstream_share`). A reused
        connection found closed before any byte of the answer is retried once
        on a new one when the method is idempotent and the body is not a stream.
        """
        if client is not None:
            await self._shares.enter(client, self._connect_timeout_s)
        try:
            return await self._request(method, target, headers, body, client)
        except BaseException:
            self.leave(client)
            raise

    def leave(self, client: str | None) -> None:
        """One exchange of `client` is over."""
        if client is not None:
            self._shares.leave(client)

    async def _request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body,
        client: str | None,
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        total = self._total_timeout_s
        deadline = None if total is None else loop.time() + total
        head, chunked = request_head(method, target, headers, body, self._host_header)
        data = body if isinstance(body, bytes) else None
        stream = None if body is None or isinstance(body, bytes) else body
        may_retry = stream is None and method in _IDEMPOTENT
        fresh = False
        while True:
            conn = await self._acquire(fresh, deadline)
            writer: asyncio.Task[None] | None = None
            try:
                conn.begin(head_only=method == "HEAD")
                if stream is not None:
                    conn.write(head)
                    writer = loop.create_task(_send_stream(conn, stream, chunked, deadline))
                else:
                    conn.write(head, data) if data else conn.write(head)
                    conn.sent()
                await conn.read_head(deadline)
            except UpstreamError as exc:
                self.release(conn, writer)
                if may_retry and conn.reused and not conn.received_any and exc.kind == "reset":
                    may_retry, fresh = False, True  # the upstream had closed it while idle
                    continue
                raise
            except BaseException:
                self.release(conn, writer)
                raise
            return UpstreamResponse(self, conn, writer, deadline, client)

    def release(self, conn: Connection, writer: asyncio.Task[None] | None = None) -> None:
        """Pool `conn` if its exchange ended cleanly, otherwise close it."""
        if writer is not None and not writer.done():
            writer.cancel()
        if not (conn.drained and conn.keep_alive and conn.request_sent) or conn.lost:
            self._discard(conn)
            return
        if self._closed:
            self._discard(conn)
            return
        conn.idle_since = asyncio.get_running_loop().time()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    async def close(self) -> None:
        """Close every connection, busy ones too, and refuse new requests."""
        self._closed = True
        conns = list(self._open)
        self._open.clear()
        self._idle.clear()
        for conn in conns:
            conn.abort()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("connect", "the client is closed"))
        await asyncio.gather(*(conn.wait_lost() for conn in conns))

    async def _acquire(self, fresh: bool, deadline: float | None) -> Connection:
        if self._closed:
            raise UpstreamError("connect", "the client is closed")
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.lost and now - conn.idle_since < _IDLE_KEEP_S:
                conn.reused = True
                return conn
            self._discard(conn)
        # Waiting for a free connection counts against the connect timeout, as in aiohttp.
        timeout = self._connect_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - now)
        try:
            async with asyncio.timeout(timeout):
                return await self._open_or_wait(loop)
        except TimeoutError:
            raise UpstreamError("timeout", "no connection within the connect timeout") from None

    async def _open_or_wait(self, loop: asyncio.AbstractEventLoop) -> Connection:
        while len(self._open) + self._opening >= self._max:
            waiter: asyncio.Future[Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed something just as we gave up: pass it on.
                    late = waiter.result()
                    self.release(late) if late is not None else self._wake_one()
                raise
            if handed is not None:
                handed.reused = True
                return handed
        self._opening += 1
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(self._timeout_s, self._lost),
                self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )  # fmt: skip
        except OSError as exc:  # refused, unreachable, DNS, TLS verification
            self._wake_one()
            raise UpstreamError("connect", f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._wake_one()
            raise
        finally:
            self._opening -= 1
        if self._closed:
            conn.abort()
            raise UpstreamError("connect", "the client is closed")
        self._open.add(conn)
        return conn

    def _discard(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.remove(conn)
            self._wake_one()
        if conn.drained and not conn.lost:
            conn.close()  # e.g. after `Connection: close`: nothing is left to cut short
        else:
            conn.abort()

    def _lost(self, conn: Connection) -> None:
        # Called by the connection when the upstream (or we) closed it.
        if conn in self._open:
            self._open.remove(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        """A slot is free: the longest waiter opens a connection of its own."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
