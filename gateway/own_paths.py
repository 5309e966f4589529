"""The gateway's own paths on the public listener, under /_gateway/: the calling tenant's
usage, and Stripe's webhooks."""

from __future__ import annotations

import json
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from gateway.app_keys import CLIENT_LIMITS, QUOTA, SERVICES, WEBHOOKS
from gateway.auth.authenticate import Authenticator
from gateway.billing.webhooks import WebhookError, Webhooks
from gateway.http.message import Request, Response
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.usage_ledger import UsageLedger
from gateway.pipeline.admission import admit
from gateway.pipeline.forwarding import LimitedBody, body_too_large
from gateway.pipeline.runtime import Runtime
from gateway.problems import Refused
from gateway.quota.view import usage_view

# Stripe's events are a few kilobytes; nothing legitimate comes near this.
WEBHOOK_MAX_BYTES = 1024 * 1024


def json_answer(value: object, rid: str) -> Response:
    headers = CIMultiDict({"Content-Type": "application/json; charset=utf-8", "X-Request-Id": rid})
    return Response(200, headers, json.dumps(value).encode())


def authenticator(runtime: Runtime) -> Authenticator:
    assert runtime.auth is not None  # the loader refuses `auth: required` without auth
    return runtime.auth.authenticator


async def gateway_endpoint(
    app: web.Application, runtime: Runtime, request: Request, segments: list[str], rid: str
) -> Response:
    """Paths under /_gateway/: the calling tenant's own usage, Stripe's webhooks."""
    webhooks = app.get(WEBHOOKS)
    if webhooks is not None and unquote(request.path) == webhooks.stripe.webhook_path:
        return await stripe_webhook(request, webhooks, rid)
    engine, policies, services = app.get(QUOTA), runtime.policies, app.get(SERVICES)
    if segments != ["_gateway", "usage"] or engine is None or policies is None:
        raise Refused(404, "not-found", "no such gateway endpoint")
    if services is None or runtime.auth is None:
        raise Refused(404, "not-found", "no such gateway endpoint")
    if request.method not in ("GET", "HEAD"):
        raise Refused(405, "method-not-allowed", "use GET")
    with app[CLIENT_LIMITS].authenticating(request):
        admitted = await admit(request.headers, authenticator(runtime), services, runtime.config)
    usage = UsageLedger(services.ledger.db)
    return json_answer(
        await usage_view(engine, policies, admitted.tenant, usage, recorded=False), rid
    )


async def stripe_webhook(request: Request, webhooks: Webhooks, rid: str) -> Response:
    if request.method != "POST":
        raise Refused(405, "method-not-allowed", "use POST")
    # The raw bytes: the signature covers them exactly.
    body = await LimitedBody(request, WEBHOOK_MAX_BYTES).read()
    if body is None:
        raise body_too_large(WEBHOOK_MAX_BYTES)
    try:
        result = await webhooks.handle(body, request.headers.get("Stripe-Signature"))
    except WebhookError as exc:
        raise Refused(exc.status, "stripe-webhook", str(exc)) from None
    except LedgerUnavailable:
        # Not recorded: Stripe retries, and the event is applied then.
        raise Refused(503, "ledger-unavailable", "retry later") from None
    return json_answer(result, rid)
