"""`gateway demo`: the sample API and the gateway in one process."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
from importlib import resources
from pathlib import Path

from aiohttp import web

from gateway.auth.jwt import mint
from gateway.config import GatewayConfig, load
from gateway.logs import configure
from gateway.server import Gateway
from gateway.services import StartupError
from gateway.usage.recorder import journal_directory


def demo_config_path() -> Path:
    """The packaged demo config (also in the repository as config/demo.yaml)."""
    return Path(str(resources.files("gateway.demo").joinpath("demo.yaml")))


def demo_config(upstream_port: int, port: int, admin_port: int) -> GatewayConfig:
    """The demo config, pointed at the sample API's actual port."""
    config = load(demo_config_path())
    app = config.upstreams["app"].model_copy(update={"url": f"http://127.0.0.1:{upstream_port}"})
    return config.model_copy(
        update={
            "server": config.server.model_copy(update={"port": port}),
            "admin": config.admin.model_copy(update={"port": admin_port}),
            "upstreams": {"app": app},
        }
    )


def demo_state(config: GatewayConfig) -> list[Path]:
    """Where the demo keeps its state: the SQLite ledger (with its WAL files) and
    the usage journal beside it."""
    ledger = Path(config.storage.ledger.removeprefix("sqlite:///")).resolve()
    files = [ledger, *(ledger.with_name(ledger.name + end) for end in ("-wal", "-shm"))]
    journal = journal_directory(config.usage.spool_dir, config.storage.ledger)
    return files + ([journal.resolve()] if journal is not None else [])


def reset_state(config: GatewayConfig) -> list[Path]:
    """Delete the demo's state (what `demo_state` names); the paths that existed."""
    removed = []
    for path in demo_state(config):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def instructions(port: int, admin_port: int, token: str, admin_token: str, ledger: str = "") -> str:
    """What to curl, printed when the demo is up."""
    base = f"http://127.0.0.1:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    auth = f"-H 'Authorization: Bearer {token}'"
    json_body = "-H 'Content-Type: application/json'"
    return "\n".join(
        [
            f"The gateway is listening on {base} in front of the sample API.",
            "Tenant 'demo' (plan free) has this token, valid for 24 hours:",
            f"  {token}",
            "Try:",
            f"  curl -si {base}/v1/projects {auth}            # see RateLimit-Policy, RateLimit",
            f'  curl -s -X POST {base}/v1/projects {auth} {json_body} -d \'{{"name": "apollo"}}\'',
            f"  curl -s {base}/v1/projects/1 {auth}",
            f"  curl -s -X POST {base}/v1/members {auth} {json_body}"
            ' -d \'{"email": "ada@example.com"}\'',
            f"  curl -s {base}/v1/projects                      # no credentials: 401",
            f"  curl -s -X POST {admin}/admin/tenants/demo/api-keys"
            f" -H 'Authorization: Bearer {admin_token}'   # an API key for X-API-Key",
            f"  curl -s {admin}/metrics | grep gateway_requests",
            *([f"Usage and tenants are kept in {ledger} across runs;"
               " `gateway demo --reset` starts over."] if ledger else []),
            "Press Ctrl-C to stop.",
        ]
    )  # fmt: skip


def _secret(name: str, size: int) -> str:
    # A made-up secret for this run unless the user set one.
    value = os.environ.get(name) or secrets.token_urlsafe(size)
    os.environ[name] = value
    return value


async def run_demo(port: int, admin_port: int, reset: bool = False) -> None:
    """Start the sample API and the gateway; run until SIGINT or SIGTERM."""
    from gateway.demo.upstream import create_sample_app

    packaged = load(demo_config_path())
    configure(packaged.logging)
    if reset:
        for path in reset_state(packaged):
            print(f"deleted {path}", flush=True)
    sample = web.AppRunner(create_sample_app(), access_log=None)
    await sample.setup()
    site = web.TCPSite(sample, "127.0.0.1", 0)
    await site.start()
    upstream_port = int(sample.addresses[0][1])
    config = demo_config(upstream_port, port, admin_port)
    assert config.auth.jwt is not None and config.auth.jwt.secret_env is not None
    secret = _secret(config.auth.jwt.secret_env, 48)
    admin_token = _secret(config.admin.token_env, 24)
    token = mint(secret, "HS256", config.auth.jwt.tenant_claim, "demo", 86400)
    gateway = Gateway(config)
    try:
        try:
            await gateway.start()
        except StartupError as exc:
            raise StartupError(f"{exc} (the demo's: --port, --admin-port)") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)  # before "Press Ctrl-C" is printed
        ledger = str(demo_state(config)[0])
        print(
            instructions(gateway.port, gateway.admin_port, token, admin_token, ledger), flush=True
        )
        await stop.wait()
    finally:
        await gateway.stop()
        await sample.cleanup()
