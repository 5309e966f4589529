"""The access log: one line per request on the public listener, JSON or text.

It is on by default, so a line costs a few microseconds: no `logging` record,
no dict to serialize. The fields the gateway controls (the request id, method,
route name, decision, numbers, the peer's address) are safe as they are; every
string a client controls is written through `json_string`. The path is logged
without its query string, which is where clients put `api_key=`, `token=` and
the like; no header other than `traceparent` is logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config.models import GatewayConfig
from gateway.headers import TrustedProxies
from gateway.http.message import Request, Response
from gateway.logs import LineBuffer, json_string, timestamp

FORWARDED = "forwarded"  # answered by the upstream (whatever its status)
GATEWAY_ENDPOINT = "gateway-endpoint"  # /_gateway/: usage view, Stripe webhooks
IDEMPOTENT_REPLAY = "idempotent-replay"  # a stored answer, not forwarded
CLIENT_GONE = "client-gone"  # the client left before its body was read (499)
# Refusals are logged by their problem `type` suffix: "unauthenticated",
# "quota-exhausted", "rate-limited", "no-route", "upstream-timeout", ...

# A valid one has 55; what a client sends beyond this is cut, not logged.
_TRACEPARENT_CHARS = 64


class Outcome:
    """What the stages learned about one request, for its access-log line."""

    __slots__ = ("decision", "tenant", "quota_s", "upstream_s", "streamed_bytes")

    def __init__(self) -> None:
        self.decision = FORWARDED
        self.tenant: str | None = None  # once admitted
        self.quota_s: float | None = None  # the quota check and charge, once made
        self.upstream_s: float | None = None  # to the upstream's answer head (or failure)
        self.streamed_bytes = 0  # a streamed answer's body, counted as it was sent


class AccessLog:
    """Writes the line of each request to a `LineBuffer` (stdout)."""

    def __init__(
        self,
        out: LineBuffer,
        text: bool = False,
        trusted: TrustedProxies | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._out = out
        self._trusted = trusted or TrustedProxies([])
        self._proxied = bool(trusted and trusted.networks)  # some peers' X-Forwarded-For counts
        self._clock = clock
        self._text = text

    @classmethod
    def for_config(cls, config: GatewayConfig) -> AccessLog:
        """The access log `config.logging` asks for, on stdout."""
        trusted = TrustedProxies(config.server.trusted_proxies)
        return cls(LineBuffer(), text=config.logging.format == "text", trusted=trusted)

    def flush(self) -> None:
        """Write the buffered lines now (at shutdown)."""
        self._out.flush()

    def _client(self, request: Request) -> str:
        """The client's address, JSON-quoted: the peer, or what trusted proxies say."""
        peer = request.peer
        if not self._proxied or peer not in self._trusted:
            return f'"{peer}"'  # an IP address from the socket
        return json_string(
            self._trusted.client(peer, request.headers.getall("X-Forwarded-For", ()))
        )

    def write(
        self,
        request: Request,
        rid: str,
        route: str,
        response: Response,
        outcome: Outcome,
        total_s: float,
    ) -> None:
        """The line of one answered request (a streamed answer has been sent by now);
        the README's "Logs and the access log" describes its fields."""
        body = response.body
        sent = len(body) if type(body) is bytes else outcome.streamed_bytes
        tenant = outcome.tenant
        quota_s, upstream_s = outcome.quota_s, outcome.upstream_s
        tp = request.headers.get("traceparent")
        if self._text:  # the same fields; client strings quoted as in JSON
            line = (
                f"{timestamp(self._clock())} INFO gateway.access: {self._client(request)} "
                f"{request.method} {json_string(request.path)} {response.status} "
                f"{outcome.decision} route={route}"
                f" tenant={'-' if tenant is None else json_string(tenant)} request_id={rid}"
                f" traceparent={'-' if tp is None else json_string(tp[:_TRACEPARENT_CHARS])}"
                f" quota_ms={'-' if quota_s is None else f'{quota_s * 1000:.3f}'}"
                f" upstream_ms={'-' if upstream_s is None else f'{upstream_s * 1000:.3f}'}"
                f" total_ms={total_s * 1000:.3f}"
                f" bytes_in={request.body_bytes_read} bytes_out={sent}\n"
            )
        else:
            line = (
                f'{{"ts":"{timestamp(self._clock())}","level":"info","logger":"gateway.access",'
                f'"request_id":"{rid}",'
                f'"traceparent":{"null" if tp is None else json_string(tp[:_TRACEPARENT_CHARS])},'
                f'"tenant":{"null" if tenant is None else json_string(tenant)},'
                f'"route":"{route}","method":"{request.method}",'
                f'"path":{json_string(request.path)},"status":{response.status},'
                f'"decision":"{outcome.decision}",'
                f'"quota_ms":{"null" if quota_s is None else f"{quota_s * 1000:.3f}"},'
                f'"upstream_ms":{"null" if upstream_s is None else f"{upstream_s * 1000:.3f}"},'
                f'"total_ms":{total_s * 1000:.3f},'
                f'"bytes_in":{request.body_bytes_read},"bytes_out":{sent},'
                f'"client":{self._client(request)}}}\n'
            )
        self._out.write(line)
