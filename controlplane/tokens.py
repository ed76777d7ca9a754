"""Join tokens: ``mn1.<id>.<secret>.<pin>`` (docs/protocol.md, "Enrollment").

The token's text form is defined once, in ``core/token.py``. Pure: no I/O, time
is a parameter. The control plane stores a :class:`TokenRecord` (only the SHA-256
of the secret); :func:`verify_token` decides whether an enrollment may consume it.
The pin is for the node (it checks the server's root before sending anything);
the control plane only checks its shape.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from meshnode.core.token import PIN_RE, JoinToken, TokenError

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "enrollment_address",
    "TokenRecord",
    "make_token",
    "secret_hash",
    "verify_token",
    "ZONE_TOKEN_NODE",
]

DEFAULT_TOKEN_TTL = 3600.0
# The `node` of a token that enrolls a zone control plane with the global one (not
# a node name: a node can never enroll with it, nor a zone with a node's token).
ZONE_TOKEN_NODE = "@zone"


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
    # What the operator put in the token for the node it enrolls: identities it may
    # host ("<namespace>/<service-account>", kept as the grant ``token-<node>``), and
    # the address it gets ("" = the address its enrollment comes from).
    identities: tuple[str, ...] = ()
    address: str = ""

    def consumed(self, now: float, by: str) -> TokenRecord:
        return replace(self, used_at=now, used_by=by)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def make_token(
    node: str,
    zone: str,
    ttl_seconds: float,
    pin: str,
    now: float,
    randhex: Callable[[int], str] = secrets.token_hex,
    identities: tuple[str, ...] = (),
    address: str = "",
) -> tuple[str, TokenRecord]:
    """A new token for `node` (and `zone`, "" = any): (the token text, what to store).
    `identities` and `address` are checked by the caller (they are the operator's)."""
    if ttl_seconds <= 0:
        raise TokenError(400, f"token TTL must be positive, got {ttl_seconds}s")
    if not PIN_RE.fullmatch(pin):
        raise TokenError(400, "pin must be 64 lowercase hex characters")
    tid, secret = randhex(4), randhex(16)
    record = TokenRecord(
        id=tid,
        secret_sha256=secret_hash(secret),
        node=node,
        zone=zone,
        created_at=now,
        expires_at=now + ttl_seconds,
        identities=identities,
        address=address,
    )
    return str(JoinToken(tid, secret, pin)), record


def verify_token(
    record: TokenRecord | None, token: JoinToken, name: str, zone: str, now: float
) -> str:
    """Raise TokenError unless `token` (matching `record`) lets node `name` enroll now.
    Returns the zone the node gets (the token's, or the requested one when the token
    names none)."""
    hint = (
        f"meshnode token create --zone-controlplane {zone or '<zone>'} (at the global "
        "control plane)"
        if name == ZONE_TOKEN_NODE
        else f"meshnode token create --node {name}"
    )
    # Compare the secret before telling used/expired apart, so a guesser learns nothing.
    expected = record.secret_sha256 if record is not None else "0" * 64
    ok = hmac.compare_digest(secret_hash(token.secret), expected)
    if record is None or not ok:
        raise TokenError(
            401,
            f"unknown token {token.id}: it was never issued here or its secret is wrong; "
            f"create one with: {hint}",
        )
    if record.used_at is not None:
        raise TokenError(
            401,
            f"token {token.id} was already used (by {record.used_by or '?'}); tokens are "
            f"single-use: {hint}",
        )
    if now >= record.expires_at:
        raise TokenError(
            401,
            f"token {token.id} expired {now - record.expires_at:.0f}s ago; "
            f"create a new one: {hint}",
        )
    if record.node != name and ZONE_TOKEN_NODE in (name, record.node):
        raise TokenError(
            403,
            f"token {token.id} is for "
            + ("a zone control plane" if record.node == ZONE_TOKEN_NODE else "a node")
            + ", not for "
            + ("a zone control plane" if name == ZONE_TOKEN_NODE else f"node {name}")
            + f"; create the right one: {hint}",
        )
    if record.node != name:
        raise TokenError(
            403,
            f"token {token.id} is for node {record.node!r}, not {name!r}; enroll with "
            f"--name {record.node} or create a token for {name}",
        )
    if record.zone and zone and zone != record.zone:
        raise TokenError(403, f"token {token.id} is for zone {record.zone!r}, not {zone!r}")
    return record.zone or zone


def enrollment_address(record: TokenRecord, claimed: str, peer: str) -> str:
    """The address a node enrolling with `record` gets: the token's, else the address
    the enrollment came from (`peer`). A node never chooses it: a `claimed` address
    that differs is refused (403), so a node cannot pose as another's address and
    draw its traffic."""
    address = record.address or peer
    if claimed and claimed != address:
        source = "its token names" if record.address else "the enrollment came from"
        raise TokenError(
            403,
            f"node {record.node} asked for address {claimed}, but {source} {address}; a "
            "node's address is fixed at enrollment: enroll from the address the node will "
            "use, or have the operator name it with `meshnode token create --node "
            f"{record.node} --address {claimed}`",
        )
    return address
