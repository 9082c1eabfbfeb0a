"""Console sign-in: the operator token exchanged for a signed session cookie, and CSRF checks.

The cookie holds no secret of its own: a random CSRF token and the time it was issued, signed
with itsdangerous. The signing key is ``RECEIVER_API_TOKEN`` itself (itsdangerous derives the
HMAC key from it and a fixed salt), so rotating the token signs every browser out. Time comes
from the injected clock, so expiry is tested without sleeping.

Cross-site requests are refused twice over for every state-changing POST: the form must carry
the session's CSRF token, and the browser's ``Sec-Fetch-Site`` / ``Origin`` headers must say the
request came from this site. The cookie is also ``SameSite=Strict`` and ``HttpOnly``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.requests import Request
from starlette.responses import Response

from receiver.domain import Clock

COOKIE = "receiver_console"
SALT = "receiver.console.session.v1"
SESSION_LIFETIME = timedelta(hours=8)


@dataclass(frozen=True)
class Session:
    csrf: str
    issued_at: datetime


class Sessions:
    """Issue, read and end console sessions (stateless: everything is in the signed cookie)."""

    def __init__(
        self, api_token: str, clock: Clock, lifetime: timedelta = SESSION_LIFETIME
    ) -> None:
        self.api_token = api_token
        self.clock = clock
        self.lifetime = lifetime
        self._serializer = URLSafeSerializer(
            api_token, salt=SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )

    def token_matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.strip().encode(), self.api_token.encode())

    def read(self, request: Request) -> Session | None:
        """The request's valid, unexpired session, or None."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._serializer.loads(raw)
            csrf, issued = str(data["csrf"]), float(data["iat"])
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
        now = self.clock().timestamp()
        if not issued <= now < issued + self.lifetime.total_seconds():
            return None
        return Session(csrf, datetime.fromtimestamp(issued, tz=UTC))

    def start(self, request: Request, response: Response) -> Session:
        session = Session(secrets.token_urlsafe(24), self.clock())
        value = self._serializer.dumps({"csrf": session.csrf, "iat": session.issued_at.timestamp()})
        response.set_cookie(
            COOKIE,
            value,
            max_age=int(self.lifetime.total_seconds()),
            path="/console",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return session

    def end(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            COOKIE,
            path="/console",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )


def same_site(request: Request) -> bool:
    """True unless the browser says the request came from another site.

    ``Sec-Fetch-Site`` (every current browser sends it) must be ``same-origin`` or ``none`` (the
    operator typed the URL); without it, an ``Origin`` header must name this host. A request with
    neither (curl, old browsers) passes here and still needs the session's CSRF token.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def csrf_matches(session: Session, offered: str | None) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), session.csrf.encode())
