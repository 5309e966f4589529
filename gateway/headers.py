"""Pure header rules of the proxy: hop-by-hop, forwarding, request ids."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from multidict import CIMultiDict, CIMultiDictProxy

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
# Set by the gateway itself; a client's copy would be believed upstream.
_SPOOFABLE = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip")
_REQUEST_SKIP = HOP_BY_HOP | {*_SPOOFABLE, "host", "x-request-id"}
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


def request_id(headers: Mapping[str, str]) -> str:
    """Keep a well-formed client `X-Request-Id`, otherwise make a new one."""
    given = headers.get("X-Request-Id")
    if given and _REQUEST_ID.match(given):
        return given
    return f"{_ids.getrandbits(128):032x}"


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
