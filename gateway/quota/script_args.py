"""The argument layout of check_and_charge.lua, in one table both sides read by name.

Python builds ARGV from these tuples (`values`); the script gets Lua locals
naming every position (`lua_names`, prepended to it), so `ARGV[a + M_COST]`
replaces a bare `ARGV[a + 9]` and a field added here moves both at once.
Periods and credits are read as `M_START_0 + 2 * i` and `M_CREDIT_0 + i`,
which the order below guarantees (a test holds it to that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# ARGV[1..]: the request as a whole.
HEAD = ("memo_ttl_ms", "grace_ms", "meters", "rates", "mode", "event_fields", "operation_id")
# Then one record per meter: a counter's three periods (previous, current, next) as
# start and end in microseconds, zeros for a gauge; its limit (-1: unlimited), hard
# (1/0), the cost charged now, needs_remaining (1/0), each period's credit, its name.
METER = (
    "kind", "start_0", "end_0", "start_1", "end_1", "start_2", "end_2",
    "limit", "hard", "cost", "needs_remaining", "credit_0", "credit_1", "credit_2", "name",
)  # fmt: skip
# Then one record per rate limit.
RATE = ("interval_us", "burst", "cost")


def values(fields: Sequence[str], given: Mapping[str, int | str]) -> list[int | str]:
    """One record's values in the table's order; every field must be given, no other."""
    # Built on every request: as many keys as fields, all found, means the same set,
    # without building two sets.
    if len(given) == len(fields):
        try:
            return [given[name] for name in fields]
        except KeyError:
            pass
    raise ValueError(f"fields {sorted(set(fields) ^ set(given))} missing or unknown")


def lua_names() -> str:
    """Lua locals for every position: ARG_* are ARGV indexes, M_* and R_* offsets from
    the first value of a meter's or a rate limit's record."""
    lines = [f"local ARG_{name.upper()} = {i}" for i, name in enumerate(HEAD, start=1)]
    lines += [f"local M_{name.upper()} = {i}" for i, name in enumerate(METER)]
    lines += [f"local R_{name.upper()} = {i}" for i, name in enumerate(RATE)]
    lines += [
        f"local FIRST_METER = {len(HEAD) + 1}",
        f"local METER_VALUES = {len(METER)}",
        f"local RATE_VALUES = {len(RATE)}",
    ]
    return "\n".join(lines) + "\n"
