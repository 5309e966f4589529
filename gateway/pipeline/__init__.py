"""The request pipeline: admission, idempotency, metering, forwarding."""
