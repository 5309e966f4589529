"""A small JSON API with projects and team members: the demo's upstream."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from aiohttp import web

Store = dict[str, dict[str, dict[int, dict[str, Any]]]]
STORE: web.AppKey[Store] = web.AppKey("store")
_IDS: web.AppKey[itertools.count[int]] = web.AppKey("ids")


def _tenant(request: web.Request) -> str:
    # The gateway sets this header; the sample keeps each tenant's data apart.
    return request.headers.get("X-Tenant-Id", "public")


def _collection(request: web.Request, kind: str) -> dict[int, dict[str, Any]]:
    return request.app[STORE].setdefault(_tenant(request), {}).setdefault(kind, {})


async def _json_body(request: web.Request, field: str) -> str:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "expected a JSON body"}') from None
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise web.HTTPBadRequest(text=f'{{"error": "expected a string field \\"{field}\\""}}')
    return value


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def list_items(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    return web.json_response({kind: list(_collection(request, kind).values())})


async def create_item(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    field = "name" if kind == "projects" else "email"
    value = await _json_body(request, field)
    ids: itertools.count[int] = request.app[_IDS]
    item_id = next(ids)
    item = {"id": item_id, field: value, "tenant": _tenant(request)}
    _collection(request, kind)[item_id] = item
    return web.json_response(item, status=201)


def _item_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound() from None


async def get_item(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    item = _collection(request, kind).get(_item_id(request))
    if item is None:
        return web.json_response({"error": "not found"}, status=404)
    return web.json_response(item)


async def delete_item(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if _collection(request, kind).pop(_item_id(request), None) is None:
        return web.json_response({"error": "not found"}, status=404)
    return web.Response(status=204)


def create_sample_app() -> web.Application:
    """The sample API: /healthz, /v1/projects[/{id}], /v1/members[/{id}]."""
    app = web.Application()
    app[STORE] = {}
    app[_IDS] = itertools.count(1)
    kinds = "{kind:projects|members}"
    app.router.add_get("/healthz", healthz)
    app.router.add_get(f"/v1/{kinds}", list_items)
    app.router.add_post(f"/v1/{kinds}", create_item)
    app.router.add_get(f"/v1/{kinds}/{{id}}", get_item)
    app.router.add_delete(f"/v1/{kinds}/{{id}}", delete_item)
    return app


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway.demo.upstream`: the sample API alone (compose's upstream)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    web.run_app(create_sample_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
