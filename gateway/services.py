"""The long-lived resources behind authentication: ledger, caches, keys, bus."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.auth.authenticate import Authenticator
from gateway.auth.jwks import JWKSKeys
from gateway.auth.jwt import JWTVerifier
from gateway.auth.keys import KeyConfigError, KeySource, StaticKeys
from gateway.config.models import AuthConfig, GatewayConfig
from gateway.directory import Directory
from gateway.invalidation import Bus, LedgerBus, RedisBus
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.records import Tenant
from gateway.ledger.schema import LATEST_VERSION
from gateway.ledger.store import Ledger
from gateway.metrics import AuthMetrics, LedgerMetrics

log = logging.getLogger("gateway")
SUBSCRIBE_TIMEOUT_S = 5.0


class StartupError(Exception):
    """A resource the config names cannot be used; the message says how to fix it."""


def needs_services(config: GatewayConfig) -> bool:
    """Whether any request or command needs tenants (and so the ledger)."""
    auth = config.auth
    return auth.jwt is not None or auth.api_keys.enabled or bool(config.tenants)


async def open_ledger(
    config: GatewayConfig, *, migrate: bool, metrics: LedgerMetrics | None = None
) -> Ledger:
    """Open the ledger; embedded SQLite migrates itself, PostgreSQL must be migrated."""
    url = config.storage.ledger
    try:
        ledger = await Ledger.open(url, metrics)
        if migrate or url.startswith("sqlite:"):
            await ledger.migrate()
        version = await ledger.schema_version()
    except LedgerUnavailable as exc:
        raise StartupError(f"storage.ledger: cannot reach the ledger: {exc}") from None
    if version < LATEST_VERSION:
        await ledger.close()
        raise StartupError(
            f"the ledger schema is at version {version} and this gateway needs "
            f"{LATEST_VERSION}: run `gateway migrate -c <config>` first"
        )
    return ledger


async def seed_tenants(config: GatewayConfig, ledger: Ledger) -> list[str]:
    """Create the config's seed tenants that do not exist yet (never overwrite); their ids."""
    created = []
    now = datetime.now(UTC)
    for seed in config.tenants:
        tenant = Tenant(
            id=seed.id,
            name=seed.name,
            plan=seed.plan,
            status=seed.status,
            status_changed_at=now,
            billing_anchor=seed.billing_anchor,
            stripe_customer=seed.stripe_customer,
            disabled=seed.disabled,
        )
        if await ledger.create_tenant_if_missing(tenant):
            created.append(seed.id)
        elif await ledger.get_tenant(seed.id) is None:
            owner = await ledger.tenant_by_customer(seed.stripe_customer or "")
            raise StartupError(
                f"tenants[{config.tenants.index(seed)}].stripe_customer: "
                f"{seed.stripe_customer} already belongs to tenant {owner.id if owner else '?'}"
            )
    return created


def make_bus(config: GatewayConfig, ledger: Ledger, directory: Directory | None) -> Bus:
    """Redis pub/sub when processes share a Redis, the ledger's change feed otherwise."""
    counters = config.storage.counters
    if counters.startswith(("redis:", "rediss:")):
        return RedisBus(counters, directory)
    return LedgerBus(ledger, directory)


@dataclass
class Auth:
    """Authentication as one config sets it up: a reload builds a new one (or keeps
    this one when `auth.jwt` and `auth.api_keys` did not change)."""

    config: AuthConfig
    authenticator: Authenticator
    jwks: JWKSKeys | None

    @classmethod
    async def open(
        cls,
        config: AuthConfig,
        directory: Directory,
        metrics: AuthMetrics | None = None,
        previous: Auth | None = None,
    ) -> Auth:
        """The authenticator of `config` (its JWKS fetched once); StartupError with the fix."""
        if previous is not None and (previous.config.jwt, previous.config.api_keys) == (
            config.jwt,
            config.api_keys,
        ):
            return previous
        jwks = None
        verifier = None
        if config.jwt is not None:
            jwt_config = config.jwt
            keys: KeySource
            if jwt_config.jwks_url is not None:
                jwks = JWKSKeys(
                    jwt_config.jwks_url,
                    jwt_config.algorithms,
                    jwt_config.jwks_refresh_s,
                    jwt_config.jwks_refetch_min_s,
                    metrics=metrics,
                )
                keys = jwks
            else:
                try:
                    keys = StaticKeys.from_config(jwt_config)
                except KeyConfigError as exc:
                    raise StartupError(f"auth.jwt: {exc}") from None
            verifier = JWTVerifier(jwt_config, keys)
        api_keys = config.api_keys
        authenticator = Authenticator(
            verifier, directory, api_keys.header if api_keys.enabled else None
        )
        if jwks is not None:
            await jwks.start()
        return cls(config, authenticator, jwks)

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.stop()


@dataclass
class Services:
    """What tenants need for as long as the process runs: the ledger, its cache, the bus."""

    ledger: Ledger
    directory: Directory
    bus: Bus

    @classmethod
    async def open(
        cls, config: GatewayConfig, ledger_metrics: LedgerMetrics | None = None
    ) -> Services:
        """Open the ledger, seed the tenants, listen for changes; StartupError with the fix."""
        ledger = await open_ledger(config, migrate=False, metrics=ledger_metrics)
        try:
            await seed(config, ledger)
        except StartupError:
            await ledger.close()
            raise
        directory = Directory(
            ledger, config.storage.cache_ttl_s, max_entries=config.storage.cache_entries
        )
        bus = make_bus(config, ledger, directory)
        # Serving before listening could miss a change made in between.
        if isinstance(bus, RedisBus) and not await bus.wait_subscribed(SUBSCRIBE_TIMEOUT_S):
            log.warning("not yet listening for tenant changes; caches rely on their TTL")
        return cls(ledger, directory, bus)

    async def close(self) -> None:
        await self.bus.close()
        await self.directory.close()
        await self.ledger.close()


async def seed(config: GatewayConfig, ledger: Ledger) -> list[str]:
    """Create the config's new seed tenants (at start and on reload), their ids;
    StartupError on failure."""
    try:
        created = await seed_tenants(config, ledger)
    except LedgerUnavailable as exc:
        raise StartupError(f"storage.ledger: {exc}") from None
    if created:
        log.info("created %d seed tenant(s) from the config", len(created))
    return created
