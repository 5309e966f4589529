"""The config's field types: integers that YAML cannot smuggle in as bools, limits,
durations, names, header names, URLs, networks, with the messages their errors give."""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

UNLIMITED = -1
# The largest quantity a limit, gauge level or credit may hold: the Lua scripts'
# numbers are doubles, exact up to 2**53 (about 9.007e15), and sums of such
# quantities must stay inside Redis' and the ledger's int64 (bigint).
MAX_QUANTITY = 10**15

SubscriptionStatus = Literal[
    "active",
    "trialing",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "paused",
]
JWTAlgorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_HEADER = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _strict_int(value: Any) -> Any:
    # YAML gives bools for yes/no and floats for 1e3: neither is a count.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    if isinstance(value, float):
        return int(value)
    return value


def _limit(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1000.0, as for every other count
    if value == "unlimited" or value == UNLIMITED:
        return UNLIMITED
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        if value > MAX_QUANTITY:
            raise ValueError(f'at most {MAX_QUANTITY}; use "unlimited" for no limit')
        return value
    raise ValueError('expected an integer or "unlimited"')


def _duration_s(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _DURATION_UNITS_S[m.group(2)]
    raise ValueError('expected a duration such as "30s", "15m", "12h" or "3d"')


def _charge(value: Any) -> int | str:
    if value == "response":
        return "response"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_QUANTITY:
            raise ValueError(f"at most {MAX_QUANTITY} either way")
        return int(value)
    raise ValueError('expected an integer or "response"')


def _str_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("expected a name of letters, digits, '_', '-' or '.' (at most 64)")
    return value


def _header_name(value: str) -> str:
    if not _HEADER.match(value):
        raise ValueError("expected an HTTP header name")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError("expected the name of an environment variable")
    return value


def _network(value: Any) -> IPv4Network | IPv6Network:
    try:
        return ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError("expected an IP address or CIDR such as 10.0.0.0/8") from None


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return value


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" for c in word)


# What the JSON Schema says of each type: the values the loader accepts as they are
# written in YAML (its input), not the values it turns them into.
_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": _DURATION.pattern},
    ],
    "description": 'seconds, or a duration such as "30s", "15m", "12h" or "3d"',
}
_LIMIT_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_QUANTITY},
        {"enum": ["unlimited", UNLIMITED]},
    ],
    "description": 'a quantity, or "unlimited"',
}
_CHARGE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": -MAX_QUANTITY, "maximum": MAX_QUANTITY},
        {"const": "response"},
    ],
    "description": 'a quantity (negative for a gauge going down), or "response"',
}
_STR_LIST_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ]
}
_METHODS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "string",
        "pattern": "^(" + "|".join(_any_case(m) for m in sorted(HTTP_METHODS)) + ")$",
    },
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def url_schema(*schemes: str) -> WithJsonSchema:
    """The JSON Schema of a URL with one of `schemes`."""
    alternatives = "|".join(re.escape(s) for s in schemes)
    return WithJsonSchema({"type": "string", "pattern": f"^({alternatives}):"})


def url_with_schemes(*schemes: str) -> AfterValidator:
    def check(value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in schemes:
            allowed = ", ".join(f"{s}://" for s in schemes)
            raise ValueError(f"expected a URL starting with one of {allowed}")
        return value

    return AfterValidator(check)


def _methods(value: list[str]) -> list[str]:
    upper = [m.upper() for m in value]
    unknown = [m for m in upper if m not in HTTP_METHODS]
    if unknown:
        raise ValueError(f"unknown HTTP method {unknown[0]!r}")
    return upper


# Bounds go before it (`Annotated[int, Field(ge=1), STRICT_INT]`): on the integer inside
# the check, where the JSON Schema sees them.
STRICT_INT = BeforeValidator(_strict_int)
StrictInt = Annotated[int, STRICT_INT]
PositiveInt = Annotated[int, Field(gt=0), STRICT_INT]
NonNegativeInt = Annotated[int, Field(ge=0), STRICT_INT]
Port = Annotated[int, Field(ge=0, le=65535), STRICT_INT]
PositiveFloat = Annotated[float, Field(gt=0)]
Limit = Annotated[int, BeforeValidator(_limit), WithJsonSchema(_LIMIT_SCHEMA)]
DurationS = Annotated[float, BeforeValidator(_duration_s), WithJsonSchema(_DURATION_SCHEMA)]
Charge = Annotated[int | str, BeforeValidator(_charge), WithJsonSchema(_CHARGE_SCHEMA)]
StrList = Annotated[
    list[str], BeforeValidator(_str_list), Field(min_length=1), WithJsonSchema(_STR_LIST_SCHEMA)
]
Name = Annotated[
    str, AfterValidator(_name), WithJsonSchema({"type": "string", "pattern": _NAME.pattern})
]
HeaderName = Annotated[
    str,
    AfterValidator(_header_name),
    WithJsonSchema({"type": "string", "pattern": _HEADER.pattern}),
]
EnvName = Annotated[
    str, AfterValidator(_env_name), WithJsonSchema({"type": "string", "pattern": _ENV_NAME.pattern})
]
Network = Annotated[
    IPv4Network | IPv6Network,
    BeforeValidator(_network),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$"}),
]
HttpUrl = Annotated[str, AfterValidator(_http_url), url_schema("http", "https")]
Methods = Annotated[
    list[str], Field(min_length=1), AfterValidator(_methods), WithJsonSchema(_METHODS_SCHEMA)
]
