"""From request headers to the calling tenant's id."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.auth.apikeys import key_prefix, matches
from gateway.auth.jwt import JWTVerifier
from gateway.auth.keys import InvalidToken
from gateway.directory import Directory
from gateway.headers import single


class AmbiguousCredentials(Exception):
    """A credential header sent twice: which copy would count is a guess (answered 400)."""


class Unauthenticated(Exception):
    """Missing or invalid credentials: answered 401."""

    def __init__(self, detail: str, *, token_sent: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.token_sent = token_sent

    def challenge(self) -> str:
        """The RFC 6750 `WWW-Authenticate` value."""
        if self.token_sent:
            return 'Bearer realm="gateway", error="invalid_token"'
        return 'Bearer realm="gateway"'


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    via: str  # "jwt" or "api_key"


class Authenticator:
    """Tries the API key header, then a bearer token, as configured."""

    def __init__(
        self,
        jwt: JWTVerifier | None,
        directory: Directory,
        api_key_header: str | None,
    ) -> None:
        self._jwt = jwt
        self._directory = directory
        self._api_key_header = api_key_header

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The principal; Unauthenticated, or AmbiguousCredentials for a header sent twice."""
        try:
            authorization = single(headers, "Authorization")
            header = self._api_key_header
            key = single(headers, header) if header is not None else None
        except ValueError as exc:
            raise AmbiguousCredentials(str(exc)) from None
        if key is not None:
            return await self._api_key(key.strip())
        if authorization is None or self._jwt is None:
            raise Unauthenticated("credentials are required", token_sent=False)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            raise Unauthenticated("expected a Bearer token", token_sent=False)
        if not token:
            raise Unauthenticated("the bearer token is empty", token_sent=False)
        if not token.isascii():  # a JWT is base64url; other bytes would fail to encode
            raise Unauthenticated("the token is not a well-formed JWT", token_sent=True)
        try:
            tenant, _ = await self._jwt.verify(token)
        except InvalidToken as exc:
            raise Unauthenticated(str(exc), token_sent=True) from None
        return Principal(tenant, "jwt")

    async def _api_key(self, key: str) -> Principal:
        prefix = key_prefix(key) if key.isascii() else None
        record = await self._directory.api_key(prefix) if prefix else None
        if record is None or record.revoked_at is not None or not matches(key, record.key_hash):
            raise Unauthenticated("the API key is unknown or revoked", token_sent=True)
        self._directory.touch(record.prefix)
        return Principal(record.tenant_id, "api_key")
