"""Hypothesis against the config loader: a valid config with one value anywhere replaced by
anything YAML can hold (or a key added or removed) either loads or is refused with a
ConfigError whose every line names the file and a key path; never another exception."""

from __future__ import annotations

import copy
from typing import Any

import hypothesis
import yaml
from hypothesis import strategies as st

from gateway.config.loader import ConfigError, parse, parse_text
from tests.conftest import gateway_config

BASE = gateway_config(
    "http://127.0.0.1:8000",
    storage={"counters": "memory://", "ledger": "sqlite:///./fuzz.db"},
    auth={"jwt": {"algorithms": ["HS256"], "secret_env": "FUZZ_SECRET"},
          "api_keys": {"enabled": True}},
    meters={"calls": {"type": "counter", "period": "month"}, "seats": {"type": "gauge"}},
    plans={"free": {"limits": {"calls": {"limit": 100, "warn_at": [0.8]},
                               "seats": {"limit": "unlimited"}},
                    "rate_limits": [{"name": "burst", "rate": 10, "burst": 20}]}},
    subscription={"grace": {"past_due": "3d"}},
    routes=[{"name": "api", "match": {"path": "/v1/{id}/**", "methods": ["GET"]},
             "upstream": "app", "charge": {"calls": 1, "seats": -1}}],
    notifications={"webhooks": [{"url": "https://hooks.example/x", "secret_env": "HOOK"}]},
    signals={"anomaly": {"k": 4}},
)  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["unlimited", "3d", "-1", "1e400", "", "memory://"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of the nested dicts and lists."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += paths(value, (*prefix, i))
    return found


PATHS = paths(BASE)


@hypothesis.given(where=st.sampled_from(PATHS), value=values, drop=st.booleans())
@hypothesis.settings(max_examples=500, deadline=None, derandomize=True, database=None)
def test_any_change_loads_or_is_refused_by_path(
    where: tuple[Any, ...], value: Any, drop: bool
) -> None:
    data = copy.deepcopy(BASE)
    parent = data
    for step in where[:-1]:
        parent = parent[step]
    if drop and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    try:
        parse(data, "fuzz.yaml")
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines and all(line.startswith("fuzz.yaml") for line in lines), lines


@hypothesis.given(text=st.text(max_size=200))
@hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_any_text_loads_or_is_refused_with_a_config_error(text: str) -> None:
    try:
        parse_text(text, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)


def test_the_base_config_is_valid() -> None:
    parse(copy.deepcopy(BASE), "fuzz.yaml")
    assert yaml.safe_dump(BASE)
