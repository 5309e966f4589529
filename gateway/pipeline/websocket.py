"""WebSocket passthrough for routes marked `websocket: true`."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from gateway.pipeline.forwarding import Upstream
from gateway.problems import problem

# The handshake is made anew on each side; the client's key and extensions
# mean nothing to the upstream connection.
_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions")


def is_upgrade(request: web.Request) -> bool:
    """A WebSocket opening handshake (RFC 6455 4.1)."""
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    while True:
        msg = await src.receive()
        if msg.type is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            reason = msg.extra.encode() if isinstance(msg.extra, str) else msg.extra or b""
            await dst.close(code=msg.data or WSCloseCode.OK, message=reason)
            return
        else:  # CLOSING, CLOSED, ERROR: the source is gone
            await dst.close(code=WSCloseCode.GOING_AWAY)
            return


async def relay(
    request: web.Request,
    up: Upstream,
    headers: CIMultiDict[str],
    request_id: str,
    max_message_bytes: int,
) -> web.StreamResponse:
    """Open the upstream WebSocket first, then accept the client with its subprotocol.

    Messages are limited to the route's body limit on both sides (aiohttp
    applies it after inflating), and the client side does not negotiate
    compression: a small deflated frame must not become gigabytes here.
    """
    for name in _HANDSHAKE:
        headers.popall(name, None)
    offered = headers.popall("Sec-WebSocket-Protocol", [])
    protocols = [p.strip() for value in offered for p in value.split(",") if p.strip()]
    options: dict[str, Any] = {
        "autoclose": False,
        "autoping": False,
        "max_msg_size": max_message_bytes,
    }
    try:
        upstream_ws = await up.websocket_session.ws_connect(
            up.url(request.raw_path), headers=headers, protocols=protocols, **options
        )
    except aiohttp.WSServerHandshakeError as exc:
        return problem(
            502, "upstream-websocket-refused",
            f"upstream {up.name!r} refused the WebSocket handshake with status {exc.status}",
            request_id=request_id,
        )  # fmt: skip
    except (TimeoutError, aiohttp.ClientError):
        return problem(
            502, "upstream-unreachable", f"upstream {up.name!r} could not be reached",
            request_id=request_id,
        )  # fmt: skip
    async with upstream_ws:
        client_ws = web.WebSocketResponse(
            protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
            compress=False,
            **options,
        )
        client_ws.headers["X-Request-Id"] = request_id
        await client_ws.prepare(request)
        pumps = [
            asyncio.create_task(_pump(client_ws, upstream_ws)),
            asyncio.create_task(_pump(upstream_ws, client_ws)),
        ]
        try:
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if pending:  # the other side has been sent a close frame; let it answer
                await asyncio.wait(pending, timeout=5)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        return client_ws
