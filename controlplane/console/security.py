"""The console's sessions, CSRF tokens, same-origin check and login rate limit. Pure:
time is passed in, randomness comes from :mod:`secrets`; the aiohttp shell
(web.py) reads the cookies and headers and applies the decisions.

- A session is a random id (256 bits) in a ``Secure; HttpOnly; SameSite=Strict``
  cookie, held in memory only (a restart logs everyone out), with an idle and an
  absolute expiry. Each session has its own CSRF token for its forms.
- Before login there is no session: the login form carries a token derived from a
  random pre-session cookie with a key only this process knows (a signed double
  submit), so a page elsewhere can neither read nor forge the pair.
- Every POST must also come from our own origin, as far as the browser says:
  ``Sec-Fetch-Site: same-origin`` and our ``Origin`` (see :func:`same_origin`).
- Failed logins are limited per client address and in total.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "FailedLogins",
    "Session",
    "Sessions",
    "login_csrf",
    "same_origin",
    "token_matches",
]

IDLE_TIMEOUT = 30 * 60.0  # seconds without a request
ABSOLUTE_TIMEOUT = 12 * 3600.0  # seconds after login, however busy
MAX_SESSIONS = 256  # the oldest goes when a new one would pass this


@dataclass(slots=True)
class Session:
    csrf: str
    created: float
    seen: float


class Sessions:
    """Live sessions by the SHA-256 of their id (the id itself is not kept)."""

    def __init__(
        self,
        idle: float = IDLE_TIMEOUT,
        absolute: float = ABSOLUTE_TIMEOUT,
        limit: int = MAX_SESSIONS,
    ) -> None:
        self.idle = idle
        self.absolute = absolute
        self.limit = limit
        self._by_hash: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def create(self, now: float) -> tuple[str, Session]:
        """A new session: (its id for the cookie, the session)."""
        self.expire(now)
        while len(self._by_hash) >= self.limit:
            oldest = min(self._by_hash, key=lambda h: self._by_hash[h].created)
            del self._by_hash[oldest]
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._by_hash[_digest(sid)] = session
        return sid, session

    def get(self, sid: str | None, now: float) -> Session | None:
        """The live session of cookie value `sid` (its idle clock restarts), or None."""
        if not sid:
            return None
        key = _digest(sid)
        session = self._by_hash.get(key)
        if session is None:
            return None
        if self._expired(session, now):
            del self._by_hash[key]
            return None
        session.seen = now
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._by_hash.pop(_digest(sid), None)

    def expire(self, now: float) -> None:
        for key in [k for k, s in self._by_hash.items() if self._expired(s, now)]:
            del self._by_hash[key]

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle or now - session.created > self.absolute


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def login_csrf(key: bytes, presession: str) -> str:
    """The login form's CSRF token for pre-session cookie `presession`."""
    return hmac.new(key, b"login-csrf:" + presession.encode(), hashlib.sha256).hexdigest()


def same_origin(origin: str | None, fetch_site: str | None, own_origin: str) -> str | None:
    """Why a POST is not from our own pages, or None.

    ``Sec-Fetch-Site`` (which no page can set) decides when the browser sends it.
    ``Origin`` must then be ours, or ``null``: with ``Referrer-Policy: no-referrer``
    a browser sends ``Origin: null`` on its own same-origin form posts. Without
    ``Sec-Fetch-Site``, ``Origin`` must be ours (``null`` is refused: a sandboxed or
    ``data:`` page). A browser that sends neither is left to the CSRF token alone,
    which every POST needs anyway."""
    if fetch_site is not None and fetch_site != "same-origin":
        return f"Sec-Fetch-Site is {fetch_site!r}: the form was posted from another site"
    if origin is None or origin == own_origin:
        return None
    if origin == "null" and fetch_site == "same-origin":
        return None
    return f"Origin {origin!r} is not this console ({own_origin})"


@dataclass(slots=True)
class FailedLogins:
    """At most `per_client` failed logins per client address and `total` in all,
    in any `window` seconds; over that, logins are refused until the window slides."""

    per_client: int = 5
    total: int = 50
    window: float = 60.0
    _all: deque[float] = field(default_factory=deque)
    _by_client: dict[str, deque[float]] = field(default_factory=dict)

    def retry_after(self, client: str, now: float) -> float:
        """Seconds until `client` may try again (0: now)."""
        self._trim(now)
        waits = [0.0]
        mine = self._by_client.get(client)
        if mine is not None and len(mine) >= self.per_client:
            waits.append(mine[0] + self.window - now)
        if len(self._all) >= self.total:
            waits.append(self._all[0] + self.window - now)
        return max(waits)

    def failed(self, client: str, now: float) -> None:
        self._trim(now)
        self._all.append(now)
        self._by_client.setdefault(client, deque()).append(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        while self._all and self._all[0] <= cutoff:
            self._all.popleft()
        for client in list(self._by_client):
            times = self._by_client[client]
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self._by_client[client]
