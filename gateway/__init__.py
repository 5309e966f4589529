"""A quota-enforcing API gateway."""

__version__ = "0.1.0"
