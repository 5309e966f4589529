"""The public application's keys: what its cleanup contexts open and its handlers read,
named once for the application, the admin listener, reload and the console."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import access_log as access
from gateway.billing.webhooks import Webhooks
from gateway.config.models import GatewayConfig
from gateway.metrics import AuthMetrics, ProxyMetrics, QuotaMetrics, WebhookMetrics
from gateway.pipeline.client_limits import ClientLimits
from gateway.pipeline.runtime import Live
from gateway.quota.engine import QuotaEngine
from gateway.services import Services
from gateway.signals.run import Watching

CONFIG = web.AppKey("config", GatewayConfig)  # the start config: what only a restart changes
LIVE = web.AppKey("live", Live)
SERVICES = web.AppKey("services", Services)
QUOTA = web.AppKey("quota", QuotaEngine)
QUOTA_METRICS = web.AppKey("quota_metrics", QuotaMetrics)
METRICS = web.AppKey("metrics", ProxyMetrics)
WEBHOOKS = web.AppKey("webhooks", Webhooks)
WEBHOOK_METRICS = web.AppKey("webhook_metrics", WebhookMetrics)
AUTH_METRICS = web.AppKey("auth_metrics", AuthMetrics)
REGISTRY = web.AppKey("registry", CollectorRegistry)
ACCESS_LOG = web.AppKey("access_log", access.AccessLog)
CLIENT_LIMITS = web.AppKey("client_limits", ClientLimits)
# On an admin application served on a process's private socket, which only its
# supervisor reaches: the supervisor names each request's client (SUPERVISED_CLIENT).
BEHIND_SUPERVISOR = web.AppKey("behind_supervisor", bool)
# The anomaly and forecast watch of an embedded `serve` (no `gateway worker` runs).
WATCHING = web.AppKey("watching", Watching)
