"""The command line as a user meets it: a version, and a clear error for a port in use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from gateway import __version__
from tests.conftest import gateway_config
from tests.procs import write_config


def gateway_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    done = gateway_command("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"gateway {__version__}")


def test_a_port_in_use_is_an_error_that_says_which_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = gateway_config("http://127.0.0.1:1", server={"host": "127.0.0.1", "port": port})
        done = gateway_command("serve", "-c", str(write_config(tmp_path / "g.yaml", data)))
    assert done.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port} (" in done.stderr
    assert "set another server.port" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_demo_on_a_port_in_use_says_which_and_how_to_pick_another(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--admin-port", "0"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
        )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port} (")
    assert done.stderr.endswith("(the demo's: --port, --admin-port)\n")


def test_a_missing_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    for command in ("serve", "worker"):
        done = gateway_command(command, "-c", str(missing))
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == f"{missing}: cannot read the file: No such file or directory\n"


def test_token_refuses_a_secret_serve_would_refuse(tmp_path: Path) -> None:
    data = gateway_config(
        "http://127.0.0.1:1", auth={"jwt": {"algorithms": ["HS256"], "secret_env": "CLI_SECRET"}}
    )
    config = str(write_config(tmp_path / "g.yaml", data))
    env = {**os.environ, "CLI_SECRET": "short"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "-c", config, "--tenant", "acme"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: environment variable CLI_SECRET must hold a secret of at least 32 bytes for HS256"
    )
    env["CLI_SECRET"] = "s" * 32
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "-c", config, "--tenant", "acme"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stderr, done.stdout.count(".")) == (0, "", 2)
