"""CPU per request of the access log, in process: one line of a request as the
proxy benchmark sends it (wrk's headers, a tenant, a forwarded answer), encoded
and written through the line buffer to /dev/null, flushes included. Prints
microseconds per line for the JSON and text formats:

    python -m bench.access_log [--lines N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import TextIO, cast

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access_log import AccessLog, Outcome
from gateway.headers import TrustedProxies
from gateway.http.message import Connection, Request, Response
from gateway.lifecycle import run_loop
from gateway.logs import LineBuffer

_HEADERS = {
    "Host": "127.0.0.1:8080",
    "Authorization": "Bearer " + "x" * 180,
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


def _request() -> Request:
    headers = CIMultiDictProxy(CIMultiDict(_HEADERS))
    return Request(
        "GET", "/v1/projects/42?page=2", (1, 1), headers, "127.0.0.1", "http", None, False,
        cast(Connection, None),
    )  # fmt: skip


async def _round(sink: TextIO, text: bool, lines: int) -> float:
    """CPU microseconds per line."""
    log = AccessLog(LineBuffer(sink), text=text, trusted=TrustedProxies([]))
    request, response = _request(), Response(200, body=b"x" * 512)
    outcome = Outcome()
    outcome.tenant, outcome.quota_s, outcome.upstream_s = "tenant-00042", 0.00031, 0.00042
    started = time.process_time()
    for i in range(lines):
        log.write(request, "5f0c6a3e9b1d4c2e8a7f6b5c4d3e2f1a", "api", response, outcome, 0.001)
        if i % 64 == 0:
            await asyncio.sleep(0)  # let a due flush run, as between requests
    log.flush()
    return (time.process_time() - started) / lines * 1e6


async def main(sink: TextIO, lines: int, rounds: int) -> None:
    for name, text in (("json", False), ("text", True)):
        figures = [await _round(sink, text, lines) for _ in range(rounds)]
        print(f"access log {name}: {statistics.median(figures):.2f} µs/line (median of {rounds})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        run_loop(main(devnull, args.lines, args.rounds))
