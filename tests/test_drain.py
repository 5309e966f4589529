"""`server.drain_delay_s`: after SIGTERM, /readyz answers 503 at once while the
listener goes on serving for the delay, so a load balancer stops sending first;
then what is in flight finishes and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.conftest import gateway_config
from tests.procs import GatewayProcess, write_config
from tests.servers import PostgresServer, RedisServer
from tests.upstream import Upstream
from tests.waiting import eventually
from tests.workers_rig import running_rig, send

DELAY_S = 3.0


async def readyz(admin_port: int) -> int:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{admin_port}/readyz") as resp,
    ):
        return resp.status


async def served_while_not_ready(gateway: GatewayProcess, upstream: Upstream) -> None:
    """SIGTERM with a request in flight: 503 on /readyz, new connections still served,
    the request in flight answered, exit 0."""
    assert await readyz(gateway.admin_port) == 200
    in_flight = asyncio.create_task(send(gateway.port, 1, path="/v1/respond/slow?delay=1"))
    await eventually(lambda: len(upstream.arrived) == 1)
    gateway.signal(signal.SIGTERM)

    async def not_ready() -> bool:
        return await readyz(gateway.admin_port) == 503

    await eventually(not_ready, DELAY_S / 2)
    # The listener still accepts: a balancer that has not noticed yet loses nothing.
    assert await send(gateway.port, 20) == 20
    assert await in_flight == 1
    assert gateway.proc is not None
    # Waited for, not stopped: a second SIGTERM would cut the delay short.
    assert await asyncio.to_thread(gateway.proc.wait, DELAY_S + 20) == 0


async def test_one_process_answers_not_ready_and_serves_through_the_delay(
    upstream: Upstream, tmp_path: Path
) -> None:
    data = gateway_config(
        upstream.url,
        server={"host": "127.0.0.1", "port": 0, "drain_delay_s": DELAY_S},
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
    )
    gateway = GatewayProcess(write_config(tmp_path / "gateway.yaml", data))
    await asyncio.to_thread(gateway.start)
    try:
        await served_while_not_ready(gateway, upstream)
    finally:
        gateway.stop()
    assert any("not ready; serving 3.0 s more" in line for line in gateway.log_lines)


async def test_a_supervisor_answers_not_ready_and_its_processes_serve_through_the_delay(
    upstream: Upstream,
    redis_server: RedisServer,
    shared_postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    async with running_rig(
        upstream, redis_server.url, shared_postgres_server, tmp_path, drain_delay_s=DELAY_S
    ) as rig:
        await served_while_not_ready(rig.gateway, upstream)
        assert await rig.ledger_reaches(21) == 21


async def test_a_second_signal_skips_the_rest_of_the_delay(
    upstream: Upstream, tmp_path: Path
) -> None:
    data = gateway_config(
        upstream.url,
        server={"host": "127.0.0.1", "port": 0, "drain_delay_s": 600},
        storage={"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
    )
    gateway = GatewayProcess(write_config(tmp_path / "gateway.yaml", data))
    await asyncio.to_thread(gateway.start)
    try:
        gateway.signal(signal.SIGINT)

        async def not_ready() -> bool:
            return await readyz(gateway.admin_port) == 503

        await eventually(not_ready)
        assert gateway.proc is not None and gateway.proc.poll() is None  # still in the delay
        gateway.signal(signal.SIGINT)  # a second Ctrl-C: no need to wait ten minutes
        assert await asyncio.to_thread(gateway.proc.wait, 30) == 0
    finally:
        gateway.stop()
