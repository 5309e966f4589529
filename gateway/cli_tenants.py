"""`gateway migrate`, `gateway tenants ...` and `gateway token`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from gateway.config import GatewayConfig
from gateway.ledger.db import LedgerUnavailable
from gateway.services import StartupError, make_bus, open_ledger
from gateway.tenant_ops import (
    TenantChangeError,
    TenantOps,
    api_key_json,
    parse_changes,
    tenant_json,
)
from gateway.usage.replay import quarantine_command


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2))


async def _migrate(config: GatewayConfig) -> int:
    ledger = await open_ledger(config, migrate=True)
    version = await ledger.schema_version()
    await ledger.close()
    print(f"ledger schema at version {version}")
    return 0


async def _tenants(config: GatewayConfig, args: argparse.Namespace) -> int:
    ledger = await open_ledger(config, migrate=False)
    bus = make_bus(config, ledger, None)
    ops = TenantOps(config, ledger, bus)
    try:
        return await _tenant_command(ledger, ops, args)
    except TenantChangeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await bus.close()
        await ledger.close()


async def _tenant_command(ledger: Any, ops: TenantOps, args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        _print([tenant_json(t) for t in await ledger.list_tenants(limit=args.limit)])
    elif action == "show":
        tenant = await ledger.get_tenant(args.id)
        if tenant is None:
            print(f"error: tenant {args.id!r} is not known", file=sys.stderr)
            return 1
        _print(
            {
                **tenant_json(tenant),
                "api_keys": [api_key_json(k) for k in await ledger.list_api_keys(args.id)],
            }
        )
    elif action == "put":
        fields = {
            k: v
            for k, v in vars(args).items()
            if k in ("plan", "status", "name", "stripe_customer", "disabled") and v is not None
        }
        tenant, created = await ops.put(args.id, parse_changes(fields))
        _print({**tenant_json(tenant), "created": created})
    elif action == "disable":
        disabled = await ops.disable(args.id)
        if disabled is None:
            print(f"error: tenant {args.id!r} is not known", file=sys.stderr)
            return 1
        _print(tenant_json(disabled))
    elif action == "create-key":
        created_key = await ops.create_key(args.id, args.name)
        if created_key is None:
            print(f"error: tenant {args.id!r} is not known", file=sys.stderr)
            return 1
        key, record = created_key
        print(f"# {args.id}: store this key now; it is not shown again", file=sys.stderr)
        _print({"key": key, **api_key_json(record)})
    elif action == "revoke-key":
        if not await ops.revoke_key(args.prefix):
            print(f"error: no active API key has prefix {args.prefix!r}", file=sys.stderr)
            return 1
        _print({"prefix": args.prefix, "revoked": True})
    return 0


def run_migrate(config: GatewayConfig) -> int:
    """Apply pending ledger migrations."""
    try:
        return asyncio.run(_migrate(config))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_tenants(config: GatewayConfig, args: argparse.Namespace) -> int:
    """One `gateway tenants` action."""
    try:
        return asyncio.run(_tenants(config, args))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_quarantine(config: GatewayConfig, replay: bool) -> int:
    """`gateway quarantine [--replay]`."""

    async def run() -> int:
        ledger = await open_ledger(config, migrate=False)
        try:
            return await quarantine_command(ledger, replay)
        finally:
            await ledger.close()

    try:
        return asyncio.run(run())
    except (StartupError, LedgerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_token(config: GatewayConfig, tenant: str, ttl_s: float) -> int:
    """Print a development token signed with the config's HS secret."""
    from gateway.auth.jwt import mint
    from gateway.auth.keys import KeyConfigError, hs_secret

    jwt = config.auth.jwt
    if jwt is None or jwt.secret_env is None:
        print(
            "error: auth.jwt.secret_env is not configured (tokens need an HS secret)",
            file=sys.stderr,
        )
        return 1
    try:
        secret = hs_secret(jwt)
    except KeyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extra: dict[str, Any] = {}
    if jwt.issuer:
        extra["iss"] = jwt.issuer
    if jwt.audience:
        extra["aud"] = jwt.audience[0]
    print(mint(secret, jwt.algorithms[0], jwt.tenant_claim, tenant, ttl_s, **extra))
    return 0


def add_parsers(sub: Any, load: Any) -> None:
    """Register the subcommands; `load` turns a path into a config or exits."""
    migrate = sub.add_parser("migrate", help="create or upgrade the ledger schema")
    migrate.add_argument("-c", "--config", required=True)
    migrate.set_defaults(func=lambda a: run_migrate(load(a.config)))

    tenants = sub.add_parser("tenants", help="list and change tenants and API keys")
    tenants.add_argument("-c", "--config", required=True)
    actions = tenants.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list")
    listing.add_argument("--limit", type=int, default=1000)
    actions.add_parser("show").add_argument("id")
    put = actions.add_parser("put", help="create a tenant or change the fields given")
    put.add_argument("id")
    put.add_argument("--plan")
    put.add_argument("--status")
    put.add_argument("--name")
    put.add_argument("--stripe-customer")
    put.add_argument("--disabled", type=lambda v: v.lower() in ("1", "true", "yes"))
    actions.add_parser("disable").add_argument("id")
    create_key = actions.add_parser("create-key", help="create an API key (shown once)")
    create_key.add_argument("id")
    create_key.add_argument("--name")
    actions.add_parser("revoke-key").add_argument("prefix")
    tenants.set_defaults(func=lambda a: run_tenants(load(a.config), a))

    quarantine = sub.add_parser(
        "quarantine", help="usage entries the ledger refused; --replay writes them again"
    )
    quarantine.add_argument("-c", "--config", required=True)
    quarantine.add_argument("--replay", action="store_true", help="write them again now")
    quarantine.set_defaults(func=lambda a: run_quarantine(load(a.config), a.replay))

    token = sub.add_parser("token", help="print a development JWT signed with the HS secret")
    token.add_argument("-c", "--config", required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.set_defaults(func=lambda a: run_token(load(a.config), a.tenant, a.ttl))
