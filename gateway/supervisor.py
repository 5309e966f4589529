"""`gateway serve` with `server.workers` > 1: a parent that runs N gateway processes.

Each process is a fresh interpreter running the one-process gateway
(`gateway serve` with a placement), never a fork of a running event loop. All
of them listen on the public port with SO_REUSEPORT, and the kernel spreads
new connections over them. The supervisor holds the port bound (not
listening, so it is given no connection) from before the first process starts
to after the last one stops: port 0 becomes one concrete port for all, and no
other program takes it while a process restarts.

The supervisor serves the admin port (see gateway.supervisor_admin), starts
again a process that dies (with backoff, logged and counted), passes SIGHUP on
to every process, and on SIGTERM or SIGINT drains them all. Each process asks
the kernel for SIGTERM when the supervisor dies (`die_with_parent`), so a
SIGKILLed supervisor leaves no process behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from gateway.config.models import GatewayConfig
from gateway.process_metrics import SupervisorMetrics
from gateway.server import port_taken
from gateway.services import StartupError
from gateway.supervisor_admin import (
    Fleet,
    Slot,
    create_supervisor_admin_app,
    create_supervisor_metrics_app,
)

log = logging.getLogger("gateway")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_MARGIN_S = 10.0  # past drain_delay_s + shutdown_timeout_s, before a process is killed
_START_TIMEOUT_S = 120.0  # a process with many routes or tenants to create takes a while
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_STABLE_S = 60.0  # a process that ran this long before dying is restarted without delay


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM (a drain) when the supervisor dies; exit if it already has."""
    # A SIGHUP passed on while this process starts must not end it (the default
    # action); the process's own handler replaces this one once its loop runs.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the request was made
        raise SystemExit(1)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind host:port for SO_REUSEPORT listeners without listening; port 0 picks one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Bound before SO_REUSEPORT is set: a port another program (or another
        # gateway) listens on is refused here, not silently shared.
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


class Supervisor:
    """Runs `server.workers` gateway processes on one port until SIGTERM or SIGINT."""

    def __init__(self, config_file: str, config: GatewayConfig) -> None:
        self.config_file = config_file
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self._dir = Path(tempfile.mkdtemp(prefix="gateway-"))  # the processes' admin sockets
        slots = [Slot(i, str(self._dir / f"{i}.sock")) for i in range(config.server.workers)]
        self.fleet = Fleet(slots, self.registry)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self.port = 0
        self.admin_port = 0
        self.metrics_port = 0  # with `metrics.port` set
        self._metrics_runner: web.AppRunner | None = None

    async def _spawn(self, slot: Slot) -> None:
        # A dead process's stale socket file is replaced by the event loop's bind; the
        # directory is gone if the other processes had all stopped.
        os.makedirs(self._dir, exist_ok=True)
        # A session of its own: a Ctrl-C in the terminal reaches the supervisor
        # only, which drains each process once.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "-c", self.config_file,
            "--supervisor", str(os.getpid()), "--port", str(self.port),
            "--admin-socket", slot.socket_path,
            start_new_session=True,
        )  # fmt: skip
        self._procs[slot.index] = proc
        slot.pid = proc.pid
        self.metrics.running.set(len(self.fleet.live()))

    async def _started(self, slot: Slot) -> None:
        """Wait until the process in `slot` is ready; StartupError if it exits first."""
        proc = self._procs[slot.index]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not await self.fleet.ready(slot):
            if proc.returncode is not None:
                raise StartupError(
                    f"gateway process {slot.index} exited with code {proc.returncode} "
                    "while starting (its error is above)"
                )
            if time.monotonic() > deadline:
                raise StartupError(f"gateway process {slot.index} not ready after "
                                   f"{_START_TIMEOUT_S:.0f} s")  # fmt: skip
            await asyncio.sleep(0.05)

    async def _all_started(self) -> None:
        for slot in self.fleet.slots:  # they start in parallel; any order of waiting will do
            await self._started(slot)

    async def _watch(self, slot: Slot) -> None:
        """Start the process in `slot` again whenever it exits on its own."""
        quick_exits = 0
        while True:
            proc = self._procs[slot.index]
            started = time.monotonic()
            code = await proc.wait()
            self.fleet.exited(proc.pid)
            slot.pid = None
            self.metrics.running.set(len(self.fleet.live()))
            if self._stopping.is_set():
                return
            quick_exits = 0 if time.monotonic() - started >= _STABLE_S else quick_exits + 1
            delay_s = 0.0
            if quick_exits:  # dying again soon after its start: wait longer each time
                delay_s = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (quick_exits - 1))
            log.warning(
                "gateway process %d (pid %d) exited with code %d; starting it again in %.1f s",
                slot.index, proc.pid, code, delay_s,
            )  # fmt: skip
            self.metrics.restarts.inc()
            try:
                await asyncio.wait_for(self._stopping.wait(), delay_s)
                return
            except TimeoutError:
                pass
            await self._spawn(slot)

    def _stop(self) -> None:
        if self._stopping.is_set():  # a second signal: the processes skip their delay
            self._forward(signal.SIGTERM)
        self._stopping.set()

    def _forward(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def run(self) -> None:
        """Start the processes and the admin listener, supervise, drain on a signal."""
        server, admin = self.config.server, self.config.admin
        try:
            reserved = reserve_port(server.host, server.port)
        except OSError as exc:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise StartupError(port_taken("server", server.host, server.port, exc)) from None
        self.port = reserved.getsockname()[1]
        runner = web.AppRunner(
            create_supervisor_admin_app(self.fleet), access_log=None, shutdown_timeout=1
        )
        await runner.setup()
        watchers: list[asyncio.Task[None]] = []
        try:
            try:
                await web.TCPSite(runner, admin.host, admin.port).start()
            except OSError as exc:
                raise StartupError(port_taken("admin", admin.host, admin.port, exc)) from None
            self.admin_port = runner.addresses[0][1]
            if self.config.metrics.port is not None:
                self.metrics_port = await self._start_metrics(self.config.metrics.port)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            # Each process reloads its own config (gateway.reload). One still
            # importing, before it ignores SIGHUP, dies of it and is started again,
            # reading the new file: it had not listened yet, no connection is lost.
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
            for slot in self.fleet.slots:
                await self._spawn(slot)
            await _until_stopped(self._all_started(), self._stopping)
            watchers = [asyncio.create_task(self._watch(slot)) for slot in self.fleet.slots]
            scheme = "https" if server.tls else "http"
            log.info(
                "gateway listening on %s://%s:%d (admin on http://%s:%d), %d processes",
                scheme, server.host, self.port, admin.host, self.admin_port, len(watchers),
            )  # fmt: skip
            await self._stopping.wait()
        finally:
            self._stopping.set()
            await self._drain()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self.fleet.close()
            await runner.cleanup()
            if self._metrics_runner is not None:
                await self._metrics_runner.cleanup()
            reserved.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _start_metrics(self, port: int) -> int:
        host = self.config.metrics.host or self.config.admin.host
        runner = self._metrics_runner = web.AppRunner(
            create_supervisor_metrics_app(self.fleet), access_log=None, shutdown_timeout=1
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise StartupError(port_taken("metrics", host, port, exc)) from None
        return int(runner.addresses[0][1])

    async def _drain(self) -> None:
        """SIGTERM to every process; kill the ones not gone in time."""
        self.fleet.draining = True
        running = [p for p in self._procs.values() if p.returncode is None]
        if not running:
            return
        log.info("draining %d gateway processes", len(running))
        self._forward(signal.SIGTERM)
        server = self.config.server
        limit_s = server.drain_delay_s + server.shutdown_timeout_s + _STOP_MARGIN_S
        _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in running],
                                     timeout=limit_s)  # fmt: skip
        for proc in running:
            if proc.returncode is None:
                log.error("gateway process pid %d still running %.0f s after SIGTERM: killed",
                          proc.pid, limit_s)  # fmt: skip
                proc.kill()
        if late:
            await asyncio.wait(late)


async def _until_stopped(work: Coroutine[Any, Any, None], stopping: asyncio.Event) -> None:
    """Await `work` unless `stopping` is set first (then `work` is cancelled)."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stopping.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()
    else:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def supervise(config_file: str, config: GatewayConfig) -> None:
    """Blocking entry point of the supervisor (asyncio's own loop: it does little)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    asyncio.run(Supervisor(config_file, config).run())
