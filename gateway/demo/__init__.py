"""The embedded demo: a sample upstream API and the gateway in front of it."""
