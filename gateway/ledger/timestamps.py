"""Timestamps at the ledger's edge: aware UTC on the way in, UTC datetimes on the way out."""

from __future__ import annotations

from datetime import UTC, datetime


def utc(value: datetime) -> datetime:
    """A datetime on its way in: refused when naive, since its zone would be a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def maybe_utc(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def loaded(value: datetime | str | None) -> datetime | None:
    """A timestamp column as read: asyncpg gives datetimes, SQLite gives ISO 8601 text."""
    if value is None:
        return None
    if isinstance(value, datetime) and value.tzinfo is UTC:
        return value  # as asyncpg gives timestamptz: nothing to convert
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC)


def required(value: datetime | None) -> datetime:
    assert value is not None, "a NOT NULL timestamp column was NULL"
    return value
