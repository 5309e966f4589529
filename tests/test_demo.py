"""`gateway demo` serves, and its printed curl lines work as printed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest


def _banner(stdout: IO[str]) -> list[str]:
    """The demo's lines up to its last, "Press Ctrl-C to stop." """
    lines = []
    for line in stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            break
    return lines


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_prints_curl_lines_that_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=tmp_path,  # the demo's SQLite ledger is created in the working directory
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = _banner(proc.stdout)
        commands = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(commands) == 7, lines
        outputs = [
            subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=10)
            for cmd in commands
        ]
        for cmd, out in zip(commands, outputs, strict=True):
            assert out.returncode == 0, (cmd, out.stderr)
        head, _, body = outputs[0].stdout.replace("\r\n", "\n").partition("\n\n")
        assert 'RateLimit-Policy: "api_calls";q=1000;w=' in head
        assert '"per_second";q=20;w=2' in head
        created, fetched, member, refused, api_key = (json.loads(o.stdout) for o in outputs[1:6])
        assert json.loads(body) == {"projects": []}
        assert created == {"id": 1, "name": "apollo", "tenant": "demo"}
        assert fetched == created
        assert member["email"] == "ada@example.com"
        assert refused["status"] == 401
        assert api_key["key"].startswith("gk_") and api_key["tenant"] == "demo"
        assert 'gateway_requests_total{method="POST",route="api",status="201"} 1.0' in (
            outputs[6].stdout
        )
        base = commands[0].split()[2].rsplit("/v1/", 1)[0]
        with_key = subprocess.run(
            ["curl", "-s", f"{base}/v1/projects", "-H", f"X-API-Key: {api_key['key']}"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert json.loads(with_key.stdout) == {"projects": [created]}
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()
    assert code == 0
    assert (tmp_path / "gateway-demo.db").exists()
    # It says where its state lives and how to start over; its normal path warns of nothing.
    state = (tmp_path / "gateway-demo.db").resolve()
    assert lines[-2] == (
        f"Usage and tenants are kept in {state} across runs; `gateway demo --reset` starts over."
    )
    logged = (tmp_path / "demo.log").read_text()
    assert " WARNING " not in logged and " ERROR " not in logged, logged


def test_demo_reset_deletes_its_state_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "gateway-demo.db").write_text("not a database: the reset removes it")
    (tmp_path / "gateway-demo.db-usage").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--reset", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = _banner(proc.stdout)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
    state = (tmp_path / "gateway-demo.db").resolve()
    assert lines[:2] == [f"deleted {state}", f"deleted {state}-usage"]
    assert code == 0 and "tenant 'demo'" in "\n".join(lines).lower()
