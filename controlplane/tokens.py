"""Join tokens: ``mn1.<id>.<secret>.<pin>`` (docs/protocol.md, "Enrollment").

Pure: no I/O, time is a parameter. The control plane stores a :class:`TokenRecord`
(only the SHA-256 of the secret); :func:`verify_token` decides whether an enrollment
may consume it. The pin is for the node (it checks the server's root before sending
anything); the control plane only checks its shape.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "ParsedToken",
    "TokenError",
    "TokenRecord",
    "make_token",
    "parse_token",
    "root_pin",
    "verify_token",
]

PREFIX = "mn1"
DEFAULT_TOKEN_TTL = 3600.0
_ID = re.compile(r"[0-9a-f]{8}")
_SECRET = re.compile(r"[0-9a-f]{32}")
_PIN = re.compile(r"[0-9a-f]{64}")


class TokenError(Exception):
    """An enrollment token is refused. `status` is the HTTP status to answer with:
    400 malformed, 401 unknown/used/expired/wrong secret, 403 for another node or zone."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ParsedToken:
    id: str
    secret: str
    pin: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.id}.{self.secret}.{self.pin}"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the control plane keeps about a token (never the secret itself)."""

    id: str
    secret_sha256: str
    node: str
    zone: str  # "" = any zone the node asks for
    created_at: float
    expires_at: float
    used_at: float | None = None
    used_by: str = ""

    def consumed(self, now: float, by: str) -> TokenRecord:
        return replace(self, used_at=now, used_by=by)


def root_pin(root_der: bytes) -> str:
    """The pin of a root certificate: hex SHA-256 of its DER."""
    return hashlib.sha256(root_der).hexdigest()


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_token(text: str) -> ParsedToken:
    """Split and check the shape of a token; TokenError(400) says which part is wrong."""
    if not isinstance(text, str):
        raise TokenError(400, "token must be a string like mn1.<id>.<secret>.<pin>")
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise TokenError(
            400,
            f"malformed token: expected {PREFIX}.<id>.<secret>.<pin> (4 dot-separated parts); "
            "copy the whole line printed by `meshnode token create`",
        )
    _, tid, secret, pin = parts
    for value, pattern, what in (
        (tid, _ID, "id (8 hex characters)"),
        (secret, _SECRET, "secret (32 hex characters)"),
        (pin, _PIN, "pin (64 hex characters, SHA-256 of the root certificate)"),
    ):
        if not pattern.fullmatch(value):
            raise TokenError(400, f"malformed token: bad {what}")
    return ParsedToken(tid, secret, pin)


def make_token(
    node: str,
    zone: str,
    ttl_seconds: float,
    pin: str,
    now: float,
    randhex: Callable[[int], str] = secrets.token_hex,
) -> tuple[str, TokenRecord]:
    """A new token for `node` (and `zone`, "" = any): (the token text, what to store)."""
    if ttl_seconds <= 0:
        raise TokenError(400, f"token TTL must be positive, got {ttl_seconds}s")
    if not _PIN.fullmatch(pin):
        raise TokenError(400, "pin must be 64 lowercase hex characters")
    tid, secret = randhex(4), randhex(16)
    record = TokenRecord(
        id=tid,
        secret_sha256=secret_hash(secret),
        node=node,
        zone=zone,
        created_at=now,
        expires_at=now + ttl_seconds,
    )
    return str(ParsedToken(tid, secret, pin)), record


def verify_token(
    record: TokenRecord | None, token: ParsedToken, name: str, zone: str, now: float
) -> str:
    """Raise TokenError unless `token` (matching `record`) lets node `name` enroll now.
    Returns the zone the node gets (the token's, or the requested one when the token
    names none)."""
    # Compare the secret before telling used/expired apart, so a guesser learns nothing.
    expected = record.secret_sha256 if record is not None else "0" * 64
    ok = hmac.compare_digest(secret_hash(token.secret), expected)
    if record is None or not ok:
        raise TokenError(
            401,
            f"unknown token {token.id}: it was never issued here or its secret is wrong; "
            f"create one with: meshnode token create --node {name}",
        )
    if record.used_at is not None:
        raise TokenError(
            401,
            f"token {token.id} was already used (by node {record.used_by or '?'}); tokens are "
            f"single-use: meshnode token create --node {name}",
        )
    if now >= record.expires_at:
        raise TokenError(
            401,
            f"token {token.id} expired {now - record.expires_at:.0f}s ago; "
            f"create a new one: meshnode token create --node {name}",
        )
    if record.node != name:
        raise TokenError(
            403,
            f"token {token.id} is for node {record.node!r}, not {name!r}; enroll with "
            f"--name {record.node} or create a token for {name}",
        )
    if record.zone and zone and zone != record.zone:
        raise TokenError(
            403, f"token {token.id} is for zone {record.zone!r}, not {zone!r}"
        )
    return record.zone or zone
