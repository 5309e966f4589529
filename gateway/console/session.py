"""The console's login session and CSRF tokens: stateless, signed with a key derived from
the admin token, so that every gateway process accepts every other's cookie and rotating
the admin token logs everyone out.

A session cookie is `<expiry>.<nonce>.<mac>`; a form's CSRF token is the MAC of the
session's nonce under another label, so it is bound to one session and useless
without its cookie (which a cross-site form cannot send: SameSite=Strict).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "gateway_console"
SESSION_S = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    expires_at: float


class Sessions:
    """Issues and checks sessions and their CSRF tokens."""

    def __init__(self, admin_token: str, lifetime_s: float = SESSION_S) -> None:
        self._key = hashlib.sha256(b"gateway-console\x00" + admin_token.encode()).digest()
        self._token = admin_token.encode()
        self.lifetime_s = lifetime_s

    def _mac(self, label: str, text: str) -> str:
        return hmac.new(self._key, f"{label}\x00{text}".encode(), hashlib.sha256).hexdigest()

    def login(self, given_token: str, now: float | None = None) -> str | None:
        """A new session cookie's value for the right admin token, else None."""
        if not hmac.compare_digest(given_token.encode("utf-8", "surrogateescape"), self._token):
            return None
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        body = f"{expires}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._mac('session', body)}"

    def check(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie holds, if it is ours and not expired."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", f"{expires}.{nonce}")):
            return None
        if not expires.isdigit() or int(expires) <= (time.time() if now is None else now):
            return None
        return Session(nonce, float(expires))

    def csrf(self, session: Session) -> str:
        """The token every form of this session must send back."""
        return self._mac("csrf", session.nonce)

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf(session))


class LoginThrottle:
    """At most `attempts` wrong tokens per client address in `window_s`; then refused until
    the window ends. Bounded: the oldest addresses are forgotten past `max_clients`."""

    def __init__(self, attempts: int = 5, window_s: float = 60.0, max_clients: int = 10_000):
        self.attempts = attempts
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: dict[str, tuple[float, int]] = {}  # address -> (window start, count)

    def retry_after_s(self, address: str, now: float | None = None) -> int:
        """0 when the address may try now; else how long it must wait."""
        now = time.monotonic() if now is None else now
        start, count = self._failures.get(address, (now, 0))
        if now - start >= self.window_s or count < self.attempts:
            return 0
        return max(1, int(start + self.window_s - now + 0.999))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        start, count = self._failures.pop(address, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        self._failures[address] = (start, count + 1)  # re-inserted: the newest last
        while len(self._failures) > self.max_clients:
            del self._failures[next(iter(self._failures))]
