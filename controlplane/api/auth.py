"""Who may call a route: the checks behind each route's declared :class:`Auth`.

Pure functions of what the request presented (peer address, Authorization header,
verified client certificate) and what the control plane knows; the I/O (reading
token hashes, refreshing the registry) stays in the app.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Container, Sequence

from cryptography import x509

from meshnode.controlplane.ca import RotatingCA
from meshnode.core.errors import ApiError
from meshnode.core.identity import node_name_from_certificate

__all__ = ["Auth", "admin_allowed", "bearer_of", "is_loopback", "node_of_certificate"]


class Auth(enum.Enum):
    """How a route authenticates its caller (declared in the route table)."""

    PUBLIC = "public"  # anyone (the trust bundle)
    TOKEN = "token"  # a one-time join token in the body, checked by the store (enroll)
    NODE = "node"  # the client certificate of a registered node
    ADMIN = "admin"  # a trusted (loopback) peer or 'Authorization: Bearer <admin token>'


def is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def bearer_of(authorization: Sequence[str]) -> str | None:
    """The single ``Authorization`` header's value; several are refused (400)."""
    if len(authorization) > 1:
        raise ApiError(400, "send one Authorization header, not several")
    return authorization[0] if authorization else None


def admin_allowed(
    peer_ip: str,
    authorization: str | None,
    token_hashes: set[str],
    trusted_peer: Callable[[str], bool] = is_loopback,
) -> bool:
    """May this request use /v1/admin? A trusted (loopback) peer, or a Bearer token
    whose SHA-256 is one of `token_hashes` (compared in constant time)."""
    if trusted_peer(peer_ip):
        return True
    if not authorization or not authorization.startswith("Bearer "):
        return False
    presented = hashlib.sha256(authorization[len("Bearer ") :].strip().encode()).hexdigest()
    ok = False
    for h in token_hashes:
        ok |= hmac.compare_digest(presented, h)
    return ok


def node_of_certificate(
    cert: x509.Certificate | None, trust_domain: str, ca: RotatingCA, nodes: Container[str]
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
