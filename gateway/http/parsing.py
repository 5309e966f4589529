"""Requests out of the bytes a client sends: llhttp's callbacks turned into exchanges.

An exchange is one request and its body as it arrives; the connection queues
them and hands each to the handler in turn. The head's size is counted here,
since llhttp itself sets no limit.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.http.message import Connection, Request

# A read longer than this is parsed in pieces of it outside bodies, and parsing
# stops while more requests than MAX_QUEUED wait (see RequestParser.feed).
FEED_SLICE_BYTES = 4096
MAX_QUEUED = 16

_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_METHODS: dict[bytes, str] = {}


class HeadTooLarge(Exception):
    """The request line and headers outgrew the listener's limit."""


class Exchange:
    """A parsed request and its body as it arrives."""

    __slots__ = ("request", "chunks", "buffered", "complete", "keep_alive", "expect_continue")

    def __init__(self, request: Request, keep_alive: bool, expect_continue: bool) -> None:
        self.request = request
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes in chunks
        self.complete = False  # the whole body has arrived
        self.keep_alive = keep_alive  # what the client asked for
        self.expect_continue = expect_continue  # 100 Continue is due on the first read


class Fed(NamedTuple):
    """What a read left over: bytes to parse once fewer requests wait (b"" if none),
    the first bytes of an upgraded stream (None unless an Upgrade request came)."""

    rest: bytes
    upgraded: bytes | None


ALL_PARSED = Fed(b"", None)


class Owner(Connection, Protocol):
    """What the parser tells the connection it parses for."""

    @property
    def requests_parsed(self) -> int: ...

    def head_started(self) -> None: ...

    def request_parsed(self, exchange: Exchange) -> None: ...

    def body_arrived(self) -> None: ...


class RequestParser:
    """Feeds llhttp and builds an exchange per request (`Request.connection` is `owner`)."""

    def __init__(self, owner: Owner, peer: str, scheme: str, max_head_bytes: int) -> None:
        self._owner = owner
        self._peer = peer
        self._scheme = scheme
        self._max_head_bytes = max_head_bytes
        self._parser = httptools.HttpRequestParser(self)
        self.in_head = False  # a request head has begun and not ended
        self.parsing: Exchange | None = None  # the exchange whose body comes next
        self._url = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0  # what the callbacks have seen of the head in progress
        self._head_spill = 0  # bytes of later reads while a head is in progress
        self._framing_given = False  # a header that may frame a body was seen
        self._connection_given = False  # a Connection header was seen

    def feed(self, data: bytes) -> Fed:
        """Parse `data`, all of it or up to where requests pile up (see `Fed`).

        A read longer than FEED_SLICE_BYTES is parsed in pieces of it outside
        bodies, and parsing stops while more than MAX_QUEUED requests wait:
        tiny pipelined requests are cheap to send and dear to hold, so one read
        may not turn into thousands of them.

        Raises httptools.HttpParserError on a malformed request, HeadTooLarge
        (perhaps as the error's context) when the head outgrows its limit.
        """
        if len(data) <= FEED_SLICE_BYTES:
            upgrade_at = self._feed_piece(data)
            return ALL_PARSED if upgrade_at is None else Fed(b"", data[upgrade_at:])
        view = memoryview(data)
        offset, size = 0, len(data)
        while offset < size:
            parsing = self.parsing
            if parsing is not None and not parsing.complete and not self.in_head:
                end = size  # inside a body: no requests pile up
            elif self._owner.requests_parsed > MAX_QUEUED:
                return Fed(bytes(view[offset:]), None)
            else:
                end = offset + FEED_SLICE_BYTES
            piece = view[offset:end]
            upgrade_at = self._feed_piece(piece)
            if upgrade_at is not None:
                return Fed(b"", bytes(piece[upgrade_at:]) + bytes(view[end:]))
            offset = end
        return ALL_PARSED

    def _feed_piece(self, data: bytes | memoryview) -> int | None:
        """Parse `data` whole; the offset where an upgraded stream starts, if one does."""
        in_head = self.in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return cast(int, exc.args[0])
        if in_head and self.in_head:
            # The callbacks count what llhttp has finished; this keeps a field
            # it is still buffering (a long header value) from growing without end.
            self._head_spill += len(data)
            if self._head_spill > self._max_head_bytes:
                raise HeadTooLarge
        return None

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self._url = b""
        self._raw_headers = []
        self._head_bytes = self._head_spill = 0
        self._framing_given = self._connection_given = False
        self._owner.head_started()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head_bytes:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size == 14 or size == 17:  # maybe Content-Length or Transfer-Encoding
            self._framing_given = True
        elif size == 10 and name.lower() == b"connection":  # not User-Agent
            self._connection_given = True
        self._head_bytes += size + len(value) + 4
        if self._head_bytes > self._max_head_bytes:
            raise HeadTooLarge
        # As the upstream client encodes them: bytes that are not UTF-8 pass unchanged.
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self._parser
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = _METHODS.setdefault(raw_method, raw_method.decode("ascii"))
        keep_alive = parser.should_keep_alive()
        if keep_alive and not self._connection_given:
            # Only HTTP/1.1 keeps alive without a Connection header, and asking
            # llhttp for the version formats a string: a fifth of this callback.
            version = (1, 1)
        else:
            given = parser.get_http_version()
            version = _VERSIONS.get(given) or (int(given[0]), int(given[2]))
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
            self._scheme,
            content_length,
            chunked,
            self._owner,
        )
        self.parsing = exchange = Exchange(request, keep_alive, expect)
        self._owner.request_parsed(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None  # llhttp sends a body only after a head
        exchange.chunks.append(body)
        exchange.buffered += len(body)
        self._owner.body_arrived()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.complete = True
        self._owner.body_arrived()
