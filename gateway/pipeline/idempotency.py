"""`Idempotency-Key`: a retried request gets the first answer, uncharged.

The first request with a key claims it (scoped to the tenant; the record
holds a hash of method, path and body), is forwarded and charged, and its
response is stored for 24 hours when it is small enough. A retry with the
same payload gets that response replayed; the same key with another payload
gets 422; a retry while the first is still in flight gets 409. A response
that cannot be stored (too large, streamed, or a 5xx) releases the key, so
the retry is forwarded and charged.

The body is hashed as it arrives and kept for the forward in a spool: in
memory up to `SPOOL_MEMORY_BYTES`, in a temporary file (under `TMPDIR`) past
it, so that a large upload with a key costs bounded memory, not its size.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from multidict import CIMultiDict

from gateway.http.message import Request, Response
from gateway.pipeline.forwarding import BodyTooLarge, LimitedBody, body_too_large
from gateway.problems import Refused
from gateway.quota.store import CounterStore, StoreUnavailable

log = logging.getLogger("gateway.pipeline.idempotency")

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
MAX_STORED_BYTES = 64 * 1024
# A body up to this size stays in memory; a larger one goes to a temporary file.
SPOOL_MEMORY_BYTES = 1024 * 1024
_READ_BYTES = 64 * 1024  # the pieces the spool is forwarded in
RECORD_TTL_MS = 24 * 3600 * 1000
IN_FLIGHT_MS = 5 * 60 * 1000  # a claim outlives any upstream exchange


class Spool:
    """A request body read to be hashed, kept to be forwarded: memory, then a file."""

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115

    @classmethod
    async def read(cls, request: Request, limit: int, digest: hashlib._Hash) -> Spool:
        """The body of `request` spooled and added to `digest`; Refused 413 past `limit`."""
        spool = cls()
        try:
            async for chunk in LimitedBody(request, limit):
                digest.update(chunk)
                spool._file.write(chunk)
        except BodyTooLarge:
            spool.close()
            raise body_too_large(limit) from None
        except BaseException:
            spool.close()
            raise
        return spool

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body again, from its start."""
        self._file.seek(0)
        while chunk := self._file.read(_READ_BYTES):
            yield chunk

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class Claim:
    tenant: str
    key_hash: str
    fingerprint: str
    body: Spool  # the request body, read to be hashed; forwarded as it is
    active: bool = True  # False: the store was down (fail_open), nothing to record


@dataclass(frozen=True, slots=True)
class Replay:
    """A retry of a finished request: its stored answer, given again."""

    stored: str


async def claim(
    request: Request,
    store: CounterStore,
    tenant: str,
    limit: int,
    fail_open: bool = False,
) -> Claim | Replay | None:
    """None without the header; a Claim to go ahead (inactive under fail_open with the
    store down: served without the guarantee); a Replay; or Refused (400, 409, 413, 422, 503)."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    # Printable ASCII, as a structured-field string (draft-ietf-httpapi-idempotency-key).
    if not (0 < len(key) <= MAX_KEY_CHARS and key.isascii() and key.isprintable()):
        raise Refused(
            400, "bad-idempotency-key",
            f"{HEADER} must be 1-{MAX_KEY_CHARS} printable ASCII characters",
        )  # fmt: skip
    digest = hashlib.sha256()
    for part in (request.method.encode(), b"\n", request.target.encode(), b"\n"):
        digest.update(part)
    body = await Spool.read(request, limit, digest)
    try:
        return await _begin(store, tenant, key, digest.hexdigest(), body, fail_open)
    except BaseException:
        body.close()
        raise


async def _begin(
    store: CounterStore, tenant: str, key: str, fingerprint: str, body: Spool, fail_open: bool
) -> Claim | Replay:
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    try:
        held = await store.idempotency_begin(tenant, key_hash, fingerprint, IN_FLIGHT_MS)
    except StoreUnavailable:
        if fail_open:
            log.warning("counter store down: %s not honoured for tenant %s", HEADER, tenant)
            return Claim(tenant, key_hash, fingerprint, body, active=False)
        raise Refused(
            503, "counter-store-unavailable", f"{HEADER} cannot be honoured right now; "
            "retry shortly", headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    if held is None:
        return Claim(tenant, key_hash, fingerprint, body)
    state, held_fingerprint, stored = (held.split("|", 2) + [""])[:3]
    if held_fingerprint != fingerprint:
        raise Refused(
            422, "idempotency-key-reused",
            f"this {HEADER} was used for another request (method, path or body differ)",
        )  # fmt: skip
    if state == "P":
        raise Refused(
            409, "idempotency-key-in-flight",
            f"a request with this {HEADER} is still being processed", headers={"Retry-After": "1"},
        )  # fmt: skip
    body.close()  # a replay forwards nothing
    return Replay(stored)


def record(fingerprint: str, response: Response) -> str | None:
    """The stored form of a response, or None when it cannot be stored."""
    body = response.body
    if response.status >= 500 or not isinstance(body, bytes) or len(body) > MAX_STORED_BYTES:
        return None
    payload = {
        "status": response.status,
        "reason": response.reason,
        "headers": [[k, v] for k, v in response.headers.items() if k.lower() != "x-request-id"],
        "body": base64.b64encode(body).decode(),
    }
    return f"D|{fingerprint}|{json.dumps(payload, separators=(',', ':'))}"


def replay(stored: str, rid: str) -> Response:
    """The stored response again, marked as a replay."""
    payload = json.loads(stored)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in payload["headers"]:
        if name.lower() not in ("content-length", "date"):
            headers.add(name, value)
    headers["X-Request-Id"] = rid
    headers["Idempotent-Replayed"] = "true"
    return Response(
        payload["status"], headers, base64.b64decode(payload["body"]), payload["reason"]
    )


async def finish(store: CounterStore, claim: Claim, response: Response | None) -> None:
    """Store the response (or release the key when there is none to store)."""
    claim.body.close()
    if not claim.active:
        return
    stored = record(claim.fingerprint, response) if response is not None else None
    try:
        await store.idempotency_finish(claim.tenant, claim.key_hash, stored, RECORD_TTL_MS)
    except StoreUnavailable:
        pass  # the claim expires by itself; a retry then goes through
