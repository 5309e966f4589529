"""Gateway processes started the way users start them: `python -m gateway serve`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Self

import yaml

from tests.schema_check import assert_schema_accepts

_LISTENING = re.compile(r"listening on \w+://[^:]+:(\d+) \(admin on http://[^:]+:(\d+)\)")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a config file; every config the tests use also matches the JSON Schema."""
    assert_schema_accepts(data, str(path.name))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class GatewayProcess:
    """`python -m gateway serve -c FILE` in a child process."""

    command: tuple[str, ...] = ("serve",)
    ready = _LISTENING

    def __init__(
        self, config_file: Path, env: dict[str, str] | None = None, stdout: Path | None = None
    ) -> None:
        self.config_file = config_file
        self.stdout = stdout  # a file for the access log; else it is thrown away
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.admin_port = 0
        self.log_lines: list[str] = []
        self._drainer: threading.Thread | None = None

    def start(self, timeout_s: float = 20) -> Self:
        out = self.stdout.open("a") if self.stdout is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", *self.command, "-c", str(self.config_file)],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                env=self.env,
            )
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own copy
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"gateway exited early:\n{''.join(self.log_lines)}")
            self.log_lines.append(line)
            if m := self.ready.search(line):
                self.port = int(m.group(1))
                self.admin_port = int(m.group(2)) if m.re.groups > 1 else 0
                # Keep reading: a child blocked on a full stderr pipe would hang.
                self._drainer = threading.Thread(
                    target=self._drain, args=(self.proc.stderr,), daemon=True
                )
                self._drainer.start()
                return self
        raise TimeoutError("gateway did not report its ports")

    def _drain(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.log_lines.append(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status_kib(self, field: str) -> int:
        """A memory figure from /proc (VmRSS, VmHWM) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        if self._drainer is not None:
            self._drainer.join(10)
        elif self.proc.stderr is not None:
            self.proc.stderr.close()  # it died before reporting its ports
        self.proc = None

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        if self._drainer is not None:
            self._drainer.join(10)
        elif self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        return code


class WorkerProcess(GatewayProcess):
    """`python -m gateway worker -c FILE --consumer NAME`; `port` is its metrics port."""

    ready = re.compile(r"usage worker .*metrics on http://[^:]+:(\d+)/metrics")

    def __init__(self, config_file: Path, consumer: str, env: dict[str, str] | None = None):
        super().__init__(config_file, env)
        self.command = ("worker", "--consumer", consumer)
