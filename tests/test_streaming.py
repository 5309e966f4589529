"""Large bodies stream through a real `gateway serve` process with flat memory."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import gateway_config
from tests.procs import GatewayProcess, write_config
from tests.upstream import Upstream

GIB = 1024**3
BLOCK = bytes(range(256)) * 256  # 64 KiB, the same block the upstream sends
# Peak RSS may grow by socket and allocator buffers, never by the body.
FLAT_GROWTH_KIB = 48 * 1024


async def blocks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // len(BLOCK)):
        yield BLOCK


@pytest.mark.slow
async def test_a_gibibyte_each_way_with_flat_memory(upstream: Upstream, tmp_path: Path) -> None:
    routes = [
        {"name": "big", "match": {"path": "/**"}, "upstream": "app", "auth": "none",
         "max_body_bytes": 2 * GIB},
    ]  # fmt: skip
    config = gateway_config(upstream.url, routes=routes)
    gw = GatewayProcess(write_config(tmp_path / "gateway.yaml", config)).start()
    base = f"http://127.0.0.1:{gw.port}"
    try:
        async with aiohttp.ClientSession() as client:
            # Warm up both directions so that buffers and pools exist before the baseline.
            async with client.post(f"{base}/upload", data=blocks(16 * len(BLOCK) * 16)) as r:
                assert r.status == 200
            async with client.get(f"{base}/download?bytes={16 * 1024**2}") as r:
                await r.read()
            baseline_kib = gw.status_kib("VmHWM")

            started = time.perf_counter()
            async with client.post(f"{base}/upload", data=blocks(GIB)) as r:
                assert r.status == 200
                info = await r.json()
            upload_s = time.perf_counter() - started
            expected = hashlib.sha256()
            for _ in range(GIB // len(BLOCK)):
                expected.update(BLOCK)
            assert info == {"body_bytes": GIB, "body_sha256": expected.hexdigest()}

            started = time.perf_counter()
            received = 0
            async with client.get(f"{base}/download?bytes={GIB}&chunked=1") as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(1024 * 1024):
                    received += len(chunk)
            download_s = time.perf_counter() - started
            assert received == GIB
            peak_kib = gw.status_kib("VmHWM")
    finally:
        assert gw.stop() == 0
    growth_kib = peak_kib - baseline_kib
    print(
        f"\n1 GiB upload {upload_s:.1f}s ({GIB / upload_s / 1e6:.0f} MB/s), "
        f"download {download_s:.1f}s ({GIB / download_s / 1e6:.0f} MB/s); gateway peak RSS "
        f"{baseline_kib / 1024:.1f} MiB before, {peak_kib / 1024:.1f} MiB after "
        f"(+{growth_kib / 1024:.1f} MiB)"
    )
    assert growth_kib < FLAT_GROWTH_KIB
