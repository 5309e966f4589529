"""Forwarding to upstreams: pooled connections, streamed bodies, mapped failures."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.access_log import Outcome
from gateway.config.models import UpstreamConfig
from gateway.headers import (
    TrustedProxies,
    add_via,
    client_key,
    end_to_end,
    upstream_request_headers,
)
from gateway.http.message import Body, ClientDisconnected, Request, Response
from gateway.metrics import ProxyMetrics
from gateway.pipeline.upstream_client import UpstreamClient, UpstreamResponse
from gateway.pipeline.upstream_conn import FailureKind, UpstreamError
from gateway.pipeline.upstream_share import OverShare
from gateway.problems import Refused, answer

# aiohttp adds these when the caller does not; a proxy must send only what the
# client sent (WebSocket handshakes still go through aiohttp).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# A response up to this size with a Content-Length is read whole and sent in
# one write (headers and body together), and an upstream failure while reading
# it can still be answered with a proper 502/504.
_BUFFER_MAX_BYTES = 64 * 1024
# A request body up to this size (by its Content-Length) is read whole before an
# upstream connection is taken, as nginx's request buffering does: a client that
# sends it slowly then holds only its own connection, not one of the pool's.
PREREAD_MAX_BYTES = 64 * 1024


class BodyTooLarge(Exception):
    """A request body passed its limit while it was being streamed."""


class LimitedBody:
    """The client's body as an async iterator that stops at `limit` bytes.

    Raising from inside the upload makes the upstream client abort the
    connection before the final chunk (or short of the length), so the upstream sees an aborted
    request, never a short body that looks complete.
    """

    def __init__(self, request: Request, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.exceeded = False
        # The client's own failure (it left, or went silent) while its body was read:
        # the upstream then sees an aborted upload, but the answer is the client's.
        self.client_error: ClientDisconnected | None = None

    async def read(self) -> bytes | None:
        """The whole body, or None when it passes the limit (to hash it before sending)."""
        try:
            return b"".join([chunk async for chunk in self])
        except BodyTooLarge:
            return None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        while True:
            try:
                chunk = await self._request.read_chunk()
            except ClientDisconnected as exc:
                self.client_error = exc
                raise
            if not chunk:
                return
            received += len(chunk)
            if received > self._limit:
                self.exceeded = True
                raise BodyTooLarge
            yield chunk


class Upstream:
    """One upstream: its base URL and its pooled connections.

    Forwarded requests go through `client`, our own HTTP/1.1 client (see
    `upstream_client`); WebSocket upgrades through an aiohttp session.
    """

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        parts = urlsplit(config.url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.host_header = parts.netloc
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            cafile = str(config.ca_file) if config.ca_file else None
            self._ssl = ssl.create_default_context(cafile=cafile)
        self.client = UpstreamClient(
            parts.hostname or "",
            parts.port or (443 if parts.scheme == "https" else 80),
            self._ssl,
            max_connections=config.max_connections,
            max_per_client=config.max_connections_per_client or max(1, config.max_connections // 2),
            connect_timeout_s=config.connect_timeout_s,
            timeout_s=config.timeout_s,
            total_timeout_s=config.total_timeout_s,
            host_header=self.host_header,
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def websocket_session(self) -> aiohttp.ClientSession:
        """The aiohttp session that opens WebSocket connections upstream."""
        # Created on first use so that it binds to the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.config.max_connections, limit_per_host=0, ssl=self._ssl or True
                ),
                timeout=aiohttp.ClientTimeout(
                    total=self.config.total_timeout_s,
                    connect=self.config.connect_timeout_s,
                    sock_read=self.config.timeout_s,
                ),
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                # Cookies belong to the clients; a shared jar would leak them between tenants.
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    def url(self, raw_path_qs: str) -> URL:
        """The upstream URL, the client's path and query kept byte for byte."""
        return URL(self.origin + self.base_path + raw_path_qs, encoded=True)

    async def close(self) -> None:
        await self.client.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What forwarding on one route needs, computed once per config, not per request."""

    name: str
    upstream: Upstream
    max_body_bytes: int
    skip_headers: frozenset[str]  # request headers not forwarded as they came
    bearer_skip: frozenset[str]  # the same when the gateway verified the bearer token
    preflight_skip: frozenset[str]  # the same, plus credentials and framing (CORS preflights)
    websocket: bool
    auth_required: bool
    preflight: bool  # CORS preflights are forwarded (`cors: true`, or `auth: none`)


class Upstreams:
    """All configured upstreams, closed together."""

    def __init__(
        self, configs: Mapping[str, UpstreamConfig], previous: Upstreams | None = None
    ) -> None:
        # An upstream a reload leaves as it was keeps its pool (warm connections).
        kept = previous._by_name if previous is not None else {}
        self._by_name: dict[str, Upstream] = {
            name: up if (up := kept.get(name)) is not None and up.config == cfg
            else Upstream(name, cfg)
            for name, cfg in configs.items()
        }  # fmt: skip

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._by_name.values())

    async def close(self, keep: Upstreams | None = None) -> None:
        """Close every pool, but those `keep` (the next runtime's) uses too."""
        kept = {id(up) for up in keep} if keep is not None else set()
        await asyncio.gather(*(up.close() for up in self if id(up) not in kept))


class Forwarder:
    """Sends a matched request to its upstream and streams the answer back."""

    def __init__(self, trusted: TrustedProxies, metrics: ProxyMetrics) -> None:
        self._trusted = trusted
        self._metrics = metrics

    def headers(
        self,
        request: Request,
        plan: RoutePlan,
        rid: str,
        extra: Mapping[str, str] | None = None,
        skip: frozenset[str] | None = None,
    ) -> CIMultiDict[str]:
        """The headers to send upstream for `request`, with `extra` set by the gateway."""
        up = plan.upstream
        headers = upstream_request_headers(
            request.headers,
            peer=request.peer,
            trusted=self._trusted,
            scheme=request.scheme,
            host=request.headers.get("Host"),
            http_version=request.version,
            rid=rid,
            skip=plan.skip_headers if skip is None else skip,
            upstream_host=None if up.config.preserve_host else up.host_header,
        )
        if extra:
            headers.update(extra)
        return headers

    async def forward(
        self,
        request: Request,
        plan: RoutePlan,
        rid: str,
        *,
        upstream_extra: Mapping[str, str] | None = None,
        response_extra: Sequence[tuple[str, str]] = (),
        skip: frozenset[str] | None = None,
        data: Body | None = None,
        outcome: Outcome | None = None,
    ) -> Response:
        """Forward `request` on `plan`'s route; errors become problem responses.

        `upstream_extra` headers go to the upstream (the tenant), `response_extra`
        to the client (warnings); `skip` replaces the route's skipped headers;
        `data` is a body already read (and checked against the limit): bytes, or
        the pieces of a spooled one (sent with the client's framing). A
        streamed answer is sent to the client before this returns. `outcome`
        learns the upstream's time, a failure's kind and a stream's size.
        """
        up, limit = plan.upstream, plan.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return answer(body_too_large(limit), rid, outcome)
        body = LimitedBody(request, limit) if request.body_exists and data is None else None
        if body is not None and length is not None and length <= PREREAD_MAX_BYTES:
            data = await body.read()  # within the limit: checked above
            body = None
        headers = self.headers(request, plan, rid, upstream_extra, skip)
        client = client_key(
            self._trusted.client(request.peer, request.headers.getall("X-Forwarded-For", ()))
        )
        started = time.perf_counter()
        try:
            upstream_resp = await up.client.request(
                request.method,
                up.base_path + request.target,
                headers,
                body.__aiter__() if body else data,
                client,
            )
        except OverShare as exc:
            self._metrics.client_limited("upstream_share")
            busy = Refused(
                429, "too-many-in-flight",
                f"this client already has its share of requests to upstream {up.name!r} "
                f"under way ({exc}); retry when one has finished",
                headers={"Retry-After": "1"},
            )  # fmt: skip
            return answer(busy, rid, outcome)
        except UpstreamError as exc:
            if outcome is not None:
                outcome.upstream_s = time.perf_counter() - started
            return self._failed(plan, rid, body, exc.kind, outcome)
        elapsed_s = time.perf_counter() - started
        self._metrics.upstream_latency(up.name, elapsed_s)
        if outcome is not None:
            outcome.upstream_s = elapsed_s
        try:
            return await self._relay(
                request, upstream_resp, plan, rid, body, response_extra, outcome
            )
        finally:
            # Back to the pool only when the answer was read to its end.
            upstream_resp.release()

    def _failed(
        self,
        plan: RoutePlan,
        rid: str,
        body: LimitedBody | None,
        kind: FailureKind,
        outcome: Outcome | None,
    ) -> Response:
        """The problem response for an exchange that failed before we answered."""
        up = plan.upstream
        if body is not None and body.client_error is not None:
            raise body.client_error  # 408 for a silent client; nothing for a gone one
        if body is not None and body.exceeded:
            self._metrics.upstream_error(up.name, "body_limit")
            return answer(body_too_large(plan.max_body_bytes), rid, outcome)
        self._metrics.upstream_error(up.name, kind)
        if kind == "timeout":
            failure = Refused(
                504, "upstream-timeout", f"upstream {up.name!r} did not answer in time"
            )
        else:
            failure = Refused(
                502, "upstream-unreachable", f"upstream {up.name!r} could not be reached"
            )
        return answer(failure, rid, outcome)

    async def _relay(
        self,
        request: Request,
        upstream_resp: UpstreamResponse,
        plan: RoutePlan,
        rid: str,
        body: LimitedBody | None,
        response_extra: Sequence[tuple[str, str]],
        outcome: Outcome | None,
    ) -> Response:
        headers = end_to_end(upstream_resp.headers)
        add_via(headers, upstream_resp.version)
        headers["X-Request-Id"] = rid
        headers.extend(response_extra)
        status, reason = upstream_resp.status, upstream_resp.reason
        length = upstream_resp.content_length
        if (
            length is not None
            and length <= _BUFFER_MAX_BYTES
            and request.method != "HEAD"  # its Content-Length describes a body not sent
            and status not in (204, 304)
        ):
            try:
                payload = await upstream_resp.read()
            except UpstreamError as exc:
                return self._failed(plan, rid, body, exc.kind, outcome)
            return Response(status, headers, payload, reason)
        stream = self._stream(upstream_resp, plan, body, outcome)
        response = Response(status, headers, stream, reason)
        await request.respond(response)
        return response

    async def _stream(
        self,
        upstream_resp: UpstreamResponse,
        plan: RoutePlan,
        body: LimitedBody | None,
        outcome: Outcome | None,
    ) -> AsyncIterator[bytes]:
        """The answer's body as the upstream sends it. After the head went out, the
        only honest signal of a failure is a cut connection: the error propagates."""
        while True:
            try:
                chunk = await upstream_resp.read_chunk()
            except UpstreamError as exc:
                kind = "body_limit" if body is not None and body.exceeded else exc.kind
                self._metrics.upstream_error(plan.upstream.name, kind)
                raise
            if not chunk:
                return
            if outcome is not None:
                outcome.streamed_bytes += len(chunk)
            yield chunk


def body_too_large(limit: int) -> Refused:
    """413 for a body over `limit`. The connection is closed after it: the client may
    still be sending, and reading the rest to discard it costs as much as accepting it."""
    return Refused(
        413, "body-too-large", f"the request body is larger than {limit} bytes",
        close=True, limit=limit,
    )  # fmt: skip
