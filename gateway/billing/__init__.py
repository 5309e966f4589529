"""Billing: usage reports to Stripe through an outbox in the ledger, and Stripe's webhooks."""
