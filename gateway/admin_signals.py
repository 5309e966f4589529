"""The admin API's view of tenant signals: current anomalies, notifications and their
dead letters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.clock import iso_utc
from gateway.problems import Refused
from gateway.signals.crossings import ANOMALY
from gateway.signals.store import DEAD, DELIVERED, PENDING, SignalStore

ANOMALY_WINDOW = timedelta(hours=2)  # the current hour and the one before
STATES = (PENDING, DELIVERED, DEAD)


def query_limit(request: web.Request) -> int:
    """`?limit=`: 1 to 1000, default 100; a 400 otherwise."""
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise Refused(400, "bad-query", "limit must be an integer from 1 to 1000")
    return limit


async def list_anomalies(request: web.Request, store: SignalStore) -> dict[str, Any]:
    """GET /admin/anomalies?limit=: anomalies of this hour and the last, largest first."""
    now = datetime.now(UTC)
    since = now.replace(minute=0, second=0, microsecond=0) - (ANOMALY_WINDOW - timedelta(hours=1))
    found = await store.of_type(ANOMALY, since, query_limit(request))
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for item in found:  # newest hour first: keep each tenant meter's latest
        latest.setdefault((item["tenant"], item["meter"]), item)
    anomalies = sorted(latest.values(), key=lambda a: a.get("ratio", 0), reverse=True)
    return {"since": iso_utc(since), "anomalies": anomalies}


async def list_notifications(request: web.Request, store: SignalStore) -> dict[str, Any]:
    """GET /admin/notifications?tenant=&state=&limit=: the newest first."""
    state = request.query.get("state", "")
    if state and state not in STATES:
        raise Refused(400, "bad-query", f"state must be one of {', '.join(STATES)}")
    rows = await store.recent(request.query.get("tenant", ""), state, query_limit(request))
    return {
        "notifications": [
            {
                "signal": r["id"],
                "type": r["type"],
                "tenant": r["tenant_id"],
                "meter": r["meter"],
                "endpoint": r["endpoint"],
                "state": r["state"],
                "attempts": int(r["attempts"]),
                "created_at": iso_utc(r["created_at"]),
                "delivered_at": iso_utc(r["delivered_at"]) if r["delivered_at"] else None,
                "last_error": r["last_error"],
            }
            for r in rows
        ]
    }


async def requeue(request: web.Request, store: SignalStore) -> dict[str, Any]:
    """POST /admin/notifications/{signal}/requeue {"endpoint": url}: a dead one, due now."""
    try:
        body = await request.json()
    except ValueError:
        raise Refused(400, "bad-body", "the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("endpoint"), str):
        raise Refused(422, "bad-body", 'the body must be {"endpoint": "<the webhook URL>"}')
    signal = request.match_info["signal"]
    if not await store.requeue(signal, body["endpoint"], datetime.now(UTC)):
        raise Refused(404, "not-dead", "no dead notification of this signal to this endpoint")
    return {"signal": signal, "endpoint": body["endpoint"], "state": PENDING}
