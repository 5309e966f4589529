"""A real upstream HTTP server on port 0 that records what reached it."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

_BLOCK = bytes(range(256)) * 256  # 64 KiB


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_bytes: int = 0
    complete: bool = True

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    """The running server and what it saw."""

    port: int = 0
    scheme: str = "http"
    seen: list[Seen] = field(default_factory=list)
    # Raw paths of /v1/respond requests on arrival: `seen` has them only once
    # answered, after any ?delay=, too late to know one is in flight.
    arrived: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


UPSTREAM = web.AppKey("upstream", Upstream)


def _record(request: web.Request, body: bytes = b"", complete: bool = True) -> Seen:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    seen = Seen(request.method, request.raw_path, headers, body)
    seen.body_bytes, seen.complete = len(body), complete
    request.app[UPSTREAM].seen.append(seen)
    return seen


async def echo(request: web.Request) -> web.Response:
    """Answer with what arrived: method, raw path, headers and a body digest."""
    body = await request.read()
    seen = _record(request, body)
    info: dict[str, Any] = {
        "method": seen.method,
        "raw_path": seen.raw_path,
        "headers": seen.headers,
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return web.json_response(info)


async def upload(request: web.Request) -> web.Response:
    """Count a streamed body without keeping it; note whether it completed."""
    total, complete = 0, True
    digest = hashlib.sha256()
    try:
        async for chunk in request.content.iter_any():
            total += len(chunk)
            digest.update(chunk)
    except Exception:  # the sender aborted: the body is incomplete
        complete = False
    seen = _record(request, complete=complete)
    seen.body_bytes = total
    return web.json_response({"body_bytes": total, "body_sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    """Stream `?bytes=N` bytes; `chunked=1` omits the Content-Length."""
    size = int(request.query["bytes"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") != "1":
        response.content_length = size
    await response.prepare(request)
    sent = 0
    while sent < size:
        block = _BLOCK[: min(len(_BLOCK), size - sent)]
        await response.write(block)
        sent += len(block)
    await response.write_eof()
    return response


async def respond(request: web.Request) -> web.Response:
    """Answer `?status=` (default 200) with `?tokens=` in X-Usage-Tokens, after `?delay=`."""
    request.app[UPSTREAM].arrived.append(request.raw_path)
    await request.read()
    await asyncio.sleep(float(request.query.get("delay", "0")))
    _record(request)
    headers = {"X-Usage-Tokens": request.query["tokens"]} if "tokens" in request.query else {}
    return web.json_response(
        {"ok": True}, status=int(request.query.get("status", "200")), headers=headers
    )


async def redirect(request: web.Request) -> web.Response:
    _record(request)
    return web.Response(status=302, headers={"Location": "/elsewhere?from=redirect"})


async def gzipped(request: web.Request) -> web.Response:
    body = gzip.compress(b'{"compressed": true}')
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def hop_by_hop(request: web.Request) -> web.Response:
    """A response carrying hop-by-hop headers that must not reach the client."""
    return web.Response(
        text="ok",
        headers={
            "Connection": "X-Upstream-Private, keep-alive",
            "X-Upstream-Private": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "X-Upstream-Public": "visible",
        },
    )


async def slow(request: web.Request) -> web.Response:
    """Answer after `?delay=` seconds."""
    await asyncio.sleep(float(request.query.get("delay", "5")))
    return web.Response(text="late")


async def stall(request: web.Request) -> web.StreamResponse:
    """Send headers and a first chunk of a `?bytes=N` body, then nothing."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.content_length = int(request.query.get("bytes", "1000"))
    await response.prepare(request)
    await response.write(b"first")
    await asyncio.sleep(30)
    return response


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Echo text and binary messages; the chosen subprotocol is `echo`."""
    ws = web.WebSocketResponse(protocols=("echo",))
    await ws.prepare(request)
    _record(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(f"echo: {msg.data}")
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


def create_upstream_app(state: Upstream) -> web.Application:
    app = web.Application(client_max_size=1024**4, handler_args={"auto_decompress": False})
    app[UPSTREAM] = state
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/redirect", redirect)
    app.router.add_route("*", "/v1/respond/{tail:.*}", respond)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/hop", hop_by_hop)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stall", stall)
    app.router.add_get("/ws", ws_echo)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_upstream(ssl_context: ssl.SSLContext | None = None) -> Upstream:
    """Start the upstream on a free port of 127.0.0.1."""
    state = Upstream(scheme="https" if ssl_context else "http")
    runner = web.AppRunner(create_upstream_app(state), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    state.runner = runner
    state.port = runner.addresses[0][1]
    return state
