"""The mesh certificate authority: a root, one intermediate, and workload X.509-SVIDs.

ECDSA P-256 throughout. The root signs only intermediates (path length 0); an
intermediate signs workload, node and control-plane certificates. Nodes generate
their keys locally and send a CSR (the key never leaves the node); the module-level
helpers below are that node side. Time is a parameter (`now`) so tests and the
future rotation logic can drive it.

Multi-zone (docs/multizone.md): one trust domain, one root. The global control
plane holds the root key and its own intermediate; it issues each zone control
plane an intermediate of its own (`issue_zone_intermediate`). A zone control plane
holds the root certificate but not its key (`CertificateAuthority.for_zone`), so
it keeps issuing for its nodes while the global is down, and every node of every
zone trusts the same root bundle. A zone intermediate carries a name constraint:
it can only certify URIs in the trust domain.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import (
    IdentityError,
    SpiffeId,
    check_node_name,
    controlplane_uri,
    node_uri,
    validate_trust_domain,
    zone_controlplane_uri,
)
from meshnode.core.pki import (
    CURVE,
    HASH,
    INTERMEDIATE_CN,
    PkiError,
    generate_private_key,
    is_self_signed_ca,
    private_key_pem,
    subject_name,
    write_private_key,
)

__all__ = [
    "CAError",
    "CertificateAuthority",
    "RotatingCA",
    "minimum_rotation_overlap",
]

ROOT_CERT_FILE = "root.pem"
ROOT_KEY_FILE = "root-key.pem"
INTERMEDIATE_CERT_FILE = "intermediate.pem"
INTERMEDIATE_KEY_FILE = "intermediate-key.pem"

DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=365)
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
# Backdate notBefore so a peer whose clock is slightly behind still accepts a fresh cert.
CLOCK_SKEW = timedelta(minutes=1)

_CURVE = CURVE
_HASH = HASH


class CAError(PkiError):
    """The CA cannot do what was asked; the message says what and why."""


# --- the CA -----------------------------------------------------------------------


class CertificateAuthority:
    """A root and an intermediate for one trust domain; issues workload SVIDs.

    With `root_key` None it is a zone CA: it holds the root certificate (for the
    trust bundle and chain checks) but not its key, and issues with its own
    intermediate exactly as a CA with the root key does. What needs the root key
    (issuing zone intermediates, rotation) is the global control plane's job.
    """

    def __init__(
        self,
        root_cert: x509.Certificate,
        root_key: ec.EllipticCurvePrivateKey | None,
        intermediate_cert: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        """Assemble a CA from existing material; checks that the pieces belong together."""
        self._trust_domain = _trust_domain_of(root_cert)
        if root_key is not None:
            _check_key_pair(root_cert, root_key, "root")
        elif not is_self_signed_ca(root_cert):
            # Without its key nothing else proves this is the root: peers would trust
            # whatever it is as the mesh root.
            raise CAError(
                f"root certificate {root_cert.subject.rfc4514_string()!r} is not a "
                "self-signed CA certificate: a zone CA needs the global control plane's root"
            )
        _check_key_pair(intermediate_cert, intermediate_key, "intermediate")
        try:
            intermediate_cert.verify_directly_issued_by(root_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CAError(f"intermediate certificate was not issued by the root: {exc}") from None
        if _trust_domain_of(intermediate_cert) != self._trust_domain:
            raise CAError("root and intermediate certificates name different trust domains")
        self._root_cert = root_cert
        self._root_key = root_key
        self._intermediate_cert = intermediate_cert
        self._intermediate_key = intermediate_key

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """A new root and intermediate for `trust_domain`."""
        try:
            validate_trust_domain(trust_domain)
        except IdentityError as exc:
            raise CAError(str(exc)) from None
        now = _utc(now)
        root_key = generate_private_key()
        root_name = subject_name(trust_domain, "meshnode root CA")
        root_cert = (
            _builder(root_name, root_name, root_key.public_key(), now, now + root_ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
            )
            .sign(root_key, _HASH())
        )

        intermediate_key = generate_private_key()
        # An issued certificate must not outlive its issuer; verifiers reject that.
        not_after = min(now + intermediate_ttl, root_cert.not_valid_after_utc)
        intermediate_cert = _sign_intermediate(
            root_cert,
            root_key,
            subject_name(trust_domain, INTERMEDIATE_CN),
            intermediate_key.public_key(),
            now,
            not_after,
        )
        return cls(root_cert, root_key, intermediate_cert, intermediate_key)

    @classmethod
    def for_zone(
        cls,
        root_cert: x509.Certificate,
        intermediate_cert: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
    ) -> CertificateAuthority:
        """A zone CA: the global root's certificate (never its key) and the zone's own
        intermediate, issued by that root (`issue_zone_intermediate`), with its key."""
        return cls(root_cert, None, intermediate_cert, intermediate_key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Read a CA written by `save`. Refuses key files readable by group or others.

        A missing root-key.pem means a zone CA (which `save` writes without one); the
        certificates and the intermediate key are always required."""
        directory = Path(directory)
        root_cert = _read_certificate(directory / ROOT_CERT_FILE)
        intermediate_cert = _read_certificate(directory / INTERMEDIATE_CERT_FILE)
        root_key = _read_optional_private_key(directory / ROOT_KEY_FILE)
        intermediate_key = _read_private_key(directory / INTERMEDIATE_KEY_FILE)
        return cls(root_cert, root_key, intermediate_cert, intermediate_key)

    def save(self, directory: Path) -> None:
        """Write the PEM files to `directory` (created 0700); keys 0600, atomically.

        A zone CA has no root-key.pem to write, and writes none (an older one left
        in `directory` is not removed: do not reuse a global CA's directory)."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        pem = serialization.Encoding.PEM
        # Keys first: a reader that sees new certificates also finds their keys.
        if self._root_key is not None:
            write_private_key(directory / ROOT_KEY_FILE, self._root_key)
        write_private_key(directory / INTERMEDIATE_KEY_FILE, self._intermediate_key)
        write_file_atomic(directory / ROOT_CERT_FILE, self._root_cert.public_bytes(pem), 0o644)
        write_file_atomic(
            directory / INTERMEDIATE_CERT_FILE, self._intermediate_cert.public_bytes(pem), 0o644
        )

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root_cert

    @property
    def intermediate_certificate(self) -> x509.Certificate:
        return self._intermediate_cert

    @property
    def holds_root_key(self) -> bool:
        """False for a zone CA: it cannot issue intermediates nor rotate."""
        return self._root_key is not None

    def trust_bundle_pem(self) -> bytes:
        """The roots a peer should trust (one today; two during a future root rotation)."""
        return self._root_cert.public_bytes(serialization.Encoding.PEM)

    def issue_workload_certificate(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        node: str = "",
        now: datetime | None = None,
    ) -> bytes:
        """Sign an X.509-SVID for `identity`, issued to `node` (named in the subject,
        for revocation); returns PEM of leaf + intermediate.

        The identity comes from the caller (who authenticated the requester), never
        from the CSR: whatever names the CSR asks for are ignored. The CSR only
        contributes its public key, after its self-signature is checked.
        """
        if identity.trust_domain != self._trust_domain:
            raise CAError(
                f"refusing to issue for {identity.uri}: this CA serves trust domain "
                f"{self._trust_domain!r}, not {identity.trust_domain!r}"
            )
        return self._issue_leaf(
            _csr_public_key(csr_pem),
            [x509.UniformResourceIdentifier(identity.uri)],
            ttl,
            now,
            node=node,
        )

    def issue_node_certificate(
        self,
        csr_pem: bytes,
        node_name: str,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        now: datetime | None = None,
    ) -> bytes:
        """A node certificate: exactly one URI SAN ``spiffe://<td>/node/<name>``, client
        and server auth; PEM of leaf + intermediate. As for workloads, only the CSR's
        public key is used. This is never a workload identity: the ``/node/`` path does
        not parse as ``/ns/<ns>/sa/<sa>``."""
        _check_node_name(node_name)
        return self._issue_leaf(
            _csr_public_key(csr_pem),
            [x509.UniformResourceIdentifier(node_uri(self._trust_domain, node_name))],
            ttl,
            now,
        )

    def issue_controlplane_certificate(
        self,
        key: ec.EllipticCurvePrivateKey,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        now: datetime | None = None,
    ) -> bytes:
        """The control plane's serving certificate for `key` (made by the control plane
        itself): URI SAN ``spiffe://<td>/controlplane`` plus DNS and IP SANs."""
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(controlplane_uri(self._trust_domain))
        ]
        names += [x509.DNSName(d) for d in dict.fromkeys(dns_names)]
        for ip in dict.fromkeys(ip_addresses):
            try:
                addr: IPv4Address | IPv6Address = ip_address(ip)
            except ValueError:
                raise CAError(f"{ip!r} is not an IP address") from None
            names.append(x509.IPAddress(addr))
        return self._issue_leaf(key.public_key(), names, ttl, now)

    def issue_zone_intermediate(
        self,
        csr_pem: bytes,
        zone: str,
        ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
        *,
        now: datetime | None = None,
    ) -> bytes:
        """A zone control plane's own intermediate CA certificate, signed by the root;
        returns its PEM (the certificate only: the zone has the root already).

        Only the CSR's public key is used (after its self-signature is checked); the
        subject is ``O=<td>, CN=meshnode zone <zone> intermediate CA``. Path length 0,
        and a critical name constraint permitting only URIs whose host is the trust
        domain: with it, verifiers (OpenSSL) refuse whatever the zone would certify
        for another trust domain. notBefore is backdated by the clock skew, but not
        before the root's; notAfter is capped at the root's.
        """
        if self._root_key is None:
            raise CAError(
                "this control plane does not hold the root key; zone intermediates are "
                "issued by the global control plane"
            )
        _zone_controlplane_uri(self._trust_domain, zone)  # `zone` is a DNS label
        if ttl <= timedelta(0):
            raise CAError(f"certificate TTL must be positive, got {ttl}")
        public_key = _csr_public_key(csr_pem)
        now = _utc(now)
        root_expiry = self._root_cert.not_valid_after_utc
        if now >= root_expiry:
            raise CAError(f"root CA certificate expired at {root_expiry.isoformat()}")
        constraints = x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(self._trust_domain)],
            excluded_subtrees=None,
        )
        cert = _sign_intermediate(
            self._root_cert,
            self._root_key,
            subject_name(self._trust_domain, f"meshnode zone {zone} intermediate CA"),
            public_key,
            max(now - CLOCK_SKEW, self._root_cert.not_valid_before_utc),
            min(now + ttl, root_expiry),
            constraints,
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_zone_controlplane_certificate(
        self,
        csr_pem: bytes,
        zone: str,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        now: datetime | None = None,
    ) -> bytes:
        """The client certificate a zone control plane authenticates to the global
        with: exactly one URI SAN ``spiffe://<td>/zone/<zone>/controlplane``, client
        and server auth, signed by this CA's intermediate; PEM of leaf + intermediate.
        Only the CSR's public key is used."""
        uri = _zone_controlplane_uri(self._trust_domain, zone)
        return self._issue_leaf(
            _csr_public_key(csr_pem), [x509.UniformResourceIdentifier(uri)], ttl, now
        )

    def to_pem(self) -> dict[str, bytes]:
        """The four PEM blobs (keys unencrypted: keep them where only the CP reads).
        A zone CA's ``root_key`` is empty (b""): it has none."""
        pem = serialization.Encoding.PEM
        return {
            "root_cert": self._root_cert.public_bytes(pem),
            "root_key": b"" if self._root_key is None else private_key_pem(self._root_key),
            "intermediate_cert": self._intermediate_cert.public_bytes(pem),
            "intermediate_key": private_key_pem(self._intermediate_key),
        }

    @classmethod
    def from_pem(
        cls, root_cert: bytes, root_key: bytes, intermediate_cert: bytes, intermediate_key: bytes
    ) -> CertificateAuthority:
        """Inverse of `to_pem`: an empty (or all-whitespace) `root_key` is a zone CA."""
        try:
            rc = x509.load_pem_x509_certificate(root_cert)
            ic = x509.load_pem_x509_certificate(intermediate_cert)
            rk = (
                serialization.load_pem_private_key(root_key, password=None)
                if root_key.strip()
                else None
            )
            ik = serialization.load_pem_private_key(intermediate_key, password=None)
        except (ValueError, TypeError) as exc:
            raise CAError(f"stored CA material is not valid PEM: {exc}") from None
        if not isinstance(rk, ec.EllipticCurvePrivateKey | None) or not isinstance(
            ik, ec.EllipticCurvePrivateKey
        ):
            raise CAError("stored CA keys must be ECDSA P-256")
        return cls(rc, rk, ic, ik)

    def _issue_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        names: list[x509.GeneralName],
        ttl: timedelta,
        now: datetime | None,
        node: str = "",
    ) -> bytes:
        if ttl <= timedelta(0):
            raise CAError(f"certificate TTL must be positive, got {ttl}")
        now = _utc(now)
        issuer_expiry = self._intermediate_cert.not_valid_after_utc
        if now >= issuer_expiry:
            raise CAError(f"intermediate CA certificate expired at {issuer_expiry.isoformat()}")
        leaf = (
            _builder(
                subject_name(self._trust_domain, node=node),
                self._intermediate_cert.subject,
                public_key,
                now - CLOCK_SKEW,
                min(now + ttl, issuer_expiry),
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self._intermediate_cert), critical=False)
            .sign(self._intermediate_key, _HASH())
        )
        return _pem_chain([leaf, self._intermediate_cert])


# --- several roots: rotation with overlap -----------------------------------------


class RotatingCA:
    """The CAs of one trust domain, oldest first; the last one signs.

    ``rotate(overlap)`` adds a new root + intermediate and gives every older one a
    retirement time `overlap` from now. Until then the trust bundle carries the old
    roots too, so certificates they signed keep verifying while nodes renew; after
    it, only roots not retired.
    """

    def __init__(self, entries: Sequence[tuple[CertificateAuthority, datetime | None]]) -> None:
        if not entries:
            raise CAError("a CA set needs at least one root")
        domains = {ca.trust_domain for ca, _ in entries}
        if len(domains) != 1:
            raise CAError(f"CA set mixes trust domains: {', '.join(sorted(domains))}")
        if entries[-1][1] is not None:
            raise CAError("the newest CA must not be retired")
        self.entries: tuple[tuple[CertificateAuthority, datetime | None], ...] = tuple(entries)

    @property
    def active(self) -> CertificateAuthority:
        return self.entries[-1][0]

    @property
    def trust_domain(self) -> str:
        return self.active.trust_domain

    def trusted(self, now: datetime | None = None) -> list[CertificateAuthority]:
        """The CAs whose roots are in the bundle at `now` (newest last)."""
        now = _utc(now)
        return [ca for ca, retire in self.entries if retire is None or now < retire]

    def trust_bundle_pem(self, now: datetime | None = None) -> bytes:
        """The trusted roots, each once (a zone renews its intermediate under the
        same root: two entries, one root)."""
        roots = {
            c.root_certificate.fingerprint(_HASH()): c.root_certificate for c in self.trusted(now)
        }
        return _pem_chain(list(roots.values()))

    def serving(self, now: datetime | None = None) -> CertificateAuthority:
        """The CA that signs the control plane's own serving certificate: the oldest
        still trusted. Every node trusts it during an overlap (nodes learn the new
        root from their next slice), so a rotation never cuts a node off."""
        return self.trusted(now)[0]

    def rotate(
        self,
        overlap: timedelta,
        *,
        minimum: timedelta = timedelta(0),
        now: datetime | None = None,
    ) -> RotatingCA:
        """A new set whose new root signs from now on; older roots retire after
        `overlap`, which must be at least `minimum` (see `minimum_rotation_overlap`).
        Only where the root key is: a zone control plane's set refuses."""
        if not self.active.holds_root_key:
            raise CAError(
                "this is a zone control plane: its CA is rotated by the global control "
                "plane (meshnode controlplane rotate-ca there)"
            )
        if overlap < timedelta(0):
            raise CAError(f"overlap must not be negative, got {overlap}")
        if overlap < minimum:
            raise CAError(
                f"an overlap of {_seconds(overlap)} would lock nodes out: until every node "
                "has renewed its certificates under the new root and learnt the new trust "
                "bundle, it still presents certificates only the old root can verify. "
                f"The overlap must be at least one certificate lifetime plus the watch "
                f"interval: {_seconds(minimum)} here (pass --overlap {int(minimum.total_seconds())}"
                " or more)"
            )
        now = _utc(now)
        retire_at = now + overlap
        kept = [
            (ca, retire if retire is not None and retire < retire_at else retire_at)
            for ca, retire in self.entries
            if retire is None or retire > now
        ]
        return RotatingCA([*kept, (CertificateAuthority.create(self.trust_domain, now=now), None)])

    def verify_leaf(self, leaf: x509.Certificate, now: datetime | None = None) -> bool:
        """True when `leaf` was signed by the intermediate of a trusted CA and is in date."""
        now = _utc(now)
        if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
            return False
        for ca in self.trusted(now):
            inter = ca.intermediate_certificate
            if not inter.not_valid_before_utc <= now < inter.not_valid_after_utc:
                continue
            try:
                leaf.verify_directly_issued_by(inter)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False


def minimum_rotation_overlap(cert_ttl: timedelta, watch_interval: timedelta) -> timedelta:
    """The shortest safe overlap for a root rotation: a node holding a certificate
    issued just before the rotation keeps presenting it for up to its whole
    lifetime (it renews at half-life, but may be offline meanwhile), and learns the
    new bundle within one watch interval; allow clock skew on top."""
    return cert_ttl + watch_interval + CLOCK_SKEW


def _seconds(delta: timedelta) -> str:
    return f"{int(delta.total_seconds())} s"


# --- internals ----------------------------------------------------------------------


def _check_node_name(name: str) -> None:
    try:
        check_node_name(name)
    except IdentityError as exc:
        raise CAError(str(exc)) from None


def _zone_controlplane_uri(trust_domain: str, zone: str) -> str:
    """``spiffe://<td>/zone/<zone>/controlplane``, or CAError unless `zone` is a DNS label."""
    try:
        return zone_controlplane_uri(trust_domain, zone)
    except IdentityError as exc:
        raise CAError(f"cannot issue for zone {zone!r}: {exc}") from None


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise CAError("`now` must be timezone-aware")
    return now.astimezone(UTC)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _sign_intermediate(
    root_cert: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
    name_constraints: x509.NameConstraints | None = None,
) -> x509.Certificate:
    """An intermediate CA certificate for `public_key`, signed by the root: path
    length 0 (it signs only leaves), CA key usage, SKI and the root's AKI."""
    builder = (
        _builder(subject, root_cert.subject, public_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(root_cert), critical=False)
    )
    if name_constraints is not None:
        # RFC 5280 4.2.1.10: conforming CAs mark name constraints critical.
        builder = builder.add_extension(name_constraints, critical=True)
    return builder.sign(root_key, _HASH())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _pem_chain(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)


def _csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, once the CSR proves possession of it and it is P-256."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CAError(f"cannot parse PEM certificate signing request: {exc}") from None
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CAError(f"CSR key must be ECDSA P-256, got {type(public_key).__name__}")
    if not isinstance(public_key.curve, _CURVE):
        raise CAError(f"CSR key must be on curve P-256 (secp256r1), got {public_key.curve.name}")
    if not csr.is_signature_valid:
        raise CAError("CSR signature does not verify: the request was altered or is corrupt")
    return public_key


def _trust_domain_of(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise CAError(
            f"CA certificate {cert.subject.rfc4514_string()!r} must name its trust domain "
            "in exactly one O= attribute"
        )
    trust_domain = values[0].value
    try:
        validate_trust_domain(trust_domain)
    except IdentityError as exc:
        raise CAError(f"CA certificate names an invalid trust domain: {exc}") from None
    return trust_domain


def _check_key_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        raise CAError(f"{what} key must be ECDSA P-256")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CAError(f"{what} private key does not match the {what} certificate")


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise CAError(f"cannot read CA certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CAError(f"{path} is not a PEM certificate: {exc}") from None


def _read_optional_private_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """As `_read_private_key`, but None when there is no file at `path` (a dangling
    link is not "no file": it fails to read)."""
    if not os.path.lexists(path):
        return None
    return _read_private_key(path)


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as exc:
        raise CAError(f"cannot read CA key {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CAError(
            f"CA key {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"fix with: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"CA key {path} must be ECDSA P-256, got {type(key).__name__}")
    return key
