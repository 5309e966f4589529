"""Route precedence and path decoding (DESIGN section 3)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config.models import RouteConfig
from gateway.config.templates import TemplateError, parse_template
from gateway.routing import BadPath, Router, parse_path


def split_path(target: str) -> list[str]:
    return parse_path(target).segments


def route(name: str, path: str, **match: Any) -> RouteConfig:
    return RouteConfig.model_validate(
        {"name": name, "match": {"path": path, **match}, "upstream": "app", "auth": "none"}
    )


ROUTES = [
    route("api", "/v1/**"),
    route("add-member", "/v1/members", methods=["POST"]),
    route("members", "/v1/members"),
    route("member", "/v1/members/{id}"),
    route("remove-member", "/v1/members/{id}", methods=["DELETE"]),
    route("member-any", "/v1/members/**"),
    route("files", "/v1/files/**", methods=["PUT"]),
    route("static-deep", "/v1/{section}/special"),
    route("health", "/healthz"),
    route("admin-host", "/v1/members", host="admin.example.com"),
    route("wild-host", "/v2/**", host="*.example.com"),
    route("first-tie", "/tie/{a}"),
    route("second-tie", "/tie/{b}"),
    route("root-any", "/**"),
]


@pytest.mark.parametrize(
    ("method", "host", "path", "expected"),
    [
        ("GET", "api.test", "/v1/members", "members"),
        ("POST", "api.test", "/v1/members", "add-member"),  # a method list beats any method
        ("POST", "admin.example.com", "/v1/members", "add-member"),  # method before host
        ("GET", "admin.example.com", "/v1/members", "admin-host"),  # host beats any host
        ("GET", "api.test", "/v1/members/42", "member"),  # {param} beats **
        ("DELETE", "api.test", "/v1/members/42", "remove-member"),
        ("GET", "api.test", "/v1/members/42/roles", "member-any"),  # more static segments
        ("GET", "api.test", "/v1/members/", "members"),  # one trailing slash changes nothing
        ("PUT", "api.test", "/v1/files/a/b/c.txt", "files"),
        ("GET", "api.test", "/v1/files/a", "api"),  # method mismatch falls back
        ("GET", "api.test", "/v1/other/special", "static-deep"),
        ("GET", "api.test", "/v1", "api"),  # ** matches zero segments
        ("GET", "api.test", "/healthz", "health"),
        ("HEAD", "api.test", "/healthz", "health"),
        ("GET", "x.example.com:8080", "/v2/a", "wild-host"),
        ("GET", "example.com", "/v2/a", "root-any"),  # *.example.com needs a subdomain
        ("GET", "api.test", "/tie/x", "first-tie"),  # a remaining tie: the earlier route
        ("GET", "api.test", "/", "root-any"),
    ],
)
def test_most_specific_route_wins(method: str, host: str, path: str, expected: str) -> None:
    match = Router(ROUTES).match(method, host, split_path(path))
    assert match is not None
    assert match.route.name == expected


def test_get_routes_answer_head_and_params_are_decoded() -> None:
    router = Router([route("item", "/items/{id}/{part}", methods=["GET"])])
    match = router.match("HEAD", "h", split_path("/items/a%2Fb/caf%C3%A9"))
    assert match is not None
    assert match.params == {"id": "a/b", "part": "café"}
    assert router.match("POST", "h", split_path("/items/a/b")) is None


def test_no_match() -> None:
    assert Router([route("a", "/a")]).match("GET", "h", split_path("/b")) is None


def test_encoded_spelling_cannot_bypass_a_more_specific_route() -> None:
    router = Router([route("admin", "/v1/admin/**"), route("api", "/v1/**")])
    match = router.match("GET", "h", split_path("/v1/%61dmin/users"))
    assert match is not None and match.route.name == "admin"


def test_matching_walks_the_path_not_the_route_list() -> None:
    # Ten thousand routes that share no prefix with the request cost nothing.
    many = [route(f"r{i}", f"/svc{i}/{{id}}/items") for i in range(10_000)]
    router = Router([*many, route("target", "/target/{id}")])
    match = router.match("GET", "h", split_path("/target/7"))
    assert match is not None and match.route.name == "target"
    assert len(router._root.static) == 10_001


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("/a/../b", "the path has a dot segment"),
        ("/a/%2e%2E/b", "the path has a dot segment"),
        ("/./a", "the path has a dot segment"),
        ("/a//b", "the path has an empty segment"),
        ("/a/%zz", "the path has a malformed percent-escape"),
        ("/a/%ff", "the path is not UTF-8 once decoded"),
        ("/a/%00", "the path has a NUL byte"),
        ("a/b", "the request target must be an absolute path"),
        ("/v1/admin/users#x", "has a fragment"),
        ("/v1/admin/users?q=1#", "has a fragment"),
        ("/v1/..;/admin", "the path has a dot segment"),
        ("/v1/x%2F..%2F..%2Fadmin", "read with its encoded slashes, has a dot segment"),
        ("/v1/x%5C..%5Cadmin", "read with its encoded slashes, has a dot segment"),
        ("/v1/a%2f%2Fb", "read with its encoded slashes, has an empty segment"),
    ],
)
def test_paths_refused(raw: str, error: str) -> None:
    with pytest.raises(BadPath, match=error):
        split_path(raw)


def test_path_segments() -> None:
    assert split_path("/") == []
    assert split_path("/v1/members/") == ["v1", "members"]
    assert split_path("/a%2Fb/c") == ["a/b", "c"]
    assert parse_path("/a%2Fb/c?x=%2F").alternate == ["a", "b", "c"]
    assert parse_path("/a/b").alternate is None
    assert parse_path("/%5Fgateway/usage").reserved  # an encoded spelling is still reserved


def test_an_encoded_slash_may_not_change_the_route() -> None:
    router = Router(
        [
            route("user", "/v1/users/{id}", methods=["GET"]),
            route("private", "/v1/**"),
        ]
    )
    # Read whole, 42%2Fbilling is a user id; decoded by a WSGI upstream it is
    # /v1/users/42/billing, another route: refused rather than guessed.
    with pytest.raises(BadPath, match="would select another route"):
        router.match_path("GET", "h", parse_path("/v1/users/42%2Fbilling"))
    # Both readings reach the same route: forwarded as it came.
    same = router.match_path("GET", "h", parse_path("/v1/files/a%2Fb"))
    assert same is not None and same.route.name == "private"
    assert router.match_path("GET", "h", parse_path("/")) is None
    root = Router([route("root", "/")]).match_path("GET", "h", parse_path("/"))
    assert root is not None and root.route.name == "root"


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("v1/x", "must start with '/'"),
        ("/_gateway/x", "belong to the gateway"),
        ("/a/**/b", "'\\*\\*' may only be the last segment"),
        ("/a/{id}/{id}", "parameter 'id' used twice"),
        ("/a/{bad-name}", "bad parameter segment"),
        ("/a/x*", "mixes text with a wildcard"),
        ("/a/../b", "dot segments cannot be matched"),
    ],
)
def test_bad_templates(template: str, error: str) -> None:
    with pytest.raises(TemplateError, match=error):
        parse_template(template)
