"""What every console page shares: its keys on the admin application, the session and
CSRF guard, the security headers, rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.app_keys import BEHIND_SUPERVISOR, LIVE, QUOTA, SERVICES
from gateway.console.session import COOKIE, LoginThrottle, Session, Sessions
from gateway.headers import SUPERVISED_CLIENT
from gateway.pipeline.runtime import Runtime
from gateway.quota.engine import QuotaEngine
from gateway.quota.policy import Policies
from gateway.quota.store import StoreUnavailable
from gateway.services import Services

HERE = Path(__file__).parent
SESSIONS = web.AppKey("console_sessions", Sessions)
THROTTLE = web.AppKey("console_login_throttle", LoginThrottle)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
PUBLIC = web.AppKey("console_public_app", web.Application)
SESSION = web.RequestKey("console_session", Session)  # once checked
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
OPEN_PATHS = ("/console/login", "/console/static/")


def render(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    sessions = request.app[SESSIONS]
    context["csrf"] = sessions.csrf(session) if session is not None else ""
    html = request.app[TEMPLATES].get_template(name).render(**context)
    return web.Response(text=html, status=status, content_type="text/html")


@web.middleware
async def console_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sessions, CSRF and security headers for /console; nothing else is touched."""
    if not request.path.startswith("/console"):
        return await handler(request)
    sessions = request.app.get(SESSIONS)
    if sessions is None:
        response: web.StreamResponse = web.Response(
            status=403, text="the admin token's environment variable is not set"
        )
    elif request.path.startswith(OPEN_PATHS):
        response = await handler(request)
    else:
        session = sessions.check(request.cookies.get(COOKIE))
        if session is None:
            response = see_other("/console/login")
        else:
            request[SESSION] = session
            if request.method == "POST":
                form = await request.post()
                given = form.get("csrf")
                if not sessions.csrf_ok(session, given if isinstance(given, str) else None):
                    response = web.Response(
                        status=403, text="missing or wrong CSRF token; reload the page"
                    )
                    response.headers.update(SECURITY_HEADERS)
                    return response
            try:
                response = await handler(request)
            except StoreUnavailable as exc:
                response = web.Response(
                    status=503, text=f"the counters cannot be read right now ({exc}); reload"
                )
    response.headers.update(SECURITY_HEADERS)
    return response


def see_other(location: str) -> web.Response:
    """A redirect after a form (returned, not raised: a middleware adds its headers)."""
    return web.Response(status=303, headers={"Location": location})


def services_of(request: web.Request) -> Services:
    services = request.app[PUBLIC].get(SERVICES)
    if services is None:
        raise web.HTTPNotFound(text="this gateway keeps no tenants")
    return services


def runtime_of(request: web.Request) -> Runtime:
    """The config live now: a page reads it once (a reload may swap it meanwhile)."""
    return request.app[PUBLIC][LIVE].runtime


def quota_of(request: web.Request, runtime: Runtime) -> tuple[QuotaEngine, Policies] | None:
    """The quota engine and the runtime's policies; None when nothing is metered."""
    engine, policies = request.app[PUBLIC].get(QUOTA), runtime.policies
    return (engine, policies) if engine is not None and policies is not None else None


def client_address(request: web.Request) -> str:
    """The client's address: behind a supervisor, the one the supervisor saw (it alone
    reaches a process's private socket); else the connection's."""
    if request.config_dict.get(BEHIND_SUPERVISOR):
        return request.headers.get(SUPERVISED_CLIENT, "")
    return request.remote or ""
