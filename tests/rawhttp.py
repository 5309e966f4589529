"""A raw TCP upstream on port 0 for HTTP edge cases a framework would not produce."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body (Content-Length or chunked), None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    fields = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    if b"content-length" in fields:
        return head, await reader.readexactly(int(fields[b"content-length"]))
    body = b""
    if fields.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    return head, body


@dataclass
class Answer:
    """A response as read off the wire (`headers` keep the case and order sent)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The last value of header `name` (case-insensitive), None when absent."""
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        return found[-1] if found else None


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer:
    """One response: its head, then a body framed by Content-Length, chunked, or EOF."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    _, status, reason = lines[0].split(" ", 2)
    headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:] if line)]
    got = Answer(int(status), reason, headers, b"")
    if head_only or got.status < 200 or got.status in (204, 304):
        return got
    if (length := got.header("content-length")) is not None:
        got.body = await reader.readexactly(int(length))
    elif got.header("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            got.body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    else:
        got.body = await reader.read()
    return got


def answer(body: bytes = b"ok", status: str = "200 OK", headers: str = "") -> bytes:
    """A whole HTTP/1.1 response with a Content-Length."""
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


@dataclass
class RawServer:
    """Serves each connection with `handler(server, reader, writer, n)` (n counts from 0)."""

    handler: Handler
    port: int = 0
    connections: int = 0
    active: int = 0
    peak: int = 0
    requests: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def next_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """Read a request, note its head; None when the client closed."""
        got = await read_request(reader)
        if got is None:
            return None
        self.requests.append(got[0])
        return got[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        n, self.connections = self.connections, self.connections + 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.handler(self, reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            writer.close()
            self._tasks.discard(task)
            self._writers.discard(writer)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        # Cut the connections rather than cancel the handlers: asyncio logs a
        # cancelled connection handler as an error.
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
