"""Keys, CSRs, certificate chains and root pins: the PKI pieces both a node and
the control plane need. Pure functions, except ``write_private_key``.

Keys are ECDSA P-256. A node makes its keys itself and only ever sends CSRs;
private keys are written 0600 and never leave the node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshnode.core.errors import MeshnodeError
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import SpiffeId, node_uri

__all__ = [
    "NODE_OU",
    "issued_to_node",
    "PinMismatch",
    "PkiError",
    "certificate_expiry",
    "find_pinned_root",
    "generate_private_key",
    "is_self_signed_ca",
    "load_certificate_chain",
    "make_csr",
    "make_node_csr",
    "private_key_pem",
    "root_pin",
    "subject_name",
    "trust_domain_of_root",
    "write_private_key",
]

CURVE = ec.SECP256R1
HASH = hashes.SHA256


class PkiError(MeshnodeError, ValueError):
    """A certificate, chain or key is unusable; the message says which and why."""


class PinMismatch(PkiError):
    """The server does not hold the root certificate a join token pins."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key."""
    return ec.generate_private_key(CURVE())


def subject_name(trust_domain: str, common_name: str | None = None, node: str = "") -> x509.Name:
    """The subject meshnode puts on its certificates and CSRs: O=<trust domain>
    [, OU=node:<the node it was issued to>][, CN=...]."""
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)]
    if node:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, NODE_OU + node))
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


# The common name of a control plane's own intermediate CA (single or global mode).
# A zone's intermediate is named "meshnode zone <zone> intermediate CA" by the root
# that signs it, so a certificate whose issuer has this name was signed by a global
# (or single) control plane's intermediate, never by a zone's: what a zone checks
# the global's serving certificate by (a zone control plane serves the same URI).
INTERMEDIATE_CN = "meshnode intermediate CA"


def issued_by_control_plane_intermediate(cert: x509.Certificate) -> bool:
    """Whether `cert`'s issuer is a control plane's own intermediate (not a zone's).
    Meaningful only for a certificate whose chain was verified."""
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return len(names) == 1 and names[0].value == INTERMEDIATE_CN


# A workload certificate names the node it was issued to (subject OU), so a
# receiving proxy can refuse it once that node is deleted (Revocation in
# core/contracts). Not an identity: the SPIFFE ID in the URI SAN is.
NODE_OU = "node:"


def issued_to_node(cert: x509.Certificate) -> str:
    """The node a workload certificate was issued to ("" if it names none)."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        if value.startswith(NODE_OU):
            return value[len(NODE_OU) :]
    return ""


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR for a workload `identity`, signed with `key` (proof of possession)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject_name(identity.trust_domain))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(key, HASH())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def make_node_csr(key: ec.EllipticCurvePrivateKey, trust_domain: str | None, name: str) -> bytes:
    """A PEM CSR for a node key. The CA sets the SAN itself; asking for the expected
    one makes the request self-describing."""
    attrs = []
    if trust_domain:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if trust_domain:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(node_uri(trust_domain, name))]
            ),
            critical=False,
        )
    return builder.sign(key, HASH()).public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    write_file_atomic(path, private_key_pem(key), 0o600)


def load_certificate_chain(pem: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order (leaf first for a chain we issued)."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PkiError(f"cannot parse PEM certificate chain: {exc}") from None
    if not chain:
        raise PkiError("PEM certificate chain is empty")
    return chain


def certificate_expiry(pem: bytes) -> datetime:
    """When the chain in `pem` stops verifying: the earliest notAfter (UTC) in it."""
    return min(cert.not_valid_after_utc for cert in load_certificate_chain(pem))


# --- root pins ----------------------------------------------------------------------


def root_pin(cert: x509.Certificate | bytes) -> str:
    """The pin of a root certificate (object or DER): hex SHA-256 of its DER."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def is_self_signed_ca(cert: x509.Certificate) -> bool:
    """A CA certificate (basicConstraints CA) that signed itself: a root."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca or cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def find_pinned_root(certs: Sequence[x509.Certificate], pin: str, url: str) -> x509.Certificate:
    """The certificate in `certs` (a TLS chain, a trust bundle, both) whose pin is
    `pin`; it must be a self-signed CA certificate. PinMismatch otherwise, naming the
    roots that were offered. The one pin check of the project: enrollment and the
    admin CLI's discovery both use it."""
    pin = pin.lower()
    for cert in certs:
        if root_pin(cert) == pin:
            if not is_self_signed_ca(cert):
                raise PinMismatch(
                    f"the certificate pinned by the token ({cert.subject.rfc4514_string()}) "
                    f"is not a self-signed CA certificate; refusing the control plane at {url}"
                )
            return cert
    offered = sorted({root_pin(c) for c in certs if is_self_signed_ca(c)})
    if offered:
        got = ", ".join(offered)
    elif certs:
        got = (
            "no root certificate at all (the chain ends at "
            f"{certs[-1].issuer.rfc4514_string()!r}, which it does not include)"
        )
    else:
        got = "no certificates"
    raise PinMismatch(
        f"the control plane at {url} is not the one this token was made for: "
        f"expected pin {pin}, got {got}"
    )


def trust_domain_of_root(root: x509.Certificate) -> str | None:
    """The trust domain a meshnode root names in its O= attribute, if it names one."""
    values = root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(values) == 1 and isinstance(values[0].value, str):
        return values[0].value
    return None
