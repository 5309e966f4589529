"""The forwarder's own HTTP/1.1 client against real servers: the aiohttp upstream and
raw sockets for what a framework would not send (closed idle connections, 1xx, ...)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.pipeline.upstream_client import UpstreamClient, UpstreamResponse, request_head
from gateway.pipeline.upstream_conn import UpstreamError
from tests.rawhttp import Handler, RawServer, answer
from tests.servers import free_port
from tests.upstream import Upstream, start_upstream

MakeClient = Callable[..., UpstreamClient]
MakeRaw = Callable[[Handler], Any]


def new_client(
    port: int, ssl_context: ssl.SSLContext | None = None, **options: Any
) -> UpstreamClient:
    settings: dict[str, Any] = {
        "max_connections": 8, "connect_timeout_s": 2.0, "timeout_s": 5.0,
        "total_timeout_s": None, **options,
    }  # fmt: skip
    return UpstreamClient(
        "127.0.0.1", port, ssl_context, host_header=f"127.0.0.1:{port}", **settings
    )


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    made: list[UpstreamClient] = []

    def make(
        port: int, ssl_context: ssl.SSLContext | None = None, **options: Any
    ) -> UpstreamClient:
        made.append(new_client(port, ssl_context, **options))
        return made[-1]

    yield make
    for client in made:
        await client.close()


@pytest.fixture
async def raw() -> AsyncIterator[MakeRaw]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        servers.append(await RawServer(handler).start())
        return servers[-1]

    yield start
    for server in servers:
        await server.stop()


def headers(**fields: str) -> CIMultiDict[str]:
    return CIMultiDict((name.replace("_", "-"), value) for name, value in fields.items())


async def fetch(
    client: UpstreamClient, method: str = "GET", target: str = "/", body: Any = None
) -> tuple[UpstreamResponse, bytes]:
    resp = await client.request(method, target, headers(Host="up.test"), body)
    try:
        return resp, await resp.read()
    finally:
        resp.release()


async def test_sends_only_what_it_is_given_and_reuses_the_connection(
    upstream: Upstream, make_client: MakeClient
) -> None:
    client = make_client(upstream.port)
    given = CIMultiDict([("Host", "api.test"), ("X-Dup", "1"), ("x-dup", "2"), ("Via", "1.1 gw")])
    for _ in range(3):
        resp = await client.request("GET", "/a%2Fb?x=1&x=%20", given)
        info = json.loads(await resp.read())
        resp.release()
        assert resp.status == 200 and resp.reason == "OK" and resp.version == (1, 1)
        assert info["raw_path"] == "/a%2Fb?x=1&x=%20"
        assert info["headers"] == [list(pair) for pair in given.items()]
    assert client.open_connections == 1
    assert client.idle_connections == 1


async def test_bodies_are_framed_by_length_or_chunked(
    upstream: Upstream, make_client: MakeClient
) -> None:
    client = make_client(upstream.port)

    async def stream() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defg"

    resp, body = await fetch(client, "POST", "/echo", b"hello")
    assert json.loads(body)["body_bytes"] == 5
    assert upstream.seen[-1].header("Content-Length") == "5"
    resp, body = await fetch(client, "POST", "/echo", stream())
    assert json.loads(body)["body_bytes"] == 7
    assert upstream.seen[-1].header("Transfer-Encoding") == "chunked"
    assert client.open_connections == 1


async def test_a_failing_streamed_body_aborts_the_upstream_request(
    upstream: Upstream, make_client: MakeClient
) -> None:
    client = make_client(upstream.port)

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        raise RuntimeError("the client went away")

    with pytest.raises(UpstreamError) as caught:
        await fetch(client, "PUT", "/upload", broken())
    assert caught.value.kind == "reset"
    for _ in range(100):
        if upstream.seen:
            break
        await asyncio.sleep(0.02)
    assert not upstream.seen[0].complete


def _drops_second_request() -> Handler:
    """Answers the first request of a connection, then closes on the next one, as a
    server does that dropped an idle connection just as the request went out."""

    async def handle(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader)
        writer.write(answer(f"conn {n}".encode()))
        await server.next_request(reader)

    return handle


async def test_a_reused_connection_found_closed_is_retried_once(
    raw: MakeRaw, make_client: MakeClient
) -> None:
    server = await raw(_drops_second_request())
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"conn 0"
    assert (await fetch(client, "PUT", "/", b"in memory"))[1] == b"conn 1"
    assert (server.connections, len(server.requests)) == (2, 3)


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_no_retry_for_a_post_or_a_streamed_body(
    raw: MakeRaw, make_client: MakeClient, method: str
) -> None:
    server = await raw(_drops_second_request())
    client = make_client(server.port)

    async def stream() -> AsyncIterator[bytes]:
        yield b"streamed"

    await fetch(client)
    with pytest.raises(UpstreamError) as caught:
        await fetch(client, method, "/", b"data" if method == "POST" else stream())
    assert caught.value.kind == "reset"
    assert server.connections == 1


async def test_the_pool_is_bounded_and_waits_for_a_free_connection(
    raw: MakeRaw, make_client: MakeClient
) -> None:
    async def slow(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while await server.next_request(reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer())

    server = await raw(slow)
    client = make_client(server.port, max_connections=2)
    results = await asyncio.gather(*(fetch(client) for _ in range(8)))
    assert [body for _, body in results] == [b"ok"] * 8
    assert (server.peak, server.connections) == (2, 2)

    # A pool that stays full answers "timeout" after the connect timeout.
    client = make_client(server.port, max_connections=1, connect_timeout_s=0.2)
    held = await client.request("GET", "/", headers(Host="up.test"))
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await fetch(client)
    assert caught.value.kind == "timeout" and time.monotonic() - started < 1
    await held.read()
    held.release()
    assert (await fetch(client))[1] == b"ok"  # the held connection came back


async def _silent(
    server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> None:
    await server.next_request(reader)
    await reader.read()  # until the client gives up


async def test_timeouts(raw: MakeRaw, make_client: MakeClient) -> None:
    async def stalls_mid_body(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await reader.read()

    async def trickles(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    for handler, options in [
        (_silent, {"timeout_s": 0.2}),  # to the first byte
        (stalls_mid_body, {"timeout_s": 0.2}),  # between bytes
        (trickles, {"timeout_s": 1.0, "total_timeout_s": 0.3}),  # in all
    ]:
        server = await raw(handler)
        client = make_client(server.port, **options)
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await fetch(client)
        assert caught.value.kind == "timeout"
        assert 0.15 < time.monotonic() - started < 0.8
        assert client.open_connections == 0


async def test_connect_failures(raw: MakeRaw, make_client: MakeClient) -> None:
    with pytest.raises(UpstreamError) as caught:
        await fetch(make_client(free_port()))
    assert caught.value.kind == "connect"
    # A TLS handshake that never completes is a connect timeout.
    server = await raw(_silent)
    client = make_client(server.port, ssl.create_default_context(), connect_timeout_s=0.2)
    with pytest.raises(UpstreamError) as caught:
        await fetch(client)
    assert caught.value.kind == "timeout"


def _script(reply: bytes, close: bool = False) -> Handler:
    """The same answer to every request of a connection; `close` it after the first."""

    async def handle(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while await server.next_request(reader) is not None:
            writer.write(reply)
            if close:
                return

    return handle


@pytest.mark.parametrize(
    ("reply", "status", "body", "reused"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
         + answer(b"final", "201 Created"), 201, b"final", True),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 200, b"until the end", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
        (answer(b"bye", headers="Connection: close\r\n"), 200, b"bye", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
         200, b"abcde", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 304, b"", True),
    ],
)  # fmt: skip
async def test_response_framing(
    raw: MakeRaw, make_client: MakeClient, reply: bytes, status: int, body: bytes, reused: bool
) -> None:
    server = await raw(_script(reply, close=b"until" in reply))
    client = make_client(server.port)
    for _ in range(2):
        resp, got = await fetch(client)
        assert (resp.status, got) == (status, body)
    assert server.connections == (1 if reused else 2)


async def test_head_answer_with_a_length_and_headers_in_order(
    raw: MakeRaw, make_client: MakeClient
) -> None:
    extra = "Set-Cookie: a=1\r\nX-Other: x\r\nSet-Cookie: b=2\r\n"
    server = await raw(_script(answer(b"0123456789", "200 Fine", extra)))
    client = make_client(server.port)

    async def head_only(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await server.next_request(reader)
        writer.write(answer(b"after head"))
        await reader.read()

    resp, got = await fetch(client)
    assert resp.reason == "Fine"
    assert list(resp.headers.items()) == [
        ("Content-Length", "10"), ("Set-Cookie", "a=1"), ("X-Other", "x"), ("Set-Cookie", "b=2"),
    ]  # fmt: skip
    head_server = await raw(head_only)
    client = make_client(head_server.port)
    resp, got = await fetch(client, "HEAD")
    assert (resp.status, resp.content_length, got) == (200, 10, b"")
    assert (await fetch(client))[1] == b"after head"
    assert head_server.connections == 1


async def test_a_truncated_body_is_a_reset(raw: MakeRaw, make_client: MakeClient) -> None:
    server = await raw(_script(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True))
    client = make_client(server.port)
    with pytest.raises(UpstreamError) as caught:
        await fetch(client)
    assert caught.value.kind == "reset"


async def test_an_answer_not_read_to_its_end_is_not_pooled(
    upstream: Upstream, make_client: MakeClient
) -> None:
    client = make_client(upstream.port)
    resp = await client.request("GET", f"/download?bytes={4 * 1024 * 1024}", headers(Host="u"))
    assert await resp.read_chunk()
    resp.release()
    assert (client.open_connections, client.idle_connections) == (0, 0)
    resp, body = await fetch(client, "GET", "/download?bytes=100")
    assert len(body) == 100 and client.idle_connections == 1


async def test_close_ends_idle_connections(raw: MakeRaw, make_client: MakeClient) -> None:
    closed = asyncio.Event()

    async def keeps_alive(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while await server.next_request(reader) is not None:
            writer.write(answer())
        closed.set()

    server = await raw(keeps_alive)
    client = make_client(server.port)
    await fetch(client)
    await client.close()
    await asyncio.wait_for(closed.wait(), 2)
    with pytest.raises(UpstreamError):
        await fetch(client)


def test_request_head_refuses_control_characters_and_frames_the_body() -> None:
    for bad in ("a\r\nX-Injected: 1", "a\rb", "a\nb", "a\x00b", "a\x7f", "\x1b"):
        with pytest.raises(ValueError):
            request_head("GET", "/", headers(X_A=bad), None, "h")
        with pytest.raises(ValueError):
            request_head("GET", f"/{bad}", headers(), None, "h")
        with pytest.raises(ValueError):
            request_head("GET", "/", headers(), b"", f"h{bad}")
        with pytest.raises(ValueError):
            request_head(f"G{bad}", "/", headers(), None, "h")
    head, _ = request_head("GET", "/", headers(X_A="a\tb"), None, "h")  # TAB may be in a value
    assert head == b"GET / HTTP/1.1\r\nX-A: a\tb\r\nHost: h\r\n\r\n"
    head, chunked = request_head("POST", "/p?q", headers(X_A="1"), b"abc", "up:80")
    assert (head, chunked) == (b"POST /p?q HTTP/1.1\r\nX-A: 1\r\nHost: up:80\r\n"
                               b"Content-Length: 3\r\n\r\n", False)  # fmt: skip


def test_on_uvloop() -> None:
    """`gateway serve` runs on uvloop, whose transports and timers are its own."""
    uvloop = pytest.importorskip("uvloop")
    block = bytes(range(256)) * 256

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield block

    async def scenario() -> None:
        up = await start_upstream()
        dropping = await RawServer(_drops_second_request()).start()
        silent = await RawServer(_silent).start()
        plain, retried = new_client(up.port), new_client(dropping.port)
        quiet = new_client(silent.port, timeout_s=0.2)
        try:
            _, body = await fetch(plain, "POST", "/upload", upload())
            assert json.loads(body)["body_bytes"] == 64 * len(block)
            resp = await plain.request("GET", f"/download?bytes={8 * 1024**2}", headers(Host="u"))
            received = 0
            while chunk := await resp.read_chunk():
                received += len(chunk)
                await asyncio.sleep(0.001)  # a slow reader: the connection pauses reading
            resp.release()
            assert received == 8 * 1024**2 and plain.idle_connections == 1
            assert [(await fetch(retried))[1] for _ in range(2)] == [b"conn 0", b"conn 1"]
            with pytest.raises(UpstreamError) as caught:
                await fetch(quiet)
            assert caught.value.kind == "timeout"
        finally:
            for client in (plain, retried, quiet):
                await client.close()
            for server in (dropping, silent):
                await server.stop()
            await up.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
