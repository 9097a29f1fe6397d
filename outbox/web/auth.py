"""Sessions, CSRF tokens, roles, login throttling and security headers.

The session is a signed cookie (itsdangerous, HttpOnly, SameSite=Lax, Secure when the request
came over TLS) carrying the user's name, a fingerprint of their password hash (so `outbox user
passwd` or `remove` ends their sessions) and the CSRF token every POST form must echo.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "outbox_session"
SESSION_MAX_AGE_SECONDS = 12 * 3600

# Pages may load only this origin's styles, scripts, images and frames; nothing may frame them.
CSP = (
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'; img-src 'self' data:"
)
# A message's HTML body: no scripts, an opaque origin, inline styles and embedded images only.
CSP_SANDBOX = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}


class Sessions:
    """Reads and writes the signed session cookie."""

    def __init__(self, secret: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="outbox-web-session")

    def load(self, request: Request) -> dict[str, Any]:
        raw = request.cookies.get(COOKIE)
        if raw:
            try:
                data = self._serializer.loads(raw, max_age=SESSION_MAX_AGE_SECONDS)
                if isinstance(data, dict) and isinstance(data.get("csrf"), str):
                    return data
            except BadSignature:
                pass
        return {"csrf": secrets.token_urlsafe(32)}

    def save(self, request: Request, response: Response, data: dict[str, Any]) -> None:
        response.set_cookie(
            COOKIE,
            self._serializer.dumps(data),
            max_age=SESSION_MAX_AGE_SECONDS,
            path="/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )

    @staticmethod
    def new(user: str, fingerprint: str) -> dict[str, Any]:
        """A fresh session for a user who just logged in (new CSRF token too)."""
        return {"csrf": secrets.token_urlsafe(32), "user": user, "fp": fingerprint}


def csrf_ok(session: dict[str, Any], submitted: Any) -> bool:
    return isinstance(submitted, str) and hmac.compare_digest(submitted.encode(), session["csrf"].encode())


@dataclass
class LoginThrottle:
    """Failed logins per (user name, client address), in this process: after `free` failures
    each new attempt must wait `base_seconds` doubled per further failure (at most
    `max_seconds`); a success or `forget_seconds` without failures clears the count."""

    free: int = 3
    base_seconds: float = 2.0
    max_seconds: float = 900.0
    forget_seconds: float = 900.0
    _failures: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_seconds(self, key: tuple[str, str], now: float | None = None) -> float:
        """How long this key must still wait before its password is even checked."""
        now = time.monotonic() if now is None else now
        with self._lock:
            count, last = self._failures.get(key, (0, 0.0))
        if count < self.free or now - last > self.forget_seconds:
            return 0.0
        delay = min(self.base_seconds * 2 ** (count - self.free), self.max_seconds)
        return max(0.0, last + delay - now)

    def failed(self, key: tuple[str, str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            count, last = self._failures.get(key, (0, 0.0))
            if now - last > self.forget_seconds:
                count = 0
            self._failures[key] = (count + 1, now)
            if len(self._failures) > 100_000:  # bounded memory under a spray of names
                stale = [k for k, (_, t) in self._failures.items() if now - t > self.forget_seconds]
                for k in stale or list(self._failures)[:50_000]:
                    del self._failures[k]

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)


class SecurityHeaders:
    """ASGI middleware: the console's CSP and hardening headers on every response (a route
    that sets its own Content-Security-Policy keeps it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.decode().lower() for k, _ in headers}
                extra = dict(HEADERS)
                extra.setdefault("content-security-policy", CSP)
                if "cache-control" not in present:
                    extra["cache-control"] = "no-store"
                headers += [(k.encode(), v.encode()) for k, v in extra.items() if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
