"""Route path templates: the grammar the config accepts, checked when it loads.

The router compiles what this accepts; keeping the grammar here lets the
config loader refuse a bad template by its path in the file without knowing
how matching works.
"""

from __future__ import annotations

import re

RESERVED_PREFIX = "/_gateway/"
RESERVED_SEGMENT = "_gateway"
PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class TemplateError(ValueError):
    """A route path template that cannot be compiled."""


def matchable(segments: list[str]) -> list[str]:
    # One trailing slash does not make another route: `/v1/members/` is
    # `/v1/members`, as most upstream frameworks read it.
    return segments[:-1] if segments and not segments[-1] else segments


def parse_template(path: str) -> list[str]:
    """Split a route template into segments, refusing what cannot be matched."""
    if not path.startswith("/"):
        raise TemplateError("must start with '/'")
    if path == RESERVED_PREFIX.rstrip("/") or path.startswith(RESERVED_PREFIX):
        raise TemplateError(f"paths under {RESERVED_PREFIX} belong to the gateway")
    segments = matchable(path[1:].split("/"))
    seen: set[str] = set()
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                raise TemplateError("'**' may only be the last segment")
        elif seg.startswith("{") or seg.endswith("}"):
            m = PARAM.match(seg)
            if not m:
                raise TemplateError(f"bad parameter segment {seg!r}")
            if m.group(1) in seen:
                raise TemplateError(f"parameter {m.group(1)!r} used twice")
            seen.add(m.group(1))
        elif "*" in seg or "{" in seg or "}" in seg:
            raise TemplateError(f"segment {seg!r} mixes text with a wildcard")
        elif seg in (".", ".."):
            raise TemplateError("dot segments cannot be matched")
    return segments
