"""The public listener's HTTP/1.1 server against raw sockets and aiohttp's client.

Every test runs a real `HttpServer` on port 0; limits are small where a test
waits for a timeout, so the file stays fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.http.message import (
    BodyTimeout,
    ClientDisconnected,
    Handler,
    Request,
    Response,
    Upgraded,
)
from gateway.http.server import HttpServer, Limits
from tests.certs import make_certs
from tests.rawhttp import Answer, read_answer

Serve = Callable[..., Awaitable[tuple[HttpServer, int]]]
Connect = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

GET = b"GET /x?y=1 HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start servers with `serve(handler, **limits)`; all are stopped afterwards."""
    started: list[HttpServer] = []

    async def start(handler: Handler, **limits: Any) -> tuple[HttpServer, int]:
        server = HttpServer(handler, scheme="http", limits=Limits(**limits))
        started.append(server)
        return server, await server.start("127.0.0.1", 0)

    yield start
    for server in started:
        await server.stop(1.0)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Raw client connections, all closed afterwards."""
    writers: list[asyncio.StreamWriter] = []

    async def open_one(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield open_one
    for writer in writers:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def hello(request: Request) -> Response:
    return Response(200, CIMultiDict({"Content-Type": "text/plain"}), b"hello")


async def echo(request: Request) -> Response:
    body = b"".join([chunk async for chunk in request.chunks()])
    return Response(200, body=f"{request.method} {request.target} ".encode() + body)


async def slow_echo(request: Request) -> Response:
    """`echo`, after the request has had time to be followed by the next bytes."""
    await asyncio.sleep(0.02)
    return await echo(request)


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (EOF or reset) without sending more."""
    try:
        return await asyncio.wait_for(reader.read(), 2.0) == b""
    except ConnectionResetError:
        return True


async def test_keep_alive_serves_requests_on_one_connection(serve: Serve, connect: Connect) -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return await hello(request)

    _, port = await serve(handler)
    reader, writer = await connect(port)
    for _ in range(3):
        writer.write(GET)
        got = await read_answer(reader)
        assert (got.status, got.reason, got.body) == (200, "OK", b"hello")
        assert got.header("content-length") == "5"
        assert (got.header("date") or "").endswith(" GMT")
        assert got.header("server") is None and got.header("connection") is None
    first = seen[0]
    assert (first.method, first.target, first.path) == ("GET", "/x?y=1", "/x")
    assert first.version == (1, 1)
    assert (first.peer, first.scheme, first.content_length, first.chunked) == (
        "127.0.0.1", "http", None, False
    )  # fmt: skip
    assert first.headers["HOST"] == "test"


async def test_aiohttp_client_reuses_the_connection(serve: Serve) -> None:
    _, port = await serve(echo)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for n in range(3):
            async with session.post(f"http://127.0.0.1:{port}/p", data=b"x" * n) as resp:
                assert await resp.read() == b"POST /p " + b"x" * n
    assert connector._conns == {}  # closed with the session, but only one was made


async def test_pipelined_requests_are_answered_in_order(serve: Serve, connect: Connect) -> None:
    running = 0

    async def handler(request: Request) -> Response:
        nonlocal running
        running += 1
        assert running == 1  # one at a time
        await asyncio.sleep(0.05 if request.path == "/1" else 0)
        running -= 1
        return await echo(request)

    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    bodies = [(await read_answer(reader)).body for _ in range(3)]
    assert bodies == [b"GET /1 ", b"POST /2 abc", b"GET /3 "]


async def test_http10_closes_unless_keep_alive(serve: Serve, connect: Connect) -> None:
    _, port = await serve(hello)
    reader, writer = await connect(port)
    writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
    for _ in range(2):
        got = await read_answer(reader)
        assert (got.body, got.header("connection")) == (b"hello", "keep-alive")
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    got = await read_answer(reader)
    assert (got.body, got.header("connection")) == (b"hello", "close")
    assert await closed(reader)


async def test_connection_close_is_honoured(serve: Serve, connect: Connect) -> None:
    async def closing(request: Request) -> Response:
        return Response(200, body=b"bye", close=request.path == "/bye")

    _, port = await serve(closing)
    reader, writer = await connect(port)
    writer.write(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert (await read_answer(reader)).header("connection") == "close"
    assert await closed(reader)
    reader, writer = await connect(port)
    writer.write(b"GET /bye HTTP/1.1\r\n\r\n")
    assert (await read_answer(reader)).header("connection") == "close"
    assert await closed(reader)


async def test_chunked_request_body_is_read_as_it_comes(serve: Serve, connect: Connect) -> None:
    pieces: list[bytes] = []

    async def handler(request: Request) -> Response:
        if request.method == "GET":
            return await hello(request)
        assert request.chunked and request.content_length is None
        pieces.extend([chunk async for chunk in request.chunks()])
        return Response(200, body=b"".join(pieces))

    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await asyncio.sleep(0.02)
    writer.write(b"2\r\nde\r\n0\r\n\r\n")
    assert (await read_answer(reader)).body == b"abcde"
    assert len(pieces) == 2
    writer.write(GET)  # the connection is still usable
    assert (await read_answer(reader)).status == 200


async def test_request_body_reading_pauses_while_the_handler_waits(
    serve: Serve, connect: Connect
) -> None:
    size = 8 * 1024 * 1024
    go = asyncio.Event()

    async def handler(request: Request) -> Response:
        await go.wait()
        return Response(200, body=str(sum([len(c) async for c in request.chunks()])).encode())

    server, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
    await asyncio.sleep(0.2)
    # One read past the high-water mark at most: the rest waits in the kernel.
    assert 0 < server.body_bytes_buffered <= 512 * 1024
    go.set()
    await writer.drain()
    assert (await read_answer(reader)).body == str(size).encode()


async def test_100_continue_is_sent_on_the_first_read_only(serve: Serve, connect: Connect) -> None:
    _, port = await serve(echo)
    reader, writer = await connect(port)
    writer.write(b"PUT /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    interim = await read_answer(reader)
    assert (interim.status, interim.reason) == (100, "Continue")
    writer.write(b"da")
    await asyncio.sleep(0.02)
    writer.write(b"ta")
    final = await read_answer(reader)
    assert (final.status, final.body) == (200, b"PUT /c data")


async def test_100_continue_is_not_sent_when_the_handler_answers_first(
    serve: Serve, connect: Connect
) -> None:
    async def refuse(request: Request) -> Response:
        return Response(401, body=b"no")

    _, port = await serve(refuse)
    reader, writer = await connect(port)
    writer.write(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    got = await read_answer(reader)
    assert (got.status, got.header("connection")) == (401, "close")  # the body never came
    assert await closed(reader)


async def test_an_unread_body_closes_the_connection_unless_it_all_came(
    serve: Serve, connect: Connect
) -> None:
    _, port = await serve(hello)
    reader, writer = await connect(port)
    writer.write(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
    got = await read_answer(reader)
    assert (got.body, got.header("connection")) == (b"hello", "close")
    assert await closed(reader)
    reader, writer = await connect(port)
    writer.write(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n12345" + GET)
    for _ in range(2):
        got = await read_answer(reader)
        assert (got.body, got.header("connection")) == (b"hello", None)


async def test_head_and_bodiless_statuses_carry_no_body(serve: Serve, connect: Connect) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/204":
            return Response(204, CIMultiDict({"Content-Length": "9"}), b"dropped")
        if request.path == "/304":
            return Response(304, CIMultiDict({"Content-Length": "9", "ETag": '"e"'}))
        if request.path == "/proxied":  # a HEAD answered upstream: its length, no body
            return Response(200, CIMultiDict({"Content-Length": "1234"}))
        if request.path == "/stream":
            return await streaming([b"never"], {"Content-Length": "5"})(request)
        return Response(200, body=b"hello")

    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(b"HEAD / HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET /304 HTTP/1.1\r\n\r\n" + GET)
    head = await read_answer(reader, head_only=True)
    assert (head.status, head.header("content-length")) == (200, "5")
    no_content = await read_answer(reader)
    assert (no_content.status, no_content.header("content-length")) == (204, None)
    not_modified = await read_answer(reader)
    assert (not_modified.status, not_modified.header("content-length")) == (304, "9")
    assert not_modified.header("etag") == '"e"'
    assert (await read_answer(reader)).body == b"hello"  # nothing stray came before it
    for path, length in (b"/proxied", "1234"), (b"/stream", "5"):
        writer.write(b"HEAD %b HTTP/1.1\r\n\r\n" % path)
        head = await read_answer(reader, head_only=True)
        assert (head.status, head.header("content-length")) == (200, length)


def streaming(parts: list[bytes], headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for part in parts:
                await asyncio.sleep(0)
                yield part

        return Response(200, CIMultiDict(headers or {}), body())

    return handler


async def test_a_stream_without_length_is_chunked(serve: Serve, connect: Connect) -> None:
    handler = streaming([b"ab", b"", b"cd"], {"Transfer-Encoding": "gzip"})
    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(GET * 2)
    for _ in range(2):
        got = await read_answer(reader)
        assert (got.body, got.header("transfer-encoding")) == (b"abcd", "chunked")
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    got = await read_answer(reader)
    assert (got.body, got.header("connection"), got.header("transfer-encoding")) == (
        b"abcd", "close", None
    )  # fmt: skip


async def test_a_stream_with_length_is_sent_raw(serve: Serve) -> None:
    _, port = await serve(streaming([b"ab", b"cd"], {"Content-Length": "4"}))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.headers.get("Transfer-Encoding") is None
                assert await resp.read() == b"abcd"


@pytest.mark.parametrize("parts", [[b"ab"], [b"abcdef"]], ids=["short", "long"])
async def test_a_stream_that_misses_its_length_is_cut(
    serve: Serve, connect: Connect, parts: list[bytes]
) -> None:
    _, port = await serve(streaming(parts, {"Content-Length": "4"}))
    reader, writer = await connect(port)
    writer.write(GET)
    with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
        await read_answer(reader)


async def test_a_stream_that_raises_cuts_the_connection(
    serve: Serve, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"part"
            raise RuntimeError("upstream went away")

        return Response(200, body=body())

    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(GET)
    with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
        await read_answer(reader)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _leave_mid_stream(
    serve: Serve,
    connect: Connect,
    body: Callable[[asyncio.Event], AsyncIterator[bytes]],
    seen: bytes,
) -> None:
    """The client reads up to `seen`, then cuts its connection: the stream's
    cleanup runs at once and the request is no longer in flight."""
    closed_stream = asyncio.Event()

    async def handler(request: Request) -> Response:
        return Response(200, body=body(closed_stream))

    server, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(GET)
    await reader.readuntil(seen)
    writer.transport.abort()
    await asyncio.wait_for(closed_stream.wait(), 2.0)
    await asyncio.sleep(0.01)
    assert server.requests_in_flight == 0


async def test_a_client_leaving_mid_stream_closes_the_stream(
    serve: Serve, connect: Connect
) -> None:
    async def body(closed: asyncio.Event) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    await _leave_mid_stream(serve, connect, body, b"\r\n\r\n")


async def test_a_client_leaving_while_the_stream_waits_closes_the_stream(
    serve: Serve, connect: Connect
) -> None:
    async def body(closed: asyncio.Event) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.Event().wait()  # an upstream that went quiet
            yield b"never"
        finally:
            closed.set()

    await _leave_mid_stream(serve, connect, body, b"first\r\n")


async def test_a_stream_waits_for_a_slow_client(serve: Serve, connect: Connect) -> None:
    total = 64 * 1024 * 1024
    sent = 0

    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            while sent < total:
                sent += 65536
                yield b"x" * 65536

        return Response(200, CIMultiDict({"Content-Length": str(total)}), body())

    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(GET)
    await asyncio.sleep(0.2)
    assert sent < total // 2  # the kernel's buffers hold a few MiB, not 64
    assert len((await read_answer(reader)).body) == total


@pytest.mark.parametrize(
    "raw",
    [
        b"GE(T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["method", "header", "two-lengths", "chunk-size", "length-and-chunked"],
)
async def test_a_malformed_request_gets_400(
    serve: Serve, connect: Connect, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    caplog.set_level(logging.INFO, "gateway.http")
    _, port = await serve(echo)  # reads the body: a broken chunk is its ClientDisconnected
    reader, writer = await connect(port)
    writer.write(raw)
    got = await read_answer(reader)
    assert (got.status, got.header("content-type")) == (400, "application/problem+json")
    assert got.header("connection") == "close"
    problem = json.loads(got.body)
    assert problem["type"] == "urn:quota-gateway:problem:bad-request"
    assert (problem["title"], problem["status"]) == ("Bad Request", 400)
    assert problem["detail"]
    assert await closed(reader)
    assert all(r.exc_info is None and r.levelno <= logging.INFO for r in caplog.records)


async def test_a_pipelined_malformed_request_is_answered_after_the_good_one(
    serve: Serve, connect: Connect
) -> None:
    _, port = await serve(slow_echo)
    reader, writer = await connect(port)
    writer.write(GET + b"GE(T / HTTP/1.1\r\n\r\n")
    assert (await read_answer(reader)).body == b"GET /x?y=1 "
    assert (await read_answer(reader)).status == 400
    assert await closed(reader)


async def test_a_head_over_the_limit_gets_431(serve: Serve, connect: Connect) -> None:
    _, port = await serve(hello, max_head_bytes=1024, header_timeout_s=2)
    for split in (False, True):
        reader, writer = await connect(port)
        header = b"X-Big: " + b"v" * 2000 + b"\r\n"
        if split:  # llhttp buffers an unfinished value: it must not grow without end
            writer.write(b"GET / HTTP/1.1\r\n")
            for start in range(0, 1600, 400):
                await asyncio.sleep(0.01)
                writer.write(header[start : start + 400])
        else:
            writer.write(b"GET / HTTP/1.1\r\n" + header + b"\r\n")
        got = await read_answer(reader)
        assert got.status == 431
        assert json.loads(got.body)["type"].endswith(":request-header-fields-too-large")
        assert await closed(reader)
    reader, writer = await connect(port)
    writer.write(b"GET / HTTP/1.1\r\nX-Fits: " + b"v" * 900 + b"\r\n\r\n")
    assert (await read_answer(reader)).status == 200


async def test_an_idle_connection_is_closed(serve: Serve, connect: Connect) -> None:
    server, port = await serve(hello, keepalive_idle_s=0.15)
    reader, writer = await connect(port)
    writer.write(GET)
    assert (await read_answer(reader)).status == 200
    assert await closed(reader)
    await asyncio.sleep(0.01)
    assert server.open_connections == 0


def echo_noting_disconnects(raised: list[BaseException], noted: asyncio.Event) -> Handler:
    """`echo`, noting the ClientDisconnected its body read raised."""

    async def handler(request: Request) -> Response:
        try:
            return await echo(request)
        except ClientDisconnected as exc:
            raised.append(exc)
            noted.set()
            raise

    return handler


@pytest.mark.parametrize(
    ("sent", "limit", "raised_in_handler"),
    [
        (b"GET / HTTP/1.1\r\nHost:", "header_timeout_s", []),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", "body_idle_timeout_s", [BodyTimeout]),
    ],
    ids=["head", "body"],
)
async def test_a_client_too_slow_gets_408(
    serve: Serve, connect: Connect, sent: bytes, limit: str, raised_in_handler: list[type]
) -> None:
    raised: list[BaseException] = []
    _, port = await serve(echo_noting_disconnects(raised, asyncio.Event()), **{limit: 0.15})
    reader, writer = await connect(port)
    writer.write(sent)
    got = await read_answer(reader)
    assert (got.status, got.header("connection")) == (408, "close")
    assert json.loads(got.body)["type"].endswith(":request-timeout")
    assert await closed(reader)
    assert [type(exc) for exc in raised] == raised_in_handler


async def test_a_client_leaving_mid_body_raises_client_disconnected(
    serve: Serve, connect: Connect
) -> None:
    raised: list[BaseException] = []
    noted = asyncio.Event()
    _, port = await serve(echo_noting_disconnects(raised, noted))
    reader, writer = await connect(port)
    writer.write(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    await asyncio.sleep(0.02)
    writer.transport.abort()
    await asyncio.wait_for(noted.wait(), 2.0)
    assert [type(exc) for exc in raised] == [ClientDisconnected]


async def test_a_half_closed_client_gets_its_answers(serve: Serve, connect: Connect) -> None:
    _, port = await serve(slow_echo)
    reader, writer = await connect(port)
    writer.write(GET + b"POST /p HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
    writer.write_eof()
    assert (await read_answer(reader)).body == b"GET /x?y=1 "
    last = await read_answer(reader)
    assert (last.body, last.header("connection")) == (b"POST /p ok", "close")
    assert await closed(reader)
    # A body that can no longer come ends its request at once.
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
    writer.write_eof()
    assert await closed(reader)


async def echo_session(upgraded: Upgraded) -> None:
    while data := await upgraded.receive():
        upgraded.write(data.upper())
        await upgraded.drain()


async def test_an_upgrade_hands_the_connection_over(serve: Serve, connect: Connect) -> None:
    async def handler(request: Request) -> Response:
        headers = CIMultiDict({"Connection": "Upgrade", "Upgrade": "echo"})
        if request.headers.get("upgrade") != "echo":
            return Response(400, body=b"no")
        return Response(101, headers, upgrade=echo_session)

    server, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly ")
    got = await read_answer(reader)
    assert (got.status, got.header("upgrade"), got.header("content-length")) == (101, "echo", None)
    assert await reader.readexactly(6) == b"EARLY "
    writer.write(b"later")
    assert await reader.readexactly(5) == b"LATER"
    writer.write_eof()
    assert await closed(reader)
    # Answered without the 101, an upgrade request ends its connection.
    reader, writer = await connect(port)
    writer.write(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\n")
    got = await read_answer(reader)
    assert (got.status, got.header("connection")) == (400, "close")
    assert await closed(reader)
    assert server.requests_in_flight == 0


async def test_stop_closes_idle_connections_and_drains_requests(
    serve: Serve, connect: Connect
) -> None:
    release, started = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            started.set()
            await release.wait()
        return await hello(request)

    server, port = await serve(handler)
    idle_reader, idle_writer = await connect(port)
    idle_writer.write(GET)
    await read_answer(idle_reader)
    busy_reader, busy_writer = await connect(port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await started.wait()
    assert server.requests_in_flight == 1
    stopping = asyncio.create_task(server.stop(5.0))
    assert await closed(idle_reader)
    assert not stopping.done()
    release.set()
    got = await read_answer(busy_reader)
    assert (got.body, got.header("connection")) == (b"hello", "close")
    await stopping
    assert (server.open_connections, server.requests_in_flight) == (0, 0)
    with pytest.raises(OSError):
        await connect(port)


async def test_stop_cuts_requests_that_outlast_it(serve: Serve, connect: Connect) -> None:
    cancelled, started = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(GET)
    await started.wait()
    await server.stop(0.1)
    assert cancelled.is_set()
    assert await closed(reader)
    assert (server.open_connections, server.requests_in_flight) == (0, 0)


async def test_a_failing_handler_gets_500_and_is_logged_once(
    serve: Serve, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    async def failing(request: Request) -> Response:
        raise KeyError("boom")

    _, port = await serve(failing)
    reader, writer = await connect(port)
    writer.write(GET)
    got = await read_answer(reader)
    assert (got.status, got.header("content-type")) == (500, "application/problem+json")
    sent_at = parsedate_to_datetime(got.header("date") or "").timestamp()
    assert abs(sent_at - time.time()) < 5  # the Date of now, not of the module's import
    assert json.loads(got.body) == {
        "type": "urn:quota-gateway:problem:internal-error",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "the gateway failed",
    }
    errors = [r for r in caplog.records if r.name == "gateway.http" and r.exc_info]
    assert len(errors) == 1


async def test_connections_over_the_limit_are_closed(serve: Serve, connect: Connect) -> None:
    server, port = await serve(hello, max_connections=1)
    reader, writer = await connect(port)
    writer.write(GET)
    await read_answer(reader)
    extra_reader, extra_writer = await connect(port)
    extra_writer.write(GET)
    assert await closed(extra_reader)
    assert server.open_connections == 1


async def test_many_pipelined_requests_are_all_answered(serve: Serve, connect: Connect) -> None:
    _, port = await serve(echo)
    reader, writer = await connect(port)
    writer.write(b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % n for n in range(500)))
    for n in range(500):
        assert (await read_answer(reader)).body == b"GET /%d " % n


async def test_a_flood_of_tiny_pipelined_requests_is_parsed_as_it_is_answered(
    serve: Serve, connect: Connect
) -> None:
    most = 0

    async def handler(request: Request) -> Response:
        nonlocal most
        most = max(most, server.requests_parsed)
        return await echo(request)

    server, port = await serve(handler)
    reader, writer = await connect(port)
    requests = b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % n for n in range(20_000))
    writer.write(requests[:5])  # a head in two reads, the rest in large ones
    await asyncio.sleep(0.01)
    writer.write(requests[5:])
    for n in range(20_000):
        assert (await read_answer(reader)).body == b"GET /%d " % n
    # Never more than a 4 KiB piece of requests past the 16 queued.
    assert 16 < most <= 16 + 4096 // len(b"GET /0 HTTP/1.1\r\n\r\n")


async def test_status_lines_and_header_order(serve: Serve, connect: Connect) -> None:
    async def handler(request: Request) -> Response:
        headers = CIMultiDict([("X-B", "1"), ("x-a", "2"), ("X-B", "3")])
        if request.path == "/custom":
            return Response(200, headers, b"", reason="Fine")
        if request.path == "/split":
            return Response(200, CIMultiDict({"X-Bad": "a\r\nSet-Cookie: x"}), b"")
        if request.path == "/split-reason":
            return Response(200, body=b"", reason="OK\r\nSet-Cookie: x")
        return Response(299, headers, b"")

    _, port = await serve(handler)
    reader, writer = await connect(port)
    writer.write(b"GET /custom HTTP/1.1\r\n\r\nGET /unknown HTTP/1.1\r\n\r\n")
    custom = await read_answer(reader)
    assert (custom.status, custom.reason) == (200, "Fine")
    assert custom.headers[:3] == [("X-B", "1"), ("x-a", "2"), ("X-B", "3")]
    unknown = await read_answer(reader)
    assert (unknown.status, unknown.reason) == (299, "")
    for path in (b"/split", b"/split-reason"):  # neither may split the head
        reader, writer = await connect(port)
        writer.write(b"GET %b HTTP/1.1\r\n\r\n" % path)
        split = await read_answer(reader)
        assert (split.status, split.header("set-cookie")) == (500, None)


async def test_https_through_create_server(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    seen: list[str] = []

    async def handler(request: Request) -> Response:
        seen.append(request.scheme)
        return await echo(request)

    server = HttpServer(handler, scheme="https")
    port = await server.start("127.0.0.1", 0, ssl=server_ctx)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{port}/s"
            async with session.post(url, data=b"tls", ssl=client_ctx) as resp:
                assert await resp.read() == b"POST /s tls"
    finally:
        await server.stop(1.0)
    assert seen == ["https"]


async def test_on_error_sees_what_the_handler_raised(connect: Connect) -> None:
    errors: list[BaseException] = []

    async def failing(request: Request) -> Response:
        raise ValueError("boom")

    server = HttpServer(failing, on_error=errors.append)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await connect(port)
        writer.write(GET)
        assert (await read_answer(reader)).status == 500
    finally:
        await server.stop(1.0)
    assert [type(exc) for exc in errors] == [ValueError]


def test_answer_helper_reads_headers_in_order() -> None:
    got = Answer(200, "OK", [("A", "1"), ("a", "2")], b"")
    assert got.header("A") == "2" and got.header("b") is None
