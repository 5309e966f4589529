"""Route matching: templates compiled once into a segment trie.

Precedence (most specific wins): more static leading segments, then `{param}`
over `**`, then a method list over any method, then a host over any host, then
the earlier route in the file. A depth-first walk that tries the static child,
then the parameter child, then `**` visits candidates in exactly that order,
so the cost of a match depends on the path, not on the number of routes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from gateway.config.models import RouteConfig
from gateway.config.templates import PARAM, RESERVED_SEGMENT, matchable, parse_template

_SLASHES = re.compile(r"[/\\]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class BadPath(ValueError):
    """A request path that must be refused rather than routed."""


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    config: RouteConfig
    params: tuple[str | None, ...]  # the parameter name of each segment, None if not one
    methods: frozenset[str] | None
    host: str | None

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: dict[str, str]


@dataclass(slots=True)
class _Node:
    static: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    here: list[Route] = field(default_factory=list)  # templates ending at this node
    rest: list[Route] = field(default_factory=list)  # templates ending in `**` here


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A request path as the router sees it."""

    segments: list[str]  # decoded; an encoded slash stays inside its segment
    # The same path split at its encoded slashes and backslashes, when it has
    # any: how an upstream that decodes them (WSGI's PATH_INFO, nginx) sees it.
    alternate: list[str] | None
    reserved: bool  # under /_gateway/


def _decode(seg: str) -> str:
    try:
        decoded = unquote_to_bytes(seg).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the path is not UTF-8 once decoded") from None
    if "\x00" in decoded:
        raise BadPath("the path has a NUL byte")
    return decoded


def _check_segments(segments: list[str], what: str) -> None:
    if "" not in segments[:-1] and not any(seg.startswith(".") for seg in segments):
        return  # neither an empty inner segment nor a dot segment can be there
    for i, seg in enumerate(segments):
        # `..;x` is `..` to servlet containers (path parameters are stripped).
        if seg.split(";", 1)[0] in (".", ".."):
            raise BadPath(f"{what} has a dot segment")
        if not seg and i != len(segments) - 1:
            raise BadPath(f"{what} has an empty segment")


def parse_path(target: str) -> RequestPath:
    """Decode a request target's path for routing, refusing what an upstream could
    read as another path: dot segments (also encoded, also `..;`), empty inner
    segments, malformed escapes, NUL, a fragment, and the same hidden behind an
    encoded slash or backslash.
    """
    if not target.startswith("/"):
        raise BadPath("the request target must be an absolute path")
    if "#" in target:  # a client never sends a fragment; a proxy would cut it off
        raise BadPath("the request target has a fragment ('#')")
    path = target.partition("?")[0]
    if _BAD_ESCAPE.search(path):
        raise BadPath("the path has a malformed percent-escape")
    if "%" in path or "\x00" in path or not path.isascii():
        segments = [_decode(seg) for seg in path[1:].split("/")]
    else:  # the common case: nothing to decode
        segments = path[1:].split("/")
    _check_segments(segments, "the path")
    alternate = None
    if any("/" in seg or "\\" in seg for seg in segments):
        alternate = [part for seg in segments for part in _SLASHES.split(seg)]
        _check_segments(alternate, "the path, read with its encoded slashes,")
        alternate = matchable(alternate)
    return RequestPath(matchable(segments), alternate, segments[0] == RESERVED_SEGMENT)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


class Router:
    """Matches (method, host, path) to the most specific route."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._root = _Node()
        for index, config in enumerate(routes):
            self._add(index, config)
        self._sort(self._root)

    def _add(self, index: int, config: RouteConfig) -> None:
        segments = parse_template(config.match.path)
        methods = config.match.methods
        route = Route(
            index=index,
            config=config,
            params=tuple(m.group(1) if (m := PARAM.match(s)) else None for s in segments),
            methods=frozenset(methods) | ({"HEAD"} if "GET" in methods else set())
            if methods
            else None,
            host=config.match.host.lower() if config.match.host else None,
        )
        node = self._root
        for seg in segments:
            if seg == "**":
                node.rest.append(route)
                return
            if PARAM.match(seg):
                node.param = node.param or _Node()
                node = node.param
            else:
                node = node.static.setdefault(seg, _Node())
        node.here.append(route)

    def _sort(self, node: _Node) -> None:
        def key(r: Route) -> tuple[bool, bool, int]:
            return (r.methods is None, r.host is None, r.index)

        node.here.sort(key=key)
        node.rest.sort(key=key)
        for child in node.static.values():
            self._sort(child)
        if node.param:
            self._sort(node.param)

    def match_path(self, method: str, host: str, path: RequestPath) -> Match | None:
        """The route for a parsed path; BadPath when its encoded slashes would change it.

        An upstream may or may not decode `%2F`; the gateway's decision (which
        route, so which authentication and which charges) must be the same
        either way, or the request is refused.
        """
        found = self.match(method, host, path.segments)
        if path.alternate is not None:
            other = self.match(method, host, path.alternate)
            if (found and found.route.index) != (other and other.route.index):
                raise BadPath("an encoded slash in the path would select another route")
        return found

    def match(self, method: str, host: str, segments: Sequence[str]) -> Match | None:
        """Return the most specific route for decoded segments, or None."""
        host = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else host.lower()
        found = self._walk(self._root, segments, 0, method, host)
        if found is None:
            return None
        route = found
        params = {
            name: segments[i] for i, name in enumerate(route.params) if name and i < len(segments)
        }
        return Match(route, params)

    def _walk(
        self, node: _Node, segments: Sequence[str], i: int, method: str, host: str
    ) -> Route | None:
        if i == len(segments):
            if found := self._pick(node.here, method, host):
                return found
        else:
            child = node.static.get(segments[i])
            if child and (found := self._walk(child, segments, i + 1, method, host)):
                return found
            # a parameter never matches an empty segment (`/v1/members/` is not `{id}`)
            if (
                node.param
                and segments[i]
                and (found := self._walk(node.param, segments, i + 1, method, host))
            ):
                return found
        return self._pick(node.rest, method, host)

    @staticmethod
    def _pick(routes: list[Route], method: str, host: str) -> Route | None:
        for route in routes:
            if route.methods is not None and method not in route.methods:
                continue
            if route.host is not None and not _host_matches(route.host, host):
                continue
            return route
        return None
