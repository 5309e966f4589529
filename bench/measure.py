"""What the proxy benchmark reads: load generators' figures, CPU time from /proc, TCP segments.

Every figure comes from outside the process it describes (wrk, hey, the
kernel), so the harness measures any proxy alike and needs nothing from the
gateway's own code.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import redis

# Debian puts nginx and haproxy in /usr/sbin, which a user's PATH may lack.
_SBIN = ":/usr/local/sbin:/usr/sbin:/sbin"


def binary(name: str) -> str:
    """The path of an installed program (scripts/bench installs the missing ones)."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + _SBIN)
    if path is None:
        raise SystemExit(f"{name} is not installed (scripts/bench installs it)")
    return path


# --- processes: CPU time and pinning ---------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # The command name may hold spaces and parentheses: the fields start after the last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, found by the parent pid of every process."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError):
                children[int(_stat_fields(int(entry.name))[1])].append(int(entry.name))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, ()))
    return tree


def cpu_s(root: int) -> float:
    """User plus system CPU seconds of `root` and its descendants (all their threads),
    with those of the descendants that have exited (PostgreSQL's come and go)."""
    ticks = 0
    for pid in process_tree(root):
        with suppress(OSError):
            fields = _stat_fields(pid)
            # utime, stime, cutime, cstime: fields 14 to 17 of stat; a child's own
            # figures move to its parent's cutime and cstime when it is reaped.
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """The resident set of one process (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KeyError(f"no VmRSS for {pid}")


# The target under test runs alone on TEST_CPU; everything else shares SHARED_CPU.
TEST_CPU, SHARED_CPU = 1, 0


def pin(root: int, cpu: int) -> None:
    """Every thread of `root` and its descendants onto `cpu` (what `taskset -a -p -c` does)."""
    for pid in process_tree(root):
        with suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with suppress(OSError):
                    os.sched_setaffinity(int(task.name), {cpu})


# --- Redis round trips --------------------------------------------------------------------


def segments_sent(pids: set[int], port: int) -> int:
    """TCP segments carrying data that `pids` have sent to 127.0.0.1:`port`, from `ss -ti`.

    A client writes a command, or a whole pipeline, in one send; with Nagle off
    (asyncio's default) each send below the MSS (64 KiB on loopback) leaves as
    one segment, so a segment is one round trip the client started.
    """
    ss = binary("ss")
    out = subprocess.run(
        [ss, "-tinpH", "state", "established", "(", "dport", "=", f":{port}", ")"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    total, counting = 0, False
    for line in out.splitlines():
        if "users:" in line:  # a socket's first line names its processes; its TCP info follows
            counting = any(int(p) in pids for p in re.findall(r"pid=(\d+)", line))
        elif counting and (m := re.search(r"\bdata_segs_out:(\d+)", line)):
            total += int(m.group(1))
    return total


def wait_drained(client: redis.Redis, streams: Sequence[str], timeout_s: float) -> None:
    """Until every consumer group has read and acknowledged everything in `streams`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        behind = 0
        for stream in streams:
            with suppress(redis.ResponseError):  # a shard nobody wrote to yet
                for group in client.xinfo_groups(stream):
                    behind += int(group["pending"]) + int(group.get("lag") or 0)
        if behind == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the usage worker did not catch up within {timeout_s}s")


# --- load generators ----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One load run's figures."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> Load:
    """The figures of `wrk --latency` output."""

    def number(pattern: str) -> float:
        m = re.search(pattern, out, re.M)
        return float(m.group(1)) if m else 0.0

    percentiles = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", out, re.M)
        if m is None:
            raise RuntimeError(f"no {pct}th percentile in the wrk output:\n{out}")
        percentiles[pct] = float(m.group(1)) * _UNIT_MS[m.group(2)]
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return Load(
        rps=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=percentiles["50"], p99_ms=percentiles["99"],
        requests=int(number(r"^\s*(\d+) requests in")),
        errors=int(number(r"Non-2xx or 3xx responses: (\d+)"))
        + (sum(int(n) for n in sockets.groups()) if sockets else 0),
    )  # fmt: skip


def wrk(url: str, duration_s: float, connections: int, script: Path, *args: str) -> Load:
    """`wrk -t1` closed-loop load with a Lua script (its arguments after `--`)."""
    command = [binary("wrk"), "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
               "-s", str(script), url, "--", *args]  # fmt: skip
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=duration_s + 30
    ).stdout
    return parse_wrk(out)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil without floats
    return sorted_values[int(rank) - 1]


# The stages of a request that the gateway's access log times (the rest: its own work).
STAGES = ("quota_ms", "upstream_ms", "own_ms")


def stages(access_log: Path, offset: int) -> dict[str, tuple[float, float]]:
    """p50 and p99 of each of STAGES over the access-log lines written after `offset`
    (bytes), of requests that were checked and forwarded; {} if there are none."""
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    with access_log.open("rb") as log:
        log.seek(offset)
        for line in log:
            record = json.loads(line)
            quota, upstream = record["quota_ms"], record["upstream_ms"]
            if quota is None or upstream is None:
                continue
            times["quota_ms"].append(quota)
            times["upstream_ms"].append(upstream)
            times["own_ms"].append(record["total_ms"] - quota - upstream)
    found = {stage: sorted(values) for stage, values in times.items() if values}
    return {stage: (percentile(v, 50), percentile(v, 99)) for stage, v in found.items()}


# One hey process ticks all its workers at once, sending bursts; single-worker
# processes started a fraction of an interval apart spread the requests evenly.
HEY_PROCESSES = 16


def hey(url: str, rate: float, duration_s: float, headers: list[str], out_dir: Path) -> Load:
    """`rate` requests/s in all from HEY_PROCESSES `hey -c 1 -q rate/N` processes, staggered.

    Each process sends with the next of `headers`; latencies come from their CSV output.
    """
    per_process = rate / HEY_PROCESSES
    procs: list[subprocess.Popen[bytes]] = []
    outputs = [out_dir / f"hey-{i}.csv" for i in range(HEY_PROCESSES)]
    try:
        for i, out in enumerate(outputs):
            command = [binary("hey"), "-z", f"{duration_s:g}s", "-c", "1",
                       "-q", f"{per_process:.3f}", "-o", "csv",
                       "-H", headers[i % len(headers)], url]  # fmt: skip
            with out.open("wb") as sink:
                procs.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT))
            time.sleep(1 / rate)
        for proc in procs:
            if proc.wait(duration_s + 30) != 0:
                raise RuntimeError(f"hey failed:\n{outputs[procs.index(proc)].read_text()}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    runs = [list(csv.DictReader(out.read_text().splitlines())) for out in outputs]
    rows = [row for run in runs for row in run]
    if not rows:
        raise RuntimeError("hey answered nothing")
    latencies_ms = sorted(float(r["response-time"]) * 1000 for r in rows)
    # The rate achieved: each process's requests over the time it spent sending them.
    rps = sum(len(run) / float(run[-1]["offset"]) for run in runs if float(run[-1]["offset"]))
    return Load(
        rps=rps,
        p50_ms=percentile(latencies_ms, 50), p99_ms=percentile(latencies_ms, 99),
        requests=len(rows),
        errors=sum(1 for r in rows if not 200 <= int(r["status-code"]) < 400),
    )  # fmt: skip
