"""Hello-world requests/s of the listener's `HttpServer` against aiohttp's low-level server,
and the floor of forwarding: `HttpServer` passing each request through the gateway's
`UpstreamClient` and nothing else.

    .venv/bin/python -m bench.http_server [--duration-s 5] [--connections 50]

Each server runs alone in a child process pinned to CPU 1 and answers
`200 hello` to every request (the forwarding one: what a hello-world
`HttpServer` on CPU 0 answered it); `wrk -t1` on CPU 0 keeps `--connections`
keep-alive connections busy. Printed per server and event loop: requests/s
and the server's CPU microseconds per request (from /proc, so a machine shared
with other work shows in req/s more than in CPU per request). Needs wrk and
two CPUs; not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

from bench.measure import binary, cpu_s, parse_wrk, pin

SERVERS = ("HttpServer", "aiohttp", "forwarding")
LOOPS = ("uvloop", "asyncio")
_SERVER_CPU = 1
_LOAD_CPU = 0


async def _serve_ours(port: int) -> None:
    from gateway.http.message import Request, Response
    from gateway.http.server import HttpServer

    async def hello(request: Request) -> Response:
        return Response(200, body=b"hello")

    await HttpServer(hello).start("127.0.0.1", port)
    await asyncio.Event().wait()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(body=b"hello")

    await asyncio.get_running_loop().create_server(web.Server(hello), "127.0.0.1", port)
    await asyncio.Event().wait()


async def _serve_forwarding(port: int, upstream: int) -> None:
    from multidict import CIMultiDict

    from gateway.http.message import Request, Response
    from gateway.http.server import HttpServer
    from gateway.pipeline.upstream_client import UpstreamClient

    client = UpstreamClient(
        "127.0.0.1", upstream, None, max_connections=100, connect_timeout_s=5, timeout_s=5,
        total_timeout_s=None, host_header=f"127.0.0.1:{upstream}",
    )  # fmt: skip

    async def forward(request: Request) -> Response:
        answer = await client.request(request.method, request.target, CIMultiDict())
        try:
            body = await answer.read()
        finally:
            answer.release()
        return Response(answer.status, CIMultiDict(answer.headers), body)

    await HttpServer(forward).start("127.0.0.1", port)
    await asyncio.Event().wait()


def serve(server: str, port: int, loop: str, upstream: int = 0) -> None:
    """Run one server until killed (the child process)."""
    if server == "forwarding":
        main = _serve_forwarding(port, upstream)
    elif server == "HttpServer":
        main = _serve_ours(port)
    else:
        main = _serve_aiohttp(port)
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def _child(server: str, port: int, loop: str, upstream: int = 0) -> subprocess.Popen[bytes]:
    args = ["serve", server, str(port), loop, str(upstream)]
    return subprocess.Popen([sys.executable, "-m", "bench.http_server", *args])


def measure(server: str, loop: str, duration_s: float, connections: int) -> tuple[float, float]:
    """Requests/s and server CPU µs per request of one server under wrk."""
    port = _free_port()
    upstream = None
    if server == "forwarding":  # a hello-world HttpServer on the load's CPU answers it
        upstream_port = _free_port()
        upstream = _child("HttpServer", upstream_port, "uvloop")
        pin(upstream.pid, _LOAD_CPU)
        _wait_listening(upstream_port)
    child = _child(server, port, loop, upstream_port if upstream else 0)
    try:
        pin(child.pid, _SERVER_CPU)
        _wait_listening(port)
        before = cpu_s(child.pid)
        out = subprocess.run(
            ["taskset", "-c", str(_LOAD_CPU), binary("wrk"), "-t1", f"-c{connections}",
             f"-d{duration_s:g}s", "--latency", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=True, timeout=duration_s + 30,
        ).stdout  # fmt: skip
        used_s = cpu_s(child.pid) - before
    finally:
        for proc in (child, upstream):
            if proc is not None:
                proc.kill()
                proc.wait()
    load = parse_wrk(out)
    if load.errors:
        raise RuntimeError(f"{server} on {loop}: {load.errors} errors\n{out}")
    return load.rps, used_s / load.requests * 1e6


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: one for the server, one for wrk")
    print(f"{'server':<12} {'loop':<8} {'req/s':>9} {'CPU µs/req':>11}")
    for loop in LOOPS:
        for server in SERVERS:
            rps, cpu_us = measure(server, loop, args.duration_s, args.connections)
            print(f"{server:<12} {loop:<8} {rps:>9.0f} {cpu_us:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
