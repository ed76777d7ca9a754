"""Re-checking live traffic when the rules change. Pure.

Authorization happens when a tunnel is opened; a policy, grant or node change
afterwards would otherwise leave connections running that the new rules refuse.
On every new state ztunnel re-runs the check for each delivered connection and
closes those now denied (as Istio's policy watcher does). When a new trust
bundle drops a root, HBONE connections verified under the old one are closed. A
pooled tunnel is not used past the expiry of either end's certificate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshnode.core.contracts import Revocation
from meshnode.core.pki import issued_to_node

__all__ = ["denied_now", "not_after", "revoked_by", "root_fingerprints", "roots_removed"]

C = TypeVar("C")


def denied_now(conns: Iterable[C], check: Callable[[C], str | None]) -> list[tuple[C, str]]:
    """The connections `check` refuses now, each with its reason."""
    out: list[tuple[C, str]] = []
    for conn in conns:
        reason = check(conn)
        if reason is not None:
            out.append((conn, reason))
    return out


def root_fingerprints(pem: bytes) -> frozenset[bytes]:
    """SHA-256 fingerprints of the certificates of a PEM trust bundle."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return frozenset()
    return frozenset(c.fingerprint(hashes.SHA256()) for c in certs)


def roots_removed(old: frozenset[bytes], new: frozenset[bytes]) -> bool:
    """Did the new bundle drop a root the old one had? Then connections
    verified under the old bundle may rest on a root that is no longer
    trusted. (A peer's chain is leaf + intermediate, and Python's ssl does not
    give us the intermediate it sent, so we cannot tell which root a connection
    rests on: all of them are closed and the clients reconnect. Only added
    roots -- the first half of a rotation -- close nothing.)"""
    return bool(old - new)


def not_after(cert_der: bytes) -> float:
    """A certificate's expiry as a Unix time (0 if it does not parse)."""
    try:
        return x509.load_der_x509_certificate(cert_der).not_valid_after_utc.timestamp()
    except ValueError:
        return 0.0


@functools.lru_cache(maxsize=4096)
def _issued(cert_der: bytes) -> tuple[str, float]:
    cert = x509.load_der_x509_certificate(cert_der)
    return issued_to_node(cert), cert.not_valid_before_utc.timestamp()


def revoked_by(cert_der: bytes | None, revocations: Sequence[Revocation]) -> str | None:
    """Why a peer's certificate is refused (issued to a node deleted since), or
    None. A certificate that names no node, or does not parse, is not revoked here
    (the TLS layer already verified the chain)."""
    if not cert_der or not revocations:
        return None
    try:
        node, not_before = _issued(cert_der)
    except ValueError:
        return None
    for rev in revocations:
        if rev.revokes(node, not_before):
            return f"its certificate was issued to node {node}, deleted since"
    return None
