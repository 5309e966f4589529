"""The public listener's request and response, as the pipeline sees them.

The listener (`gateway.http.server`) parses HTTP/1.1 itself (llhttp through
httptools): a request is a few fields and a body read on demand, an answer is
a status, headers and either bytes or a stream. Nothing here knows routes,
tenants or quotas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy


class ClientDisconnected(ConnectionError):
    """The client closed its connection before its request body was read."""


class Connection(Protocol):
    """The client connection a request arrived on (implemented by the server)."""

    async def read_body_chunk(self) -> bytes:
        """The next piece of the request body, b"" at its end (see `Request.read_chunk`)."""
        ...

    async def send(self, request: Request, response: Response) -> None:
        """Write `response` to the client (see `Request.respond`)."""
        ...

    def abort(self) -> None:
        """Close the connection now, whatever is buffered: the client sees a cut answer."""
        ...


# A WebSocket (or other protocol) session after `101 Switching Protocols`:
# it gets the bytes the client sent after its request and a way to write.
@dataclass(slots=True)
class Upgraded:
    """The client connection handed over after a 101 answer."""

    receive: Callable[[], Awaitable[bytes]]  # b"" when the client closed
    write: Callable[[bytes], None]
    drain: Callable[[], Awaitable[None]]  # waits while the client reads too slowly
    close: Callable[[], None]


@dataclass(slots=True, eq=False)
class Request:
    """One request on the public listener, its head parsed, its body not yet read."""

    method: str
    target: str  # the path and query exactly as the client sent them
    version: tuple[int, int]
    headers: CIMultiDictProxy[str]
    peer: str  # the client's address ("" when unknown)
    scheme: str  # "http" or "https"
    content_length: int | None
    chunked: bool
    connection: Connection
    responded: bool = False
    body_bytes_read: int = 0  # by the handler, so far (the access log's bytes in)

    @property
    def body_exists(self) -> bool:
        """A body follows the head (it may still be empty when chunked)."""
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        """The target without its query (still percent-encoded)."""
        return self.target.partition("?")[0]

    async def read_chunk(self) -> bytes:
        """The next piece of the body, b"" at its end.

        The first call sends `100 Continue` when the client asked for it: a
        request refused before its body is read never has it sent. Raises
        ClientDisconnected when the client leaves mid-body, and
        BodyTimeout when it sends nothing for the listener's body idle timeout.
        """
        chunk = await self.connection.read_body_chunk()
        self.body_bytes_read += len(chunk)
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        while chunk := await self.read_chunk():
            yield chunk

    async def respond(self, response: Response) -> None:
        """Write the whole answer now (streamed bodies included); at most once."""
        self.responded = True
        await self.connection.send(self, response)

    def abort(self) -> None:
        """Cut the client connection (an answer that cannot be finished honestly)."""
        self.connection.abort()


class BodyTimeout(ClientDisconnected):
    """The client stopped sending its body for longer than the idle timeout."""


Body = bytes | AsyncIterator[bytes]


@dataclass(slots=True, eq=False)
class Response:
    """An answer: `body` bytes are sent with a Content-Length; a stream is sent
    with the Content-Length in `headers` when it has one, chunked otherwise
    (close-delimited to an HTTP/1.0 client). A stream that raises cuts the
    connection. `close` ends the connection after this answer. `upgrade`,
    with status 101, takes the connection over once the head is written."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: Body = b""
    reason: str = ""
    close: bool = False
    upgrade: Callable[[Upgraded], Awaitable[None]] | None = None


Handler = Callable[[Request], Awaitable[Response]]
