"""Private Redis and PostgreSQL server processes on free ports.

Started from the installed binaries so that fault tests can stop, kill, pause
and restart them without touching the machine's shared servers.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, so at most 55535."""
    for _ in range(100):
        port = random.randrange(20_000, 55_535)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Until something listens on 127.0.0.1:`port`; an error if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s}s")


class _Process:
    """Signals shared by both servers."""

    proc: subprocess.Popen[bytes] | None = None
    stop_signal = signal.SIGTERM
    dir: Path

    def start(self) -> _Process:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill it and remove its files."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "server is not running"
        self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its connections open."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, no chance to flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """A clean shutdown, and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class RedisServer(_Process):
    """A redis-server with AOF in its own directory; data survives restarts."""

    def __init__(self, *, appendonly: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.appendonly = appendonly
        self.extra = extra

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (the test command installs it)"
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(self.dir), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.dir / "redis.log"), *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 10, self.proc)
        return self


_CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000")


class RedisCluster:
    """Three redis-server primaries made one Redis Cluster by `redis-cli --cluster create`."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = [RedisServer(appendonly=False, extra=_CLUSTER_ARGS) for _ in range(nodes)]
        for node in self.nodes:
            node.port = _cluster_port()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.extra = (*node.extra, "--cluster-config-file", str(node.dir / "nodes.conf"))
            node.start()
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed (the test command installs redis-server)"
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(self._ready(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        cli = shutil.which("redis-cli") or "redis-cli"
        out = subprocess.run(
            [cli, "-p", str(node.port), "cluster", "info"], capture_output=True, text=True
        ).stdout
        return "cluster_state:ok" in out

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    assert initdb, "PostgreSQL server binaries are not installed (the test command installs them)"
    return Path(initdb).parent


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


class PostgresServer(_Process):
    """A private postgres cluster; runs as the `postgres` user when we are root."""

    _template: Path | None = None  # one initdb per test session, copied per server
    # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to
    # disconnect (a pool never does); SIGINT is the "fast" one pg_ctl uses.
    stop_signal = signal.SIGINT

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.dir / "data"
        self._as_postgres = os.geteuid() == 0
        self._bindir = _pg_bindir()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict[str, object]:
        if not self._as_postgres:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)

    def _initdb(self) -> None:
        cls = type(self)
        if cls._template is None or not cls._template.exists():
            template = Path(tempfile.mkdtemp(prefix="gw-pg-template-"))
            self._chown(template)
            subprocess.run(
                [str(self._bindir / "initdb"), "-D", str(template / "data"), "-U", "postgres",
                 "-A", "trust", "-E", "UTF8", "--no-sync"],
                check=True, stdout=subprocess.DEVNULL, **self._run_as(),  # type: ignore[call-overload]
            )  # fmt: skip
            cls._template = template
        shutil.copytree(cls._template / "data", self.data)
        self.data.chmod(0o700)
        self._chown(self.dir)

    @classmethod
    def remove_template(cls) -> None:
        """Delete the initdb copied into every server (a test session leaves it to the OS)."""
        if cls._template is not None:
            shutil.rmtree(cls._template, ignore_errors=True)
            cls._template = None

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._initdb()
        args = [
            str(self._bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
        ]  # fmt: skip
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, **self._run_as())  # type: ignore[call-overload]
        log.close()
        _wait_ready(self, 30)
        return self


def _wait_ready(pg: PostgresServer, timeout_s: float) -> None:
    assert pg.proc is not None
    wait_port(pg.port, timeout_s, pg.proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = subprocess.run(
            [str(pg._bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg.port)],
            stdout=subprocess.DEVNULL,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("postgres did not become ready")
