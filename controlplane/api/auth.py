"""Who may call a route: the checks behind each route's declared :class:`Auth`.

Pure functions of what the request presented (peer address, Authorization header,
verified client certificate) and what the control plane knows; the I/O (reading
token hashes, refreshing the registry) stays in the app.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Container, Sequence
from typing import Protocol

from cryptography import x509

from meshnode.core.errors import ApiError
from meshnode.core.identity import node_name_from_certificate

__all__ = ["Auth", "admin_allowed", "bearer_of", "local_admin_allowed", "node_of_certificate"]


class Auth(enum.Enum):
    """How a route authenticates its caller (declared in the route table)."""

    PUBLIC = "public"  # anyone (the trust bundle)
    TOKEN = "token"  # a one-time join token in the body, checked by the store (enroll)
    NODE = "node"  # the client certificate of a registered node
    ZONE = "zone"  # the client certificate of an enrolled zone's control plane (global only)
    ADMIN = "admin"  # root on the admin Unix socket, or 'Authorization: Bearer <admin token>'


def bearer_of(authorization: Sequence[str]) -> str | None:
    """The single ``Authorization`` header's value; several are refused (400)."""
    if len(authorization) > 1:
        raise ApiError(400, "send one Authorization header, not several")
    return authorization[0] if authorization else None


def admin_allowed(authorization: str | None, token_hashes: set[str]) -> bool:
    """May this request use /v1/admin over TCP? Only with a Bearer token whose SHA-256
    is one of `token_hashes` (compared in constant time). No address is trusted,
    loopback included: every local account, a port-forward or an SSRF on the host,
    and meshnode's own 127.0.0.6 all come from loopback."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    presented = hashlib.sha256(authorization[len("Bearer ") :].strip().encode()).hexdigest()
    ok = False
    for h in token_hashes:
        ok |= hmac.compare_digest(presented, h)
    return ok


def local_admin_allowed(peer_uid: int | None, own_uid: int) -> bool:
    """May a caller on the admin Unix socket use /v1/admin? Root, or the control
    plane's own user, as the kernel reports the caller (SO_PEERCRED), never as the
    caller claims. The socket's mode (0600) already keeps others out; this is the
    second lock."""
    return peer_uid is not None and peer_uid in (0, own_uid)


class LeafVerifier(Protocol):
    def verify_leaf(self, leaf: x509.Certificate) -> bool: ...


def node_of_certificate(
    cert: x509.Certificate | None, trust_domain: str, ca: LeafVerifier, nodes: Container[str]
) -> str:
    """The registered node a verified client certificate belongs to, or ApiError."""
    if cert is None:
        raise ApiError(
            401, "the node API needs the node's client certificate (from `meshnode enroll`)"
        )
    name = node_name_from_certificate(cert, trust_domain)
    if name is None:
        raise ApiError(
            403,
            f"the client certificate is not a node certificate of trust domain {trust_domain} "
            f"(expected URI SAN spiffe://{trust_domain}/node/<name>)",
        )
    if not ca.verify_leaf(cert):
        raise ApiError(
            403, f"the certificate of node {name} is expired or from a retired CA; re-enroll"
        )
    if name not in nodes:
        raise ApiError(
            403, f"node {name} is not registered (deleted?); enroll it again with a new token"
        )
    return name
