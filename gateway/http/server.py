"""The public listener's HTTP/1.1 server: accepts connections, stops them gracefully.

Each connection is a `connection.HttpConnection` (llhttp through httptools);
this module binds the socket, counts what is open and drains on stop.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Callable

from gateway.http.connection import HttpConnection
from gateway.http.limits import Limits
from gateway.http.message import Handler
from gateway.http.shared import ServerState

__all__ = ["HttpServer", "Limits"]

# After the stop's timeout: how long cancelled handlers and cut transports get.
_CUT_WAIT_S = 1.0


class HttpServer:
    """Serves `handler` over HTTP/1.1 on one listening socket."""

    def __init__(
        self,
        handler: Handler,
        *,
        scheme: str = "http",
        limits: Limits | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        # on_error sees every exception that escaped the handler (after it is logged),
        # on_shed the reason of every request answered 503 under overload.
        self._state = ServerState(handler, scheme, limits or Limits(), on_error, on_shed)
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        """Connections open now (idle kept-alive ones included)."""
        return len(self._state.connections)

    @property
    def requests_in_flight(self) -> int:
        """Requests whose handler is running."""
        return self._state.in_flight

    @property
    def requests_parsed(self) -> int:
        """Requests parsed and not yet answered (those in flight included)."""
        return sum(connection.requests_parsed for connection in self._state.connections)

    @property
    def body_bytes_buffered(self) -> int:
        """Request body bytes the connections hold for their handlers."""
        return sum(connection.body_bytes_buffered for connection in self._state.connections)

    def protocol(self) -> HttpConnection:
        """A protocol factory for `loop.create_server`."""
        return HttpConnection(self._state)

    async def start(
        self,
        host: str,
        port: int,
        ssl: ssl_module.SSLContext | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.protocol,
            host,
            port,
            ssl=ssl,
            backlog=backlog,
            reuse_port=reuse_port or None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, give requests in flight `timeout_s`
        to finish, then cut what is left."""
        if self._server is not None:
            self._server.close()
        state = self._state
        emptied = state.emptied = asyncio.Event()
        if not state.connections:
            emptied.set()
        for connection in list(state.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(emptied.wait(), timeout_s)
        except TimeoutError:
            tasks = [c.cut() for c in list(state.connections)]
            pending = [task for task in tasks if task is not None]
            if pending:
                await asyncio.wait(pending, timeout=_CUT_WAIT_S)
            try:
                await asyncio.wait_for(emptied.wait(), _CUT_WAIT_S)
            except TimeoutError:
                pass  # a transport that never reports its loss: nothing more to do
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
