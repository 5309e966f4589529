"""Answers onto the wire: bytes bodies in one write, streams with backpressure.

`Output` is a connection's write side; the functions frame a `Response` for
the request it answers and say whether the connection may stay open after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from gateway.http import wire
from gateway.http.message import Request, Response

log = logging.getLogger("gateway.http")

NO_BODY_STATUSES = frozenset({204, 304})


class Output:
    """A connection's write side: writes nothing once the client is gone, waits while
    the transport's buffer is over its high-water mark."""

    __slots__ = ("transport", "closed", "_paused", "_waiter")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.closed = False  # the connection is lost
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        """Send `data` unless the connection is lost."""
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has read enough (or left)."""
        while self._paused and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake()

    def lost(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def connection_field(request: Request, keep: bool) -> str:
    """The Connection line an answer needs: close, keep-alive echoed to HTTP/1.0, or none."""
    if not keep:
        return "Connection: close\r\n"
    return "Connection: keep-alive\r\n" if request.version == (1, 0) else ""


def bodiless(request: Request, status: int) -> bool:
    """The answer carries no body: to HEAD, or 1xx, 204 and 304."""
    return status < 200 or status in NO_BODY_STATUSES or request.method == "HEAD"


def write_whole(
    out: Output, request: Request, response: Response, body: bytes, may_keep: bool
) -> bool:
    """`response` with its bytes `body` and Content-Length, head and body in one write;
    returns keep-alive."""
    status = response.status
    if bodiless(request, status):
        return write_head_only(out, request, response, may_keep)
    keep = may_keep and not response.close
    framing = f"Content-Length: {len(body)}\r\n{connection_field(request, keep)}"
    head = wire.encode_head(
        status, response.reason, response.headers, wire.DROP_FOR_LENGTH, framing
    )
    out.write(head + body)  # one write: head and body leave in one segment
    return keep


def write_head_only(out: Output, request: Request, response: Response, may_keep: bool) -> bool:
    """An answer without a body (see `bodiless`); returns keep-alive."""
    status = response.status
    body = response.body
    keep = may_keep and not response.close
    framing = connection_field(request, keep)
    if status < 200 or status == 204:
        drop = wire.DROP_FOR_LENGTH  # RFC 9110 8.6: never a Content-Length
    elif status != 304 and isinstance(body, bytes) and body:
        drop = wire.DROP_FOR_LENGTH  # HEAD: the length GET's body would have
        framing = f"Content-Length: {len(body)}\r\n{framing}"
    else:
        drop = wire.DROP_FOR_STREAM  # the handler's Content-Length, as GET's would be
    out.write(wire.encode_head(status, response.reason, response.headers, drop, framing))
    return keep


def stream_head(
    request: Request, response: Response, may_keep: bool
) -> tuple[bytes, int | None, bool, bool]:
    """A streamed answer's head, its length (None: none given), whether it is chunked
    and whether the connection stays open after it.

    The body goes raw up to the Content-Length given, else chunked to HTTP/1.1
    and up to the close to HTTP/1.0.
    """
    length_field = response.headers.get("content-length")
    length = int(length_field) if length_field is not None else None
    chunked = length is None and request.version >= (1, 1)
    keep = may_keep and not response.close and (length is not None or chunked)
    framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
    framing += connection_field(request, keep)
    head = wire.encode_head(
        response.status, response.reason, response.headers, wire.DROP_FOR_STREAM, framing
    )
    return head, length, chunked, keep


async def send_stream(
    out: Output, body: AsyncIterator[bytes], length: int | None, chunked: bool
) -> bool:
    """The body after its head; False when it did not all go out (the client left, or the
    stream failed or missed its length: then the connection is cut). The caller closes
    the stream."""
    sent = 0
    try:
        async for chunk in body:
            if out.closed:
                return False  # the client left
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise ValueError(f"the stream outran its Content-Length {length}")
            out.write(wire.frame_chunk(chunk) if chunked else chunk)
            await out.drain()
    except Exception as exc:
        # Usually the upstream cut its answer: the client must see a cut too.
        log.debug("the answer stream failed, cutting the connection", exc_info=exc)
        out.transport.abort()
        return False
    if out.closed:
        return False
    if chunked:
        out.write(wire.LAST_CHUNK)
    elif length is not None and sent != length:
        log.debug("the answer stream ended %d bytes short", length - sent)
        out.transport.abort()
        return False
    return True
