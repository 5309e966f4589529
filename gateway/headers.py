"""Pure header rules of the proxy: hop-by-hop, forwarding, request ids."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from aiohttp import web

# RFC 9110 7.6.1, plus the proxy-only headers of RFC 9110 11.7 and the
# non-standard Proxy-Connection that old clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# The client's address as a supervisor saw it, on each request it passes to one of its
# processes' private admin sockets; set by the supervisor only (a client's copy is
# replaced), and read only on those sockets.
SUPERVISED_CLIENT = "X-Gateway-Client-Address"
# Set by the gateway itself; a client's copy would be believed upstream.
_SPOOFABLE = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded")
# Never forwarded, whoever sends them (README "Forwarded headers"): an upstream
# framework that honours one serves another path or method than the one routed
# and charged.
OVERRIDE_HEADERS = (
    "X-Original-URL", "X-Original-URI", "X-Rewrite-URL", "X-Override-URL",
    "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
    "X-Forwarded-Prefix", "X-Forwarded-Path", "X-Forwarded-Uri", "X-Forwarded-Port",
    "X-Forwarded-Server", "X-Forwarded-Scheme", "X-Forwarded-Ssl", "Front-End-Https", "X-Host",
)  # fmt: skip
# Client addresses in the spellings of other proxies and CDNs, never forwarded
# either (also not from `trusted_proxies`): the upstream learns the client from
# the X-Forwarded-For chain the gateway builds.
CLIENT_IP_HEADERS = (
    "X-Real-IP", "True-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP", "X-Client-IP",
    "X-Cluster-Client-IP", "X-Originating-IP", "X-Remote-IP", "X-Remote-Addr", "Client-IP",
    "X-ProxyUser-IP", "Forwarded-For", "X-Forwarded",
)  # fmt: skip
_REQUEST_SKIP = HOP_BY_HOP | {
    *_SPOOFABLE, *(h.lower() for h in (*OVERRIDE_HEADERS, *CLIENT_IP_HEADERS)), "host",
    "x-request-id",
}  # fmt: skip
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Request ids need to be unique, not secret: a PRNG seeded from the OS per
# process avoids a getrandom() system call on every request.
_ids = random.Random(os.urandom(32))

Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def connection_tokens(headers: Headers) -> set[str]:
    """Header names listed in `Connection`: hop-by-hop for this message only."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def request_skip(drop: Iterable[str] = ()) -> frozenset[str]:
    """Request headers not forwarded as they came: hop-by-hop, the ones the
    gateway sets itself, and `drop` (computed once per route, not per request)."""
    return _REQUEST_SKIP | {d.lower() for d in drop}


def end_to_end(headers: Headers, skip: frozenset[str] = HOP_BY_HOP) -> CIMultiDict[str]:
    """Copy the headers not in `skip` (lowercase) nor named in `Connection`.

    `X_Tenant_Id` is dropped with `X-Tenant-Id`: WSGI and CGI servers fold
    `_` and `-` into the same variable, so an underscore spelling would
    smuggle a header the gateway owns.
    """
    if "Connection" in headers:
        skip = skip | connection_tokens(headers)
    return CIMultiDict(
        [(k, v) for k, v in headers.items() if k.lower().replace("_", "-") not in skip]
    )


class TrustedProxies:
    """Which peers' `X-Forwarded-*` headers to believe."""

    def __init__(self, networks: Sequence[IPv4Network | IPv6Network]) -> None:
        self.networks = tuple(networks)

    def __contains__(self, addr: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ip_address(addr)
        except ValueError:
            return False
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def chain(self, peer: str, forwarded_for: Sequence[str]) -> list[str]:
        """The X-Forwarded-For chain to send on, ending with `peer`.

        A client's header is believed only when the peer is a trusted proxy;
        the client's own entries then stay in the chain as the proxies reported
        them, so the upstream sees the same list a direct hop would have sent.
        """
        if not forwarded_for or peer not in self:
            return [peer]
        entries = [e.strip() for value in forwarded_for for e in value.split(",") if e.strip()]
        return [*entries, peer]

    def client(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The client address: the first untrusted hop, read from the right."""
        # Each proxy appends what it saw, so only the entries to the right of
        # the last untrusted one were written by proxies we believe.
        for addr in reversed(self.chain(peer, forwarded_for)):
            if addr not in self:
                return addr
        return peer


def client_key(addr: str) -> str:
    """What per-client limits count by: the address, or for IPv6 its /64 (one
    subscriber's network: a client has its whole /64 to hop across)."""
    if ":" not in addr:
        return addr
    try:
        ip = ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(IPv6Network((ip, 64), strict=False))
    return addr


def single(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of header `name`; ValueError when it came more than once."""
    value = headers.get(name)
    # Plain mappings (benchmarks, tests) hold one value per name anyway.
    if value is not None and isinstance(headers, CIMultiDictProxy | CIMultiDict):
        if len(headers.getall(name)) > 1:
            raise ValueError(f"{name} was sent more than once")
    return value


def request_id(headers: Mapping[str, str]) -> str:
    """Keep a well-formed client `X-Request-Id`, otherwise make a new one."""
    given = headers.get("X-Request-Id")
    if given and _REQUEST_ID.match(given):
        return given
    return f"{_ids.getrandbits(128):032x}"


async def own_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` of the aiohttp listeners (admin, worker): no `Server` of
    our own (aiohttp adds its version), and `X-Request-Id` on every answer, also on
    those no middleware saw."""
    response.headers.popall("Server", None)
    response.headers.setdefault("X-Request-Id", request_id(request.headers))


def upstream_request_headers(
    incoming: Headers,
    *,
    peer: str,
    trusted: TrustedProxies,
    scheme: str,
    host: str | None,
    http_version: tuple[int, int],
    rid: str,
    skip: frozenset[str] = _REQUEST_SKIP,
    upstream_host: str | None = None,
) -> CIMultiDict[str]:
    """The headers the upstream receives for a client request; `skip` from `request_skip`."""
    out = end_to_end(incoming, skip)
    believed = peer in trusted
    chain = trusted.chain(peer, incoming.getall("X-Forwarded-For", ()))
    out["X-Forwarded-For"] = ", ".join(chain)
    proto = incoming.get("X-Forwarded-Proto") if believed else None
    out["X-Forwarded-Proto"] = proto or scheme
    fwd_host = incoming.get("X-Forwarded-Host") if believed else None
    if fwd_host or host:
        out["X-Forwarded-Host"] = fwd_host or host or ""
    if believed and "Forwarded" in incoming:
        for value in incoming.getall("Forwarded"):
            out.add("Forwarded", value)
    out["Host"] = upstream_host or host or ""
    out["X-Request-Id"] = rid
    add_via(out, http_version)
    return out


def add_via(headers: CIMultiDict[str], http_version: tuple[int, int]) -> None:
    """Append this hop to `Via` (RFC 9110 7.6.3)."""
    major, minor = http_version
    hop = f"{major}.{minor} gateway" if major == 1 else f"{major} gateway"
    if "Via" in headers:
        hop = ", ".join([*headers.popall("Via"), hop])
    headers["Via"] = hop
