"""check_and_charge.lua and Python read its arguments from one table, and agree on it."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from gateway.quota import script_args
from gateway.quota.script_args import HEAD, METER, RATE

SCRIPT = resources.files("gateway.quota").joinpath("check_and_charge.lua").read_text()


def test_the_script_reads_arguments_only_by_the_tables_names() -> None:
    defined = set(re.findall(r"^local (\w+) =", script_args.lua_names(), flags=re.M))
    used = set(re.findall(r"\b((?:ARG|M|R)_[A-Z0-9_]+)\b", SCRIPT))
    assert used and used <= defined
    # No bare position left: every ARGV index is a name, or a record start plus a name.
    indexes = re.findall(r"ARGV\[([^\]]*\]?)\]", SCRIPT)
    assert indexes and all(re.fullmatch(r"ARG_\w+|a \+ [MR]_\w+.*", i) for i in indexes), indexes


def test_periods_and_credits_are_where_the_script_steps_through_them() -> None:
    # The script reads period i at M_START_0 + 2 * i and its credit at M_CREDIT_0 + i.
    for i in range(3):
        assert METER.index(f"start_{i}") == METER.index("start_0") + 2 * i
        assert METER.index(f"end_{i}") == METER.index("end_0") + 2 * i
        assert METER.index(f"credit_{i}") == METER.index("credit_0") + i


def test_a_record_needs_every_field_and_no_other() -> None:
    given = dict.fromkeys(RATE, 1)
    assert script_args.values(RATE, given) == [1, 1, 1]
    with pytest.raises(ValueError, match="burst"):
        script_args.values(RATE, {"interval_us": 1, "cost": 1})
    with pytest.raises(ValueError, match="extra"):
        script_args.values(RATE, {**given, "extra": 1})
    assert len(set(HEAD + METER)) == len(HEAD) + len(METER)
