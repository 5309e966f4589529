"""The benchmark's upstream and its baseline proxy, each run as `python -m bench.servers`.

The baseline is the naive aiohttp pass-through any team would write first: one
shared client session, the whole body read into memory, nothing checked. The
gateway must be close to it while doing everything it does.
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

BODY = b'{"id": 1, "name": "apollo", "members": [1, 2, 3], "status": "active"}'


def upstream_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def baseline_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False
        )
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.Response:
        async with app[session_key].request(
            request.method, upstream + request.path_qs, data=await request.read(),
            allow_redirects=False,
        ) as up:  # fmt: skip
            body = await up.read()
            return web.Response(
                body=body, status=up.status,
                headers={"Content-Type": up.headers.get("Content-Type", "")},
            )  # fmt: skip

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    app = upstream_app() if kind == "upstream" else baseline_app(sys.argv[3])
    try:
        import uvloop
    except ImportError:
        pass
    else:
        uvloop.install()  # the gateway runs on uvloop too: compare like with like
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
