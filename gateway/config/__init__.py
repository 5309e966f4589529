"""The config contract: models, loading and validation."""

from gateway.config.loader import ConfigError, json_schema, load, parse
from gateway.config.models import GatewayConfig, RouteConfig, UpstreamConfig

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "RouteConfig",
    "UpstreamConfig",
    "json_schema",
    "load",
    "parse",
]
