"""The fault matrix: one row per fault test, printed at the end of a run (`bash scripts/faults`,
or the whole suite) and copied into the README."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    requests: int  # answered during the test, whatever the answer
    errors: int  # answers other than 2xx and the capped tenant's 402
    lost: int  # 2xx answers whose charge is not in the ledger
    duplicated: int  # event ids in the ledger more than once
    overshoot: int  # 2xx beyond the capped tenant's hard quota
    recovery_s: float  # from the end of the load to the ledger holding every 2xx


MATRIX: list[Row] = []


def table(rows: list[Row]) -> list[str]:
    """The rows as a Markdown table."""
    lines = [
        "| scenario | requests | errors | usage lost | usage duplicated | quota overshoot "
        "| ledger caught up (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.requests:,} | {r.errors:,} | {r.lost} | {r.duplicated} "
            f"| {r.overshoot} | {r.recovery_s:.1f} |"
        )
    return lines
