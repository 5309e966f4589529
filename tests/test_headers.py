"""Pure header rules: hop-by-hop, trusted proxies, Via, request ids."""

from __future__ import annotations

from ipaddress import ip_network

from multidict import CIMultiDict

from gateway.headers import (
    TrustedProxies,
    add_via,
    connection_tokens,
    end_to_end,
    request_id,
    request_skip,
    upstream_request_headers,
)


def test_connection_named_headers_are_hop_by_hop() -> None:
    headers = CIMultiDict(
        [("Connection", "keep-alive, X-A"), ("Connection", "x-b"), ("X-A", "1"), ("X-B", "2"),
         ("X-C", "3"), ("TE", "trailers"), ("Transfer-Encoding", "chunked")]
    )  # fmt: skip
    assert connection_tokens(headers) == {"keep-alive", "x-a", "x-b"}
    assert list(end_to_end(headers).items()) == [("X-C", "3")]


def test_trusted_proxies_read_from_the_right() -> None:
    trusted = TrustedProxies([ip_network("10.0.0.0/8"), ip_network("::1/128")])
    # An untrusted peer's header is not believed at all.
    assert trusted.chain("203.0.113.5", ["1.2.3.4"]) == ["203.0.113.5"]
    assert trusted.client("203.0.113.5", ["1.2.3.4"]) == "203.0.113.5"
    # A trusted peer's chain is kept; the client is the first untrusted from the right.
    chain = trusted.chain("10.0.0.2", ["198.51.100.7, 10.0.0.9"])
    assert chain == ["198.51.100.7", "10.0.0.9", "10.0.0.2"]
    assert trusted.client("10.0.0.2", ["spoofed, 198.51.100.7, 10.0.0.9"]) == "198.51.100.7"
    assert "::ffff:10.1.2.3" in trusted and "::1" in trusted and "garbage" not in trusted


def test_upstream_headers_for_an_untrusted_client() -> None:
    incoming = CIMultiDict(
        [("Host", "api.test"), ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "evil"),
         ("Forwarded", "for=6.6.6.6"), ("Via", "1.0 corp-proxy"), ("X-Request-Id", "abc"),
         ("X-Tenant-Id", "spoofed"), ("Accept", "*/*")]
    )  # fmt: skip
    out = upstream_request_headers(
        incoming, peer="192.0.2.1", trusted=TrustedProxies([]), scheme="https",
        host="api.test", http_version=(1, 1), rid="abc", skip=request_skip(["X-Tenant-Id"]),
        upstream_host="10.0.0.5:3000",
    )  # fmt: skip
    assert dict(out) == {
        "Via": "1.0 corp-proxy, 1.1 gateway",
        "Accept": "*/*",
        "X-Forwarded-For": "192.0.2.1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.test",
        "Host": "10.0.0.5:3000",
        "X-Request-Id": "abc",
    }


def test_via_for_http2_and_request_ids() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    add_via(headers, (2, 0))
    assert headers["Via"] == "2 gateway"
    assert request_id({"X-Request-Id": "a" * 128}) == "a" * 128
    assert request_id({"X-Request-Id": "a" * 129}) != "a" * 129
    assert len(request_id({})) == 32


def test_underscore_spellings_of_gateway_headers_are_dropped() -> None:
    incoming = CIMultiDict(
        [("X_Tenant_Id", "victim"), ("X_Forwarded_For", "6.6.6.6"), ("X_Real_IP", "1.1.1.1"),
         ("X_Custom", "kept")]
    )  # fmt: skip
    out = end_to_end(incoming, request_skip(["X-Tenant-Id"]))
    assert list(out.items()) == [("X_Custom", "kept")]
