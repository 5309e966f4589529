"""`gateway demo` serves, and its printed curl lines work as printed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_prints_curl_lines_that_work() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                break
        commands = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(commands) == 7, lines
        outputs = [
            subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=10)
            for cmd in commands
        ]
        for cmd, out in zip(commands, outputs, strict=True):
            assert out.returncode == 0, (cmd, out.stderr)
        listed, created, fetched, member, bad, unrouted = (
            json.loads(o.stdout) for o in outputs[:6]
        )
        assert listed == {"projects": []}
        assert created == {"id": 1, "name": "apollo", "tenant": "public"}
        assert fetched == created
        assert member["email"] == "ada@example.com"
        assert (bad["status"], unrouted["status"]) == (400, 404)
        assert 'gateway_requests_total{method="POST",route="api",status="201"} 1.0' in (
            outputs[6].stdout
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0
