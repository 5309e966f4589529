"""Keys, tokens (good and forged) and a JWKS server for the auth tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

ISSUER = "https://auth.example.com/"
AUDIENCE = "https://api.example.com"
SECRET = "s3cret-" + "x" * 60


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class KeyPair:
    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def rsa_key(kid: str = "rsa1", alg: str = "RS256") -> KeyPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    return KeyPair(kid, alg, private, {**jwk, "kid": kid, "alg": alg, "use": "sig"})


def ec_key(kid: str = "ec1", alg: str = "ES256") -> KeyPair:
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1()}[alg]
    private = ec.generate_private_key(curve)
    jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    return KeyPair(kid, alg, private, {**jwk, "kid": kid, "alg": alg})


def ed_key(kid: str = "ed1") -> KeyPair:
    private = ed25519.Ed25519PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    return KeyPair(kid, "EdDSA", private, {**jwk, "kid": kid, "alg": "EdDSA"})


def claims(tenant: str = "acme", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "org_id": tenant,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: KeyPair, payload: dict[str, Any], **headers: Any) -> str:
    alg = headers.pop("alg", key.alg)
    return pyjwt.encode(payload, key.private, algorithm=alg, headers={"kid": key.kid, **headers})


def unsigned(payload: dict[str, Any], header: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand, for the forgeries a library refuses to make."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(payload).encode())
    return f"{head}.{body}.{b64url(signature)}"


def sign_raw(key: KeyPair, payload: dict[str, Any], header: dict[str, Any]) -> str:
    """Sign a header PyJWT would not write (e.g. with `crit`)."""
    signing_input = unsigned(payload, header).rsplit(".", 1)[0]
    signature = get_default_algorithms()[header["alg"]].sign(signing_input.encode(), key.private)
    return f"{signing_input}.{b64url(signature)}"


def hs256_with_public_key(key: KeyPair, payload: dict[str, Any]) -> str:
    """The classic confusion attack: the RSA public key used as an HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = unsigned(payload, header).rsplit(".", 1)[0]
    mac = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@dataclass
class JWKSServer:
    keys: list[dict[str, Any]]
    fetches: int = 0
    runner: web.AppRunner | None = None
    port: int = 0
    hits: list[str] = field(default_factory=list)
    # While `stall` is set, each fetch waits for its own gate in `held` (in
    # arrival order): a test decides which fetch finishes when, and what it
    # gets, since the keys are read only once the gate opens.
    stall: bool = False
    held: list[asyncio.Event] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def start(self) -> JWKSServer:
        async def jwks(request: web.Request) -> web.Response:
            self.fetches += 1
            if self.stall:
                gate = asyncio.Event()
                self.held.append(gate)
                await gate.wait()
            return web.json_response({"keys": self.keys})

        async def anything(request: web.Request) -> web.Response:
            self.hits.append(request.path)
            return web.json_response({"keys": []})

        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks)
        app.router.add_get("/{tail:.*}", anything)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    def release_all(self) -> None:
        self.stall = False
        for gate in self.held:
            gate.set()

    async def stop(self) -> None:
        self.release_all()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


RSA = rsa_key()  # the key the `jwks` fixture publishes
