"""Keys of the contract whose behaviour is not built yet, refused rather than ignored.

A gateway that accepted `plans.*.limits` and enforced nothing would let a user
believe that their limits hold. Each entry goes away with the release that
builds it.
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config.models import GatewayConfig

NOT_YET = "not supported yet"


def unsupported(cfg: GatewayConfig) -> Iterator[tuple[str, str]]:
    """Yield (path, message) for every key set whose behaviour is not built yet."""
    for section in ("meters", "usage", "stripe"):
        if section in cfg.model_fields_set:
            yield section, NOT_YET
    for name, plan in cfg.plans.items():
        for key in ("limits", "rate_limits", "shadow"):
            if key in plan.model_fields_set:
                yield f"plans.{name}.{key}", NOT_YET
    if cfg.metrics.tenant_label:
        yield "metrics.tenant_label", NOT_YET
    if cfg.server.workers > 1:
        yield "server.workers", f"more than one worker is {NOT_YET}"
    for key in ("queue", "shards", "timeout_ms", "on_counter_store_error"):
        if key in cfg.storage.model_fields_set:
            yield f"storage.{key}", NOT_YET
    for i, route in enumerate(cfg.routes):
        for key in ("charge", "charge_on", "shadow"):
            if key in route.model_fields_set:
                yield f"routes[{i}].{key}", NOT_YET
