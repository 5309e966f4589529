"""Keys of the contract whose behaviour is not built yet, refused rather than ignored.

A gateway that accepted `metrics.tenant_label` and exported nothing would let
a user believe that their dashboards are complete. Each entry goes away with
the release that builds it.
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config.models import GatewayConfig

NOT_YET = "not supported yet"


def unsupported(cfg: GatewayConfig) -> Iterator[tuple[str, str]]:
    """Yield (path, message) for every key set whose behaviour is not built yet."""
    if cfg.metrics.tenant_label:
        yield "metrics.tenant_label", NOT_YET
    if cfg.server.workers > 1:
        yield "server.workers", f"more than one worker is {NOT_YET}"
