"""RFC 9457 problem details: every error the gateway itself answers."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway.access_log import Outcome
from gateway.http.message import Response

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:quota-gateway:problem:"


class Refused(Exception):
    """A stage's typed refusal: the one HTTP adapter (`answer`) turns it into problem+json.

    Stages below the adapter (admission, idempotency, metering) raise it and
    never build a response themselves.
    """

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}
        self.close = close  # close the connection after answering (a body left unread)
        self.extra = extra


def answer(
    refused: Refused, request_id: str | None = None, outcome: Outcome | None = None
) -> Response:
    """The problem+json answer of a refusal on the public listener (noted in `outcome`)."""
    if outcome is not None:
        outcome.decision = refused.kind
    response = problem(
        refused.status, refused.kind, refused.detail, request_id=request_id,
        headers=refused.headers, **refused.extra,
    )  # fmt: skip
    response.close = refused.close
    return response


def web_answer(refused: Refused, request_id: str | None = None) -> web.Response:
    """The same answer as an aiohttp response (the admin listener)."""
    response = answer(refused, request_id)
    out = web.Response(status=response.status, body=response.body, headers=response.headers)
    if refused.close:
        out.force_close()
    return out


def problem(
    status: int,
    kind: str,
    detail: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """A problem+json answer; `kind` becomes the stable `type` URI."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + kind,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    if request_id:
        body["request_id"] = request_id
    out_headers = CIMultiDict(headers or {})
    out_headers["Content-Type"] = PROBLEM_JSON
    if request_id:
        out_headers["X-Request-Id"] = request_id
    return Response(status, out_headers, json.dumps(body).encode())
