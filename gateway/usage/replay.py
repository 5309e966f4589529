"""`gateway quarantine`: the usage entries set aside, and writing them again once the cause
is fixed (see quarantine.py)."""

from __future__ import annotations

from gateway.clock import iso_utc
from gateway.ledger.db import LedgerUnavailable
from gateway.ledger.events import decode
from gateway.ledger.store import Ledger
from gateway.ledger.usage_ledger import UsageLedger
from gateway.usage.quarantine import Quarantine


async def quarantine_command(ledger: Ledger, replay: bool) -> int:
    """Print the quarantined entries; with `replay`, write each again and release the
    ones the ledger takes now. Exit 1 while any stays."""
    quarantine = Quarantine(ledger.db, "replay")
    usage = UsageLedger(ledger.db)
    entries = await quarantine.entries(limit=100_000)
    kept = 0
    for entry in entries:
        outcome = "kept"
        if replay:
            try:
                event = decode(entry.line)
                await usage.write([event])
            except LedgerUnavailable:
                raise
            except Exception as exc:  # still refused, or not an event at all
                outcome = f"kept ({type(exc).__name__}: {str(exc)[:120]})"
            else:
                await quarantine.release(entry.id)
                outcome = "written"
        kept += outcome != "written"
        print(f"{entry.id:>6} {iso_utc(entry.at)} {entry.source:<9} {outcome:<10} "
              f"{entry.error[:80]!r} {entry.line[:120]!r}")  # fmt: skip
    print(f"{len(entries)} quarantined, {len(entries) - kept} written now, {kept} kept")
    return 1 if kept else 0
