"""Usage events: recorded off the hot path, written once into the ledger."""
