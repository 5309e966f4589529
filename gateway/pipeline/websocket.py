"""WebSocket passthrough for routes marked `websocket: true`.

The client side is spoken here (wsproto on the listener's upgraded
connection), the upstream side through aiohttp's client; messages are relayed
one by one, so each side's limits and close codes hold.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType
from multidict import CIMultiDict
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from gateway.http.message import Request, Response, Upgraded
from gateway.pipeline.forwarding import Upstream
from gateway.problems import problem

# The handshake is made anew on each side; the client's key and extensions
# mean nothing to the upstream connection.
_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_CLOSE_WAIT_S = 5.0


def is_upgrade(request: Request) -> bool:
    """A WebSocket opening handshake (RFC 6455 4.1)."""
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


def _valid_key(key: str) -> bool:
    """A nonce of 16 bytes, base64-encoded (RFC 6455 4.1)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:  # binascii.Error
        return False


def _accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


class _Client:
    """The client's side of the session: frames parsed and written with wsproto."""

    def __init__(self, conn: Upgraded, max_message_bytes: int) -> None:
        self._conn = conn
        self._ws = Connection(ConnectionType.SERVER)
        self._max = max_message_bytes

    async def send(self, event: Message[Any] | Ping | Pong | CloseConnection) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            return  # already closed on this side
        self._conn.write(data)
        await self._conn.drain()

    async def pump_to(self, upstream: aiohttp.ClientWebSocketResponse) -> None:
        """Client messages to the upstream until either side closes."""
        texts: list[str] = []
        blobs: list[bytes] = []
        size = 0
        while True:
            data = await self._conn.receive()
            if not data:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
                return
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    size += len(event.data)
                    if size > self._max:
                        await self.send(CloseConnection(WSCloseCode.MESSAGE_TOO_BIG))
                        await upstream.close(code=WSCloseCode.MESSAGE_TOO_BIG)
                        return
                    if isinstance(event, TextMessage):
                        texts.append(event.data)
                    else:
                        blobs.append(bytes(event.data))
                    if not event.message_finished:
                        continue
                    if isinstance(event, TextMessage):
                        await upstream.send_str("".join(texts))
                    else:
                        await upstream.send_bytes(b"".join(blobs))
                    texts, blobs, size = [], [], 0
                elif isinstance(event, Ping):
                    await upstream.ping(event.payload)
                elif isinstance(event, Pong):
                    await upstream.pong(event.payload)
                elif isinstance(event, CloseConnection):
                    await upstream.close(code=event.code, message=(event.reason or "").encode())
                    return

    async def pump_from(self, upstream: aiohttp.ClientWebSocketResponse) -> None:
        """Upstream messages to the client until either side closes."""
        while True:
            msg = await upstream.receive()
            if msg.type is WSMsgType.TEXT:
                await self.send(TextMessage(msg.data))
            elif msg.type is WSMsgType.BINARY:
                await self.send(BytesMessage(msg.data))
            elif msg.type is WSMsgType.PING:
                await self.send(Ping(msg.data))
            elif msg.type is WSMsgType.PONG:
                await self.send(Pong(msg.data))
            elif msg.type is WSMsgType.CLOSE:
                reason = msg.extra if isinstance(msg.extra, str) else ""
                await self.send(CloseConnection(msg.data or WSCloseCode.OK, reason))
                return
            else:  # CLOSING, CLOSED, ERROR: the upstream is gone
                await self.send(CloseConnection(WSCloseCode.GOING_AWAY))
                return


async def relay(
    request: Request,
    up: Upstream,
    headers: CIMultiDict[str],
    request_id: str,
    max_message_bytes: int,
) -> Response:
    """Open the upstream WebSocket first, then accept the client with its subprotocol.

    Messages are limited to the route's body limit on both sides (aiohttp
    applies it after inflating), and the client side does not negotiate
    compression: a small deflated frame must not become gigabytes here.
    """
    key = request.headers.get("Sec-WebSocket-Key", "")
    if request.headers.get("Sec-WebSocket-Version") != "13" or not _valid_key(key):
        return problem(
            400, "bad-websocket-handshake",
            "a WebSocket handshake needs Sec-WebSocket-Version 13 and a Sec-WebSocket-Key",
            request_id=request_id,
        )  # fmt: skip
    for name in _HANDSHAKE:
        headers.popall(name, None)
    offered = headers.popall("Sec-WebSocket-Protocol", [])
    protocols = [p.strip() for value in offered for p in value.split(",") if p.strip()]
    try:
        upstream_ws = await up.websocket_session.ws_connect(
            up.url(request.target), headers=headers, protocols=protocols,
            autoclose=False, autoping=False, max_msg_size=max_message_bytes,
        )  # fmt: skip
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

    async def session(conn: Upgraded) -> None:
        client = _Client(conn, max_message_bytes)
        pumps = [
            asyncio.create_task(client.pump_to(upstream_ws)),
            asyncio.create_task(client.pump_from(upstream_ws)),
        ]
        try:
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if pending:  # the other side has been sent a close frame; let it answer
                await asyncio.wait(pending, timeout=_CLOSE_WAIT_S)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    accepted = CIMultiDict(
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": _accept(key)}
    )
    if upstream_ws.protocol:
        accepted["Sec-WebSocket-Protocol"] = upstream_ws.protocol
    accepted["X-Request-Id"] = request_id
    response = Response(101, accepted, upgrade=session)
    async with upstream_ws:
        await request.respond(response)
    return response
