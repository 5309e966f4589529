"""A well-behaved client's latency and the gateway's memory with 500 slow or idle clients.

    flock /tmp/bench.lock .venv/bin/python -m bench.slow_clients [--slow 500] [--duration-s 30]

A `gateway serve` child process with production `server.limits` stands in
front of the test upstream (another child). One well-behaved client
(127.0.0.1) sends `--rate` requests/s over keep-alive connections, first alone,
then while `--slow` hostile clients (spread over 50 addresses, 127.0.1.x) stay
connected, reconnecting whenever the gateway cuts them, in five kinds:

- idle: one request, then a kept-alive connection that sends nothing;
- slow_head: a request head at one byte a second;
- small_body: a 1 KB upload at one byte a second;
- large_body: a 10 MB upload at 100 bytes a second (under the minimum rate);
- slow_reader: a 100 MB download read at 1 KB a second.

Printed: the well-behaved client's p50/p99 and errors in both phases, how
often the gateway cut each kind, the gateway's RSS (peak per phase) and the
CPU seconds it used per phase (from /proc: what the slow clients cost the
gateway itself, which the machine's other work does not change the way it
changes latencies). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.measure import cpu_s, percentile, rss_kib
from tests.procs import GatewayProcess, write_config
from tests.rawhttp import read_answer
from tests.servers import free_port, wait_port
from tests.upstream import Upstream, create_upstream_app

KINDS = ("idle", "slow_head", "small_body", "large_body", "slow_reader")
_ADDRESSES = [f"127.0.1.{n}" for n in range(1, 51)]
_WORKERS = 4  # the well-behaved client's connections


async def _serve_upstream(port: int) -> None:
    runner = web.AppRunner(create_upstream_app(Upstream()), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


async def _trickle(
    writer: asyncio.StreamWriter, data: bytes, every_s: float, stop: asyncio.Event, piece: int = 1
) -> None:
    for at in range(0, len(data), piece):
        if stop.is_set() or writer.is_closing():
            return
        writer.write(data[at : at + piece])
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def _slow_client(
    kind: str, port: int, address: str, stop: asyncio.Event, cuts: Counter[str]
) -> None:
    """One hostile client of `kind`, reconnecting whenever the gateway cuts it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0)
            )
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            if kind == "idle":
                writer.write(b"GET /v1/idle HTTP/1.1\r\nHost: bench\r\n\r\n")
                await read_answer(reader)
            elif kind == "slow_head":
                await _trickle(
                    writer, b"GET /v1/slow HTTP/1.1\r\n" + b"X-Slow: 1\r\n" * 100, 1.0, stop
                )
            elif kind == "small_body":
                writer.write(
                    b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000\r\n\r\n"
                )
                await _trickle(writer, b"x" * 1000, 1.0, stop)
            elif kind == "large_body":
                writer.write(
                    b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: 10000000\r\n\r\n"
                )
                await _trickle(writer, b"x" * 10_000_000, 1.0, stop, piece=100)
            else:  # slow_reader: ask for a large answer and read it slowly
                writer.write(b"GET /download?bytes=100000000 HTTP/1.1\r\nHost: bench\r\n\r\n")
            # Then stay connected, sending nothing more, until cut or stopped.
            slowly = kind == "slow_reader"
            waiting = asyncio.ensure_future(_read_slowly(reader) if slowly else reader.read(1))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiting, stopping):
                task.cancel()
            if not stop.is_set():
                cuts[kind] += 1
        except (OSError, asyncio.IncompleteReadError):
            cuts[kind] += 1
        finally:
            writer.close()


async def _read_slowly(reader: asyncio.StreamReader) -> None:
    """1 KB a second until the gateway closes the connection."""
    while True:
        if not await reader.read(1024):
            return
        await asyncio.sleep(1.0)


async def _well_behaved(port: int, rate: float, duration_s: float) -> tuple[list[float], int]:
    """Latencies (ms) of `rate` requests/s for `duration_s`, and the count of failures."""
    latencies: list[float] = []
    errors = 0
    interval_s = _WORKERS / rate
    url = f"http://127.0.0.1:{port}/v1/things"
    deadline = time.monotonic() + duration_s

    async def worker(session: aiohttp.ClientSession, offset_s: float) -> None:
        nonlocal errors
        await asyncio.sleep(offset_s)
        next_at = time.monotonic()
        while next_at < deadline:
            started = time.perf_counter()
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=_WORKERS)
    ) as session:
        await asyncio.gather(*(worker(session, i * interval_s / _WORKERS) for i in range(_WORKERS)))
    return sorted(latencies), errors


async def _peak_rss(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, rss_kib(pid))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    return peak


async def _phase(
    pid: int, port: int, rate: float, duration_s: float
) -> tuple[list[float], int, int, float]:
    """The well-behaved client's latencies and errors, the gateway's peak RSS and CPU seconds."""
    stop = asyncio.Event()
    rss = asyncio.ensure_future(_peak_rss(pid, stop))
    cpu_before = cpu_s(pid)
    latencies, errors = await _well_behaved(port, rate, duration_s)
    stop.set()
    return latencies, errors, await rss, cpu_s(pid) - cpu_before


def _line(name: str, latencies: list[float], errors: int, rss_kib_peak: int, cpu: float) -> str:
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return (
        f"{name:<9} requests {len(latencies):>5}  errors {errors:>3}  p50 {p50:6.2f} ms  "
        f"p99 {p99:6.2f} ms  gateway peak RSS {rss_kib_peak / 1024:6.1f} MiB, CPU {cpu:5.2f} s"
    )


async def _hostile(port: int, count: int) -> None:
    """`count` slow clients until SIGTERM; then one line: how often each kind was cut."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    cuts: Counter[str] = Counter()
    slow = [
        asyncio.ensure_future(
            _slow_client(KINDS[n % len(KINDS)], port, _ADDRESSES[n % len(_ADDRESSES)], stop, cuts)
        )
        for n in range(count)
    ]
    await asyncio.gather(*slow, return_exceptions=True)
    print(", ".join(f"{kind} {cuts[kind]}" for kind in KINDS), flush=True)


async def _run(args: argparse.Namespace, gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    pid, port = gateway.proc.pid, gateway.port
    await _well_behaved(port, args.rate, 2.0)  # warm up
    idle_rss = rss_kib(pid)
    alone = await _phase(pid, port, args.rate, args.duration_s)
    # The slow clients run in a process of their own: in this one their work would
    # delay the well-behaved client's own loop and show as the gateway's latency.
    hostile = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.slow_clients", "--hostile-port", str(port),
        "--slow", str(args.slow), stdout=subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(3.0)  # all connected and sending
    loaded = await _phase(pid, port, args.rate, args.duration_s)
    hostile.terminate()
    cuts, _ = await asyncio.wait_for(hostile.communicate(), 30)
    print(
        f"gateway RSS at rest {idle_rss / 1024:.1f} MiB; well-behaved client at {args.rate:g} req/s"
    )
    print(_line("alone", *alone))
    print(_line(f"{args.slow} slow", *loaded))
    ratio = percentile(loaded[0], 99) / percentile(alone[0], 99)
    print(f"p99 loaded / alone: {ratio:.2f}x")
    print(f"slow clients cut by the gateway (each then reconnected): {cuts.decode().strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slow", type=int, default=500, help="slow or idle clients")
    parser.add_argument("--duration-s", type=float, default=30.0, help="each phase")
    parser.add_argument("--rate", type=float, default=100.0, help="well-behaved requests/s")
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hostile-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_port:
        asyncio.run(_serve_upstream(args.upstream_port))
        return
    if args.hostile_port:
        asyncio.run(_hostile(args.hostile_port, args.slow))
        return
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        up_port = free_port()
        # Its stderr would fill with the downloads cut when the clients leave.
        upstream = subprocess.Popen(
            [sys.executable, "-m", "bench.slow_clients", "--upstream-port", str(up_port)],
            stderr=subprocess.DEVNULL,
        )
        gateway = None
        try:
            wait_port(up_port, 10, upstream)
            config = {
                "server": {"host": "127.0.0.1", "port": free_port()},
                "admin": {"host": "127.0.0.1", "port": free_port()},
                "logging": {"access_log": False},
                "storage": {"ledger": f"sqlite:///{Path(tmp) / 'ledger.db'}"},
                "upstreams": {"app": {"url": f"http://127.0.0.1:{up_port}"}},
                "routes": [
                    {"name": "all", "match": {"path": "/**"}, "upstream": "app", "auth": "none"}
                ],
            }
            gateway = GatewayProcess(
                write_config(Path(tmp) / "gateway.yaml", config), env=dict(os.environ)
            )
            gateway.start()
            asyncio.run(_run(args, gateway))
        finally:
            if gateway is not None:
                gateway.stop()
            upstream.terminate()
            upstream.wait(10)


if __name__ == "__main__":
    main()
