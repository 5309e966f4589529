"""Slow clients against a live gateway over real sockets: bodies trickled to hold the
upstream's pool, and a body under the listener's minimum rate.

The gateway sees clients on different loopback addresses (127.0.0.2 trickles,
127.0.0.1 behaves): Linux routes all of 127/8 to the loopback interface.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from gateway.app_keys import LIVE
from gateway.pipeline.upstream_client import UpstreamClient
from gateway.server import Gateway
from tests.conftest import MakeGateway, gateway_config
from tests.rawhttp import Answer, read_answer
from tests.upstream import Upstream
from tests.waiting import eventually

TRICKLER = "127.0.0.2"


def small_pool(upstream: Upstream, wait_s: float = 0.5, **server: Any) -> dict[str, Any]:
    """A gateway whose upstream pool has 8 connections and waits `wait_s` for one."""
    pool = {"url": upstream.url, "max_connections": 8, "connect_timeout_s": wait_s, "timeout_s": 5}
    return gateway_config(
        upstream.url,
        upstreams={"app": pool},
        server={"host": "127.0.0.1", "port": 0, **server},
    )


def pool_of(gateway: Gateway) -> UpstreamClient:
    assert gateway.app is not None
    return gateway.app[LIVE].runtime.upstreams["app"].client


@asynccontextmanager
async def tricklers(
    port: int, count: int, length: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """`count` uploads of `length` bytes from TRICKLER that send one byte and then wait."""
    conns = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(TRICKLER, 0)
            )
            conns.append((reader, writer))
            head = f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n"
            writer.write(head.encode() + b"x")
            await writer.drain()
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


def limited(gateway: Gateway, reason: str) -> float | None:
    return gateway.registry.get_sample_value("gateway_client_limited_total", {"reason": reason})


def upstream_uploads(upstream: Upstream) -> int:
    """Uploads the upstream saw end (aborted ones included)."""
    return len(upstream.seen)


async def well_behaved(port: int) -> int:
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{port}/v1/things"
        async with client.post(url, data=b"hello") as resp:
            await resp.read()
            return resp.status


async def test_trickled_uploads_leave_the_pool_to_others(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(small_pool(upstream))
    pool = pool_of(gw)
    # Bodies too large to be read ahead: each holds an upstream connection while it trickles.
    async with tricklers(gw.port, 12, 1024 * 1024) as conns:
        await eventually(lambda: pool.open_connections == 4)  # the trickler's share: half the pool
        # The others wait for one of the trickler's own to end, up to the connect timeout.
        await eventually(lambda: limited(gw, "upstream_share") == 8)
        refused = []
        for reader, _ in conns:
            try:
                answer = await asyncio.wait_for(read_answer(reader), 0.2)
            except TimeoutError:
                continue  # still uploading, on one of the pool's connections
            refused.append(answer)
        assert [a.status for a in refused] == [429] * 8
        assert refused[0].header("Retry-After") == "1"
        assert await well_behaved(gw.port) == 200
        assert pool.open_connections == 5


async def test_a_client_over_its_share_waits_for_one_of_its_own(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(small_pool(upstream, wait_s=10))
    pool = pool_of(gw)
    async with tricklers(gw.port, 5, 1024 * 1024) as conns:
        await eventually(lambda: pool.open_connections == 4)
        conns[0][1].close()  # one upload ends: the fifth takes its place
        await eventually(lambda: pool.open_connections == 4 and upstream_uploads(upstream) == 1)
        assert limited(gw, "upstream_share") is None


async def test_small_trickled_bodies_take_no_upstream_connection(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(small_pool(upstream))
    pool = pool_of(gw)
    listener = gw._listener
    assert listener is not None
    async with tricklers(gw.port, 20, 1000):
        await eventually(lambda: listener.requests_in_flight == 20)
        assert pool.open_connections == 0  # read ahead, not streamed upstream
        assert await well_behaved(gw.port) == 200


async def test_a_body_under_the_minimum_rate_is_cut_and_frees_its_connection(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    limits = {"body_min_bytes_per_s": 10_000, "body_rate_grace_s": 0.3}
    gw = await make_gateway(small_pool(upstream, limits=limits))
    pool = pool_of(gw)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n")
    answer_task = asyncio.create_task(read_answer(reader))
    sent = 0
    # 100 bytes every 0.1 s is a tenth of the minimum rate, and never silent for long.
    while not answer_task.done() and sent < 10_000:
        writer.write(b"y" * 100)
        sent += 100
        await asyncio.sleep(0.1)
    answer = await asyncio.wait_for(answer_task, 5)
    writer.close()
    assert answer.status == 408
    assert sent < 10_000  # cut long before the megabyte is in
    await eventually(lambda: pool.open_connections == 0 and len(upstream.seen) == 1)
    assert upstream.seen[0].complete is False  # the upstream saw the upload aborted


async def raw(
    port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[Answer]]:
    """A connection that sent `request`, with the task that reads its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    return reader, writer, asyncio.create_task(read_answer(reader))


async def admin_health(gateway: Gateway) -> int:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{gateway.admin_port}/healthz") as resp:
            return resp.status


def shed_count(gateway: Gateway, reason: str) -> float | None:
    return gateway.registry.get_sample_value("gateway_requests_shed_total", {"reason": reason})


SLOW = b"GET /slow?delay=5 HTTP/1.1\r\nHost: t\r\n\r\n"
# A large upload announced and never sent: a shed answer must not wait for its body.
UPLOAD = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n"


async def test_over_the_requests_in_flight_the_listener_sheds_but_health_and_admin_answer(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    server: dict[str, Any] = {"limits": {"max_requests_in_flight": 3}, "shutdown_timeout_s": 0.5}
    gw = await make_gateway(small_pool(upstream, **server))
    listener = gw._listener
    assert listener is not None
    slow = [await raw(gw.port, SLOW) for _ in range(3)]
    await eventually(lambda: listener.requests_in_flight == 3)
    _, writer, answered = await raw(gw.port, UPLOAD)
    shed = await asyncio.wait_for(answered, 5)
    assert (shed.status, shed.header("Retry-After")) == (503, "1")
    assert shed.header("Connection") == "close"
    assert json.loads(shed.body)["type"] == "urn:quota-gateway:problem:overloaded"
    assert shed_count(gw, "in_flight") == 1
    # /_gateway/ is never shed (this one answers 404: no quota is configured), nor is admin.
    _, own, gateway_path = await raw(gw.port, b"GET /_gateway/usage HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await asyncio.wait_for(gateway_path, 5)).status == 404
    assert await admin_health(gw) == 200
    for _, w, task in [*slow, (None, writer, answered), (None, own, gateway_path)]:
        task.cancel()
        w.close()


async def test_over_the_connections_a_new_client_is_shed_and_a_served_one_kept(
    upstream: Upstream, make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(small_pool(upstream, limits={"shed_connections": 2}))
    listener = gw._listener
    assert listener is not None
    reader, served, first = await raw(gw.port, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await first).status == 200
    idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
    await eventually(lambda: listener.open_connections == 3)
    _, newcomer, shed = await raw(gw.port, UPLOAD)
    assert (await asyncio.wait_for(shed, 5)).status == 503
    assert shed_count(gw, "connections") == 1
    served.write(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")  # a client already served goes on
    assert (await asyncio.wait_for(read_answer(reader), 5)).status == 200
    for _, w in [*idle, (None, newcomer), (None, served)]:
        w.close()
