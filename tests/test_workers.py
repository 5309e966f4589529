"""`server.workers: 2`: a supervisor and two gateway processes on one port.

Real processes throughout: the supervisor started as users start it, its two
processes, a private Redis and PostgreSQL, and a `gateway worker` writing the
usage into the ledger, so that "no usage lost" is read from the ledger itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import fresh_database
from tests.procs import write_config
from tests.servers import PostgresServer, RedisServer
from tests.upstream import Upstream
from tests.waiting import eventually
from tests.workers_rig import (
    AUTH,
    ENV,
    Rig,
    gone,
    process_metrics,
    requests_total,
    running_rig,
    sample,
    send,
    workers_config,
)


@pytest.fixture
async def rig(
    upstream: Upstream,
    redis_server: RedisServer,
    shared_postgres_server: PostgresServer,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    async with running_rig(upstream, redis_server.url, shared_postgres_server, tmp_path) as rig:
        yield rig


async def test_both_processes_serve_and_metrics_are_their_sum(rig: Rig) -> None:
    pids = rig.children()
    assert len(pids) == 2
    assert await send(rig.gateway.port, 200) == 200
    own = [requests_total(await process_metrics(pid)) for pid in pids]
    total = requests_total(await rig.metrics())
    print(f"\n200 requests on new connections: {own[0]} and {own[1]} per process")
    assert all(count > 0 for count in own), own  # the kernel gave both some connections
    assert sum(own) == total == 200
    assert await rig.ledger_reaches(200) == 200


async def test_sighup_ends_neither_the_supervisor_nor_a_process(rig: Rig) -> None:
    pids = rig.children()
    for _ in range(3):
        rig.gateway.signal(signal.SIGHUP)  # passed on to every process (each reloads)
        rig.worker.signal(signal.SIGHUP)  # as `pkill -HUP -f gateway` would: ignored, logged
        assert await send(rig.gateway.port, 20) == 20
    assert rig.children() == pids
    assert rig.gateway.proc is not None and rig.gateway.proc.poll() is None
    assert rig.worker.proc is not None and rig.worker.proc.poll() is None
    assert await rig.ledger_reaches(60) == 60  # the worker goes on writing
    told = [line for line in rig.worker.log_lines if "reads its config only at start" in line]
    assert len(told) == 3


async def test_a_killed_process_is_started_again_and_traffic_goes_on(rig: Rig) -> None:
    assert await send(rig.gateway.port, 20) == 20
    first, second = rig.children()
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: len(rig.children()) == 2 and first not in rig.children(), 20)
    assert second in rig.children()

    async def both_ready() -> bool:
        url = f"http://127.0.0.1:{rig.gateway.admin_port}/readyz"
        async with aiohttp.ClientSession() as client, client.get(url) as resp:
            return resp.status == 200 and (await resp.json())["processes_ready"] == 2

    await eventually(both_ready, 20)
    exposition = await rig.metrics()
    assert sample(exposition, "gateway_server_processes_running") == 2.0
    assert sample(exposition, "gateway_server_process_restarts_total") == 1.0
    # New connections reach the new process as well: all answered.
    assert await send(rig.gateway.port, 100) == 100
    assert any("exited with code -9; starting it again" in line for line in rig.gateway.log_lines)
    (replacement,) = set(rig.children()) - {second}
    assert requests_total(await process_metrics(replacement)) > 0


async def test_sigterm_finishes_what_is_in_flight_and_loses_no_usage(
    rig: Rig, upstream: Upstream
) -> None:
    assert await send(rig.gateway.port, 50) == 50
    pids = rig.children()
    in_flight = 10
    slow = asyncio.create_task(
        send(rig.gateway.port, in_flight, in_flight, "/v1/respond/slow?delay=1.5")
    )
    await eventually(lambda: len(upstream.arrived) == in_flight)
    rig.gateway.signal(signal.SIGTERM)
    assert await slow == in_flight  # every request in flight answered 200
    code = await asyncio.to_thread(rig.gateway.stop)
    assert code == 0
    assert all(gone(pid) for pid in pids)
    assert await rig.ledger_reaches(50 + in_flight) == 50 + in_flight


async def test_a_sigkilled_supervisor_takes_its_processes_with_it(rig: Rig) -> None:
    pids = rig.children()
    port = rig.gateway.port
    rig.gateway.kill()
    await eventually(lambda: all(gone(pid) for pid in pids), 20)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as client:
            await client.get(f"http://127.0.0.1:{port}/v1/things", headers=AUTH)


async def test_the_admin_api_through_the_supervisor_reaches_every_process(rig: Rig) -> None:
    base = f"http://127.0.0.1:{rig.gateway.admin_port}"
    token = {"Authorization": f"Bearer {ENV['GATEWAY_ADMIN_TOKEN']}"}
    async with aiohttp.ClientSession() as client:
        async with client.delete(f"{base}/admin/tenants/acme") as resp:
            assert resp.status == 401  # a process checked the token
            assert "WWW-Authenticate" in resp.headers
        async with client.delete(f"{base}/admin/tenants/acme", headers=token) as resp:
            assert resp.status == 200
        # One process made the change; the other hears of it through Redis.

        async def refused_by_both() -> bool:
            return await send(rig.gateway.port, 20) == 0

        await eventually(refused_by_both)
        body = {"disabled": False}
        async with client.put(f"{base}/admin/tenants/acme", json=body, headers=token) as resp:
            assert resp.status == 200
            assert (await resp.json())["disabled"] is False

        async def served_by_both() -> bool:
            return await send(rig.gateway.port, 20) == 20

        await eventually(served_by_both)
    # The console logs in through the supervisor and its session holds in every process.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        form = {"token": ENV["GATEWAY_ADMIN_TOKEN"]}
        url = f"{base}/console/login"
        async with browser.post(url, data=form, allow_redirects=False) as resp:
            assert resp.status == 303
        for _ in range(4):  # passed on to each process in turn
            async with browser.get(f"{base}/console/tenants", allow_redirects=False) as resp:
                assert resp.status == 200


async def login(base: str, source: str, token: str) -> int:
    """The status of a console login from the `source` address."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as client:
        url = f"{base}/console/login"
        async with client.post(url, data={"token": token}, allow_redirects=False) as resp:
            return resp.status


async def test_the_console_login_throttle_counts_each_client_address_once(rig: Rig) -> None:
    base = f"http://127.0.0.1:{rig.gateway.admin_port}"
    # Five wrong tokens a minute from one address, whichever process they reach; then
    # that address is refused, even with the right token.
    statuses = [await login(base, "127.0.0.2", "wrong") for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    assert await login(base, "127.0.0.2", ENV["GATEWAY_ADMIN_TOKEN"]) == 429
    # Another address is not: the processes see the client's address, not the supervisor's.
    assert await login(base, "127.0.0.3", ENV["GATEWAY_ADMIN_TOKEN"]) == 303
    # A client cannot name another address for itself.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.post(
            f"{base}/console/login", data={"token": ENV["GATEWAY_ADMIN_TOKEN"]},
            headers={"X-Gateway-Client-Address": "127.0.0.9"}, allow_redirects=False,
        ) as resp:  # fmt: skip
            assert resp.status == 429


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **ENV},
    )  # fmt: skip


def test_a_port_held_even_by_a_reuseport_listener_is_refused(
    upstream: Upstream, tmp_path: Path
) -> None:
    # Unreachable stores: the port is checked before any process starts.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = workers_config(upstream, "redis://127.0.0.1:1/0", "postgresql://x@127.0.0.1:1/x")
        data["server"]["port"] = port
        done = serve(write_config(tmp_path / "gateway.yaml", data))
    assert done.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port} (" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_process_that_cannot_start_stops_serve_with_its_error(
    upstream: Upstream,
    redis_server: RedisServer,
    shared_postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    async with fresh_database(shared_postgres_server) as dsn:  # not migrated
        data = workers_config(upstream, redis_server.url, dsn)
        done = await asyncio.to_thread(serve, write_config(tmp_path / "gateway.yaml", data))
    assert done.returncode == 1
    assert "gateway migrate" in done.stderr  # the process's own error
    assert "exited with code 1 while starting" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_process_that_does_not_stop_in_time_is_killed(
    upstream: Upstream,
    redis_server: RedisServer,
    shared_postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    async with running_rig(
        upstream, redis_server.url, shared_postgres_server, tmp_path, shutdown_timeout_s=0.5
    ) as rig:
        stuck, other = rig.children()
        os.kill(stuck, signal.SIGSTOP)  # it cannot act on SIGTERM
        assert await asyncio.to_thread(rig.gateway.stop, 60) == 0
        assert gone(stuck) and gone(other)
        assert any(
            f"gateway process pid {stuck} still running" in line for line in rig.gateway.log_lines
        )


def statuses(exposition: str) -> dict[str, int]:
    """`gateway_requests_total` by status, over its other labels."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name == "gateway_requests":
            for one in family.samples:
                if one.name == "gateway_requests_total":
                    status = one.labels["status"]
                    counts[status] = counts.get(status, 0) + int(one.value)
    return counts


async def test_a_sighup_under_load_reaches_both_processes_within_a_second(rig: Rig) -> None:
    """Steady load on both processes; a SIGHUP with a quota below what the tenant used:
    within a second every answer is a 402, from both processes, and none fails; then a
    broken file changes nothing, is logged once by each process and counted."""
    answers: list[tuple[float, int]] = []  # (when, status); -1 for a failed request
    stop = asyncio.Event()

    async def load() -> None:
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: both processes
        async with aiohttp.ClientSession(connector=connector) as client:
            while not stop.is_set():
                url = f"http://127.0.0.1:{rig.gateway.port}/v1/things"
                try:
                    async with client.get(url, headers=AUTH) as resp:
                        await resp.read()
                        answers.append((time.monotonic(), resp.status))
                except aiohttp.ClientError:
                    answers.append((time.monotonic(), -1))

    loaders = [asyncio.create_task(load()) for _ in range(4)]
    try:
        await asyncio.sleep(1.5)
        data = yaml.safe_load(rig.config.read_text())
        data["plans"]["big"]["limits"]["api_calls"]["limit"] = 1  # long used up
        rig.config.write_text(yaml.safe_dump(data))
        hup = time.monotonic()
        rig.gateway.signal(signal.SIGHUP)
        await asyncio.sleep(2.5)
        data["plans"]["big"]["limits"] = "not a mapping"  # a broken file
        rig.config.write_text(yaml.safe_dump(data))
        rig.gateway.signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    assert all(status in (200, 402) for _, status in answers), Counter(s for _, s in answers)
    before = [s for at, s in answers if at < hup]
    settled = [s for at, s in answers if at >= hup + 1.0]
    assert before and set(before) == {200}
    assert settled and set(settled) == {402}, Counter(settled)  # the broken file changed nothing
    for pid in rig.children():
        assert statuses(await process_metrics(pid)).get("402", 0) > 0, pid  # both processes
    merged = await rig.metrics()
    failures = [
        s.value for f in text_string_to_metric_families(merged) for s in f.samples
        if s.name == "gateway_config_reloads_total" and s.labels.get("result") == "failure"
    ]  # fmt: skip
    assert failures == [2.0]  # one failed reload in each of the two processes
    logged = [line for line in rig.gateway.log_lines if "config not reloaded" in line]
    assert len(logged) == 2, logged
    first_402 = min(at for at, s in answers if s == 402)
    print(f"\nSIGHUP under load: {len(answers)} answers, none failed; the first 402 "
          f"{(first_402 - hup) * 1000:.0f} ms after the signal")  # fmt: skip
