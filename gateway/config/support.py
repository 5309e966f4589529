"""Keys of the contract whose behaviour is not built yet, refused rather than ignored.

A gateway that accepted such a key and did nothing with it would let a user
believe that it works. Each entry goes away with the release that builds it.
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config.models import GatewayConfig


def unsupported(cfg: GatewayConfig) -> Iterator[tuple[str, str]]:
    """Yield (path, message) for every key set whose behaviour is not built yet."""
    # Nothing is refused at the moment; the check stays for the next such key.
    yield from ()
