"""The ledger: tenants and API keys on SQLite or PostgreSQL."""

from gateway.ledger.db import (
    Database,
    LedgerError,
    LedgerIntegrityError,
    LedgerUnavailable,
    connect,
)
from gateway.ledger.records import ApiKey, Tenant
from gateway.ledger.schema import LATEST_VERSION, migrate, schema_version
from gateway.ledger.store import Ledger

__all__ = [
    "LATEST_VERSION",
    "ApiKey",
    "Database",
    "Ledger",
    "LedgerError",
    "LedgerIntegrityError",
    "LedgerUnavailable",
    "Tenant",
    "connect",
    "migrate",
    "schema_version",
]
