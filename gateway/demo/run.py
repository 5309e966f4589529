"""`gateway demo`: the sample API and the gateway in one process."""

from __future__ import annotations

import asyncio
import signal
from importlib import resources
from pathlib import Path

from aiohttp import web

from gateway.config import GatewayConfig, load
from gateway.server import Gateway


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


def instructions(port: int, admin_port: int) -> str:
    """What to curl, printed when the demo is up."""
    base = f"http://127.0.0.1:{port}"
    return "\n".join(
        [
            f"The gateway is listening on {base} in front of the sample API.",
            "Try:",
            f"  curl -s {base}/v1/projects",
            f"  curl -s -X POST {base}/v1/projects -H 'Content-Type: application/json'"
            ' -d \'{"name": "apollo"}\'',
            f"  curl -s {base}/v1/projects/1",
            f"  curl -s -X POST {base}/v1/members -H 'Content-Type: application/json'"
            ' -d \'{"email": "ada@example.com"}\'',
            f"  curl -s --path-as-is {base}/v1/nowhere/../projects   # refused: 400 problem+json",
            f"  curl -s {base}/elsewhere                        # no route: 404 problem+json",
            f"  curl -s http://127.0.0.1:{admin_port}/metrics | grep gateway_requests",
            "Press Ctrl-C to stop.",
        ]
    )


async def run_demo(port: int, admin_port: int) -> None:
    """Start the sample API and the gateway; run until SIGINT or SIGTERM."""
    from gateway.demo.upstream import create_sample_app

    sample = web.AppRunner(create_sample_app(), access_log=None)
    await sample.setup()
    site = web.TCPSite(sample, "127.0.0.1", 0)
    await site.start()
    upstream_port = int(sample.addresses[0][1])
    gateway = Gateway(demo_config(upstream_port, port, admin_port))
    try:
        await gateway.start()
        print(instructions(gateway.port, gateway.admin_port), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await gateway.stop()
        await sample.cleanup()
