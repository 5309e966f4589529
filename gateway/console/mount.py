"""The usage console on the admin listener under /console: server-rendered pages over the
same ledger, counters and tenant operations as the admin API.

Every page needs a session (a signed cookie from the login form, which takes the
admin token); every state-changing form carries the session's CSRF token. No
inline script: the only script is the console's own, which draws the charts
from `usage.json`, so the CSP allows `'self'` alone.
"""

from __future__ import annotations

import jinja2
from aiohttp import web

from gateway.console import tenant_page, views
from gateway.console.common import (
    HERE,
    PUBLIC,
    SESSIONS,
    TEMPLATES,
    THROTTLE,
    console_guard,
    see_other,
)
from gateway.console.session import LoginThrottle, Sessions


async def _home(request: web.Request) -> web.Response:
    return see_other("/console/tenants")


def setup_console(app: web.Application, public_app: web.Application, token: str | None) -> None:
    """Mount the console on the admin application (before it starts)."""
    if token:
        app[SESSIONS] = Sessions(token)
    app[THROTTLE] = LoginThrottle()
    app[PUBLIC] = public_app
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.middlewares.append(console_guard)
    app.router.add_get("/console", _home)
    app.router.add_get("/console/login", views.login_form)
    app.router.add_post("/console/login", views.login)
    app.router.add_post("/console/logout", views.logout)
    app.router.add_get("/console/tenants", views.tenants)
    tenant_page.add_routes(app)
    app.router.add_static("/console/static/", HERE / "static")
