"""The `gateway` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from gateway import __version__
from gateway.cli_tenants import add_parsers
from gateway.config import ConfigError, GatewayConfig, json_schema, load
from gateway.config.models import LoggingConfig
from gateway.lifecycle import run_loop
from gateway.logs import configure


def _load_or_exit(path: str) -> GatewayConfig:
    try:
        return load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


def _load_process(path: str) -> GatewayConfig:
    """The config of a long-running command, its `logging` section applied."""
    config = _load_or_exit(path)
    configure(config.logging)
    return config


def _reporting(run: Callable[[], int | None]) -> int:
    """Run a long-lived command; a StartupError is printed with its fix, exit code 1."""
    from gateway.services import StartupError

    try:
        return run() or 0
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import Placement, run
    from gateway.supervisor import die_with_parent, supervise

    config = _load_process(args.config)
    if args.supervisor is not None:  # one of the processes of server.workers > 1
        die_with_parent(args.supervisor)
        placement = Placement(args.port, args.admin_socket)
        return _reporting(lambda: run(config, args.config, placement))
    if config.server.workers > 1:
        return _reporting(lambda: supervise(args.config, config))
    return _reporting(lambda: run(config, args.config))


def _worker(args: argparse.Namespace) -> int:
    from gateway.worker_process import run_worker

    config = _load_process(args.config)
    return _reporting(lambda: asyncio.run(run_worker(config, args.consumer)))


def _reconcile(args: argparse.Namespace) -> int:
    from gateway.worker_process import run_reconcile

    config = _load_process(args.config)
    return _reporting(lambda: asyncio.run(run_reconcile(config, args.fail_on_drift)))


def _stripe(args: argparse.Namespace) -> int:
    from gateway.billing.commands import run_stripe_reconcile, run_sync

    config = _load_process(args.config)
    command = run_sync if args.action == "sync" else run_stripe_reconcile
    return _reporting(lambda: asyncio.run(command(config)))


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.file)
    print(f"{args.file}: ok ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
    return 0


def _schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json_schema())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    return _reporting(lambda: run_loop(run_demo(args.port, args.admin_port, args.reset)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="gateway", description="A quota-enforcing API gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("-c", "--config", required=True, help="the YAML config file")
    # Set by the supervisor (server.workers > 1) on the processes it starts.
    serve.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--admin-socket", default="", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="write usage events from the queue into the ledger")
    worker.add_argument("-c", "--config", required=True, help="the YAML config file")
    worker.add_argument(
        "--consumer", help="this worker's name in the consumer group (default: the host name)"
    )
    worker.set_defaults(func=_worker)

    reconcile = sub.add_parser("reconcile", help="compare the counters with the ledger")
    reconcile.add_argument("-c", "--config", required=True, help="the YAML config file")
    reconcile.add_argument(
        "--fail-on-drift", action="store_true", help="exit 1 when any counter drifts"
    )
    reconcile.set_defaults(func=_reconcile)

    stripe = sub.add_parser("stripe", help="Stripe: pull subscriptions, compare reported usage")
    stripe_actions = stripe.add_subparsers(dest="action", required=True)
    for action, text in (
        ("sync", "apply every customer's current subscription (after missed webhooks)"),
        (
            "reconcile",
            "ledger totals against Stripe's meter event summaries; exit 1 on a difference",
        ),
    ):
        one = stripe_actions.add_parser(action, help=text)
        one.add_argument("-c", "--config", required=True, help="the YAML config file")
        one.set_defaults(func=_stripe)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=_check_config)

    schema = sub.add_parser("schema", help="print the JSON Schema of the config file")
    schema.set_defaults(func=_schema)

    add_parsers(sub, _load_or_exit)

    demo = sub.add_parser("demo", help="run the gateway in front of a bundled sample API")
    demo.add_argument("--port", type=int, default=8080, help="public port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9090, help="admin port (default 9090)")
    demo.add_argument(
        "--reset", action="store_true", help="delete the demo's ledger and journal first"
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    configure(LoggingConfig(format="text"))  # until a command's config says otherwise
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
