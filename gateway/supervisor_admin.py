"""The admin listener of a supervisor (`server.workers` > 1).

The supervisor answers `/healthz`, `/readyz` and `/metrics` itself, from what
its processes say on their private admin sockets. Everything else (the admin
API) is passed to one live process: each process already has the services the
API needs (ledger, caches, the invalidation bus that tells the other processes
of a change), so the supervisor opens no storage of its own and the API stays
one implementation. `POST /admin/reload` goes to every process, as a reload
must happen in each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.headers import SUPERVISED_CLIENT, own_headers, request_id
from gateway.merged_metrics import SAMPLES_PATH, Family, Merger, decode
from gateway.problems import Refused, web_answer

log = logging.getLogger("gateway")

_ASK_TIMEOUT_S = 2.0  # a process's readiness answer
_SCRAPE_TIMEOUT_S = 10.0  # a process's /metrics (large with many routes)
# Hop-by-hop and length headers: aiohttp sets its own on each side. Host is passed
# on: the process answers as if asked directly (links, cookies).
_NOT_PASSED = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", SUPERVISED_CLIENT.lower()}
)
_FAN_OUT = {("POST", "/admin/reload")}
# Always to the first live process: the console's login throttle counts every attempt
# in one place (round robin would grant each address one allowance per process).
_ONE_PLACE = {("POST", "/console/login")}


@dataclass
class Slot:
    """One of the supervisor's processes: its index, admin socket and current pid."""

    index: int
    socket_path: str
    pid: int | None = None  # None while it is (re)started


class Fleet:
    """What the supervisor's admin listener knows of the processes."""

    def __init__(self, slots: list[Slot], registry: CollectorRegistry) -> None:
        self.slots = slots
        self.registry = registry  # the supervisor's own metrics (restarts, processes running)
        self.draining = False
        self.merger = Merger()
        self._last: dict[int, list[Family]] = {}  # the last scrape, by pid
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._turn = itertools.count()

    def _session(self, slot: Slot) -> aiohttp.ClientSession:
        session = self._sessions.get(slot.index)
        if session is None:
            connector = aiohttp.UnixConnector(path=slot.socket_path)
            session = self._sessions[slot.index] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False
            )
        return session

    def live(self) -> list[Slot]:
        """The slots whose process runs now."""
        return [slot for slot in self.slots if slot.pid is not None]

    def exited(self, pid: int) -> None:
        """A process is gone: its counts stay in the totals (as of its last scrape)."""
        self.merger.retire(self._last.pop(pid, []))

    async def ready(self, slot: Slot) -> bool:
        """Whether the process in `slot` answers its /readyz with 200."""
        try:
            async with self._session(slot).get(
                "http://worker/readyz", timeout=aiohttp.ClientTimeout(total=_ASK_TIMEOUT_S)
            ) as resp:
                return resp.status == 200
        except (OSError, TimeoutError, aiohttp.ClientError):
            return False

    async def _scrape(self, slot: Slot) -> tuple[Slot, list[Family] | None]:
        pid = slot.pid
        try:
            async with self._session(slot).get(
                f"http://worker{SAMPLES_PATH}",
                timeout=aiohttp.ClientTimeout(total=_SCRAPE_TIMEOUT_S),
            ) as resp:
                body = await resp.read()
        except (OSError, TimeoutError, aiohttp.ClientError):
            return slot, None
        if pid is None or slot.pid != pid:
            return slot, None  # it exited meanwhile: its last scrape is already retired
        families = self._last[pid] = decode(body)
        return slot, families

    async def scrape(self) -> list[Metric]:
        """Every live process's metrics and the supervisor's own, merged."""
        answers = await asyncio.gather(*(self._scrape(slot) for slot in self.live()))
        # A process that did not answer counts with its last scrape, so the totals hold.
        scrapes = {
            slot.index: families if families is not None else self._last.get(slot.pid or 0, [])
            for slot, families in answers
        }
        return [*self.merger.merge(scrapes), *self.registry.collect()]

    async def forward(self, slot: Slot, request: web.Request, body: bytes) -> web.Response:
        """Pass `request` to the process in `slot`; its answer."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_PASSED}
        headers[SUPERVISED_CLIENT] = request.remote or ""  # in place of any the client sent
        async with self._session(slot).request(
            request.method,
            f"http://worker{request.path_qs}",
            headers=headers,
            data=body,
            allow_redirects=False,  # the client follows them, through the supervisor again
        ) as resp:
            payload = await resp.read()
            # A multidict: several Set-Cookie headers stay several.
            passed = CIMultiDict(
                (k, v) for k, v in resp.headers.items() if k.lower() not in _NOT_PASSED
            )
            return web.Response(status=resp.status, body=payload, headers=passed)

    def next_live(self) -> list[Slot]:
        """One live slot, in turn."""
        live = self.live()
        return [live[next(self._turn) % len(live)]] if live else []

    async def close(self) -> None:
        """Close the connections to the processes."""
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


FLEET = web.AppKey("fleet", Fleet)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the supervisor answers (it restarts its processes itself)."""
    fleet = request.app[FLEET]
    return web.json_response({"status": "ok", "processes": len(fleet.live())})


async def readyz(request: web.Request) -> web.Response:
    """Ready while not draining and at least one process is ready: each one serves the
    whole port (SO_REUSEPORT), so one being restarted does not take the node out."""
    fleet = request.app[FLEET]
    answers = await asyncio.gather(*(fleet.ready(slot) for slot in fleet.live()))
    body = {"processes_ready": sum(answers), "processes": len(fleet.slots)}
    if fleet.draining or not any(answers):
        return web.json_response({"status": "not ready", **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def metrics(request: web.Request) -> web.Response:
    """The sum over the processes (see gateway.merged_metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(await request.app[FLEET].scrape()))
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def passed_on(request: web.Request) -> web.Response:
    """The admin API, answered by a process (every process for a reload)."""
    fleet = request.app[FLEET]
    body = await request.read()
    fan_out = (request.method, request.path) in _FAN_OUT
    if fan_out:
        targets = fleet.live()
    elif (request.method, request.path) in _ONE_PLACE:
        targets = fleet.live()[:1]
    else:
        targets = fleet.next_live()
    rid = request_id(request.headers)
    if not targets:
        return web_answer(Refused(503, "unavailable", "no gateway process is running"), rid)
    answers = await asyncio.gather(
        *(fleet.forward(slot, request, body) for slot in targets), return_exceptions=True
    )
    for slot, answer in zip(targets, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("gateway process %d did not answer %s %s", slot.index, request.method,
                        request.path)  # fmt: skip
            detail = f"gateway process {slot.index} did not answer"
            return web_answer(Refused(503, "unavailable", detail), rid)
    # The first refusal, if any process refused: a reload must have worked in all.
    responses = [a for a in answers if isinstance(a, web.Response)]
    return next((r for r in responses if r.status >= 300), responses[0])


def create_supervisor_metrics_app(fleet: Fleet) -> web.Application:
    """The supervisor's metrics listener (`metrics.port`): probes and the merged metrics,
    no admin API behind it."""
    app = web.Application()
    app.on_response_prepare.append(own_headers)
    app[FLEET] = fleet
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def create_supervisor_admin_app(fleet: Fleet) -> web.Application:
    """The supervisor's admin application: the metrics listener's paths, and the rest
    passed on to the processes."""
    app = create_supervisor_metrics_app(fleet)
    app.router.add_route("*", "/{tail:.*}", passed_on)
    return app
