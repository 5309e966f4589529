"""Authentication: JWTs (static keys or JWKS) and API keys."""
