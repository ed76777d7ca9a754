from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from meshnode.controlplane.ca import CAError, CertificateAuthority
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import SpiffeId, spiffe_id_from_certificate
from meshnode.core.pki import (
    PkiError,
    certificate_expiry,
    generate_private_key,
    load_certificate_chain,
    make_csr,
    write_private_key,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
DB = SpiffeId(TD, "data", "postgres")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def _issue(
    ca: CertificateAuthority,
    identity: SpiffeId,
    ttl: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> list[x509.Certificate]:
    csr = make_csr(generate_private_key(), identity)
    return load_certificate_chain(ca.issue_workload_certificate(csr, identity, ttl, now=now))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return cert.extensions.get_extension_for_class(kind)


# --- the CA itself ---------------------------------------------------------------------


def test_create_builds_root_and_intermediate(ca: CertificateAuthority) -> None:
    root, intermediate = ca.root_certificate, ca.intermediate_certificate
    assert ca.trust_domain == TD
    for cert in (root, intermediate):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
        usage = _ext(cert, x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        assert _ext(cert, x509.BasicConstraints).critical

    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert _ext(root, x509.BasicConstraints).value.ca

    intermediate.verify_directly_issued_by(root)
    constraints = _ext(intermediate, x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert intermediate.not_valid_after_utc <= root.not_valid_after_utc


def test_create_ttls() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    ca = CertificateAuthority.create(
        "example.org", root_ttl=timedelta(days=30), intermediate_ttl=timedelta(days=60), now=now
    )
    assert ca.root_certificate.not_valid_after_utc == now + timedelta(days=30)
    # Capped: an intermediate must not outlive its root.
    assert ca.intermediate_certificate.not_valid_after_utc == now + timedelta(days=30)


@pytest.mark.parametrize("trust_domain", ["", "Cluster.Local", "a/b", "spiffe://x"])
def test_create_rejects_bad_trust_domain(trust_domain: str) -> None:
    with pytest.raises(CAError, match="trust domain"):
        CertificateAuthority.create(trust_domain)


def test_trust_bundle_is_the_root(ca: CertificateAuthority) -> None:
    assert load_certificate_chain(ca.trust_bundle_pem()) == [ca.root_certificate]


def test_save_load_round_trip(ca: CertificateAuthority, tmp_path: Path) -> None:
    directory = tmp_path / "state" / "ca"
    ca.save(directory)

    assert _mode(directory) == 0o700
    assert sorted(os.listdir(directory)) == [
        "intermediate-key.pem",
        "intermediate.pem",
        "root-key.pem",
        "root.pem",
    ]
    assert _mode(directory / "root-key.pem") == 0o600
    assert _mode(directory / "intermediate-key.pem") == 0o600
    assert (directory / "root-key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    loaded = CertificateAuthority.load(directory)
    assert loaded.trust_domain == TD
    assert loaded.root_certificate == ca.root_certificate
    assert loaded.intermediate_certificate == ca.intermediate_certificate
    assert loaded.trust_bundle_pem() == ca.trust_bundle_pem()
    # The loaded keys work: a leaf from the loaded CA chains to the original root.
    leaf, intermediate = _issue(loaded, WEB)
    leaf.verify_directly_issued_by(ca.intermediate_certificate)

    ca.save(directory)  # overwriting in place is fine and leaves no temp files behind
    assert len(os.listdir(directory)) == 4


def test_save_tightens_an_existing_directory(ca: CertificateAuthority, tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir(mode=0o755)
    ca.save(directory)
    assert _mode(directory) == 0o700


def test_load_refuses_a_key_readable_by_others(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path)
    os.chmod(tmp_path / "root-key.pem", 0o644)
    with pytest.raises(CAError, match=r"accessible by group or others.*chmod 600"):
        CertificateAuthority.load(tmp_path)


def test_load_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="cannot read CA certificate .*root.pem"):
        CertificateAuthority.load(tmp_path)


def test_load_refuses_mismatched_material(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path / "a")
    CertificateAuthority.create(TD).save(tmp_path / "b")
    shutil.copy2(tmp_path / "b" / "intermediate-key.pem", tmp_path / "a" / "intermediate-key.pem")
    with pytest.raises(CAError, match="intermediate private key does not match"):
        CertificateAuthority.load(tmp_path / "a")

    ca.save(tmp_path / "a")
    for name in ("intermediate.pem", "intermediate-key.pem"):
        shutil.copy2(tmp_path / "b" / name, tmp_path / "a" / name)
    with pytest.raises(CAError, match="not issued by the root"):
        CertificateAuthority.load(tmp_path / "a")


# --- node-side helpers -----------------------------------------------------------------


def test_write_file_atomic_sets_exact_mode_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f"
    old_umask = os.umask(0o077)
    try:
        write_file_atomic(target, b"one", 0o644)
    finally:
        os.umask(old_umask)
    assert _mode(target) == 0o644
    write_file_atomic(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert _mode(target) == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_write_private_key(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "key.pem"
    write_private_key(path, key)
    assert _mode(path) == 0o600
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


def test_make_csr(ca: CertificateAuthority) -> None:
    csr = x509.load_pem_x509_csr(make_csr(generate_private_key(), WEB))
    assert csr.is_signature_valid
    san = _ext_csr(csr)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]


def _ext_csr(csr: x509.CertificateSigningRequest) -> x509.SubjectAlternativeName:
    return csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_load_certificate_chain_and_expiry_errors() -> None:
    with pytest.raises(PkiError, match="cannot parse|empty"):
        load_certificate_chain(b"")
    with pytest.raises(PkiError):
        certificate_expiry(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


# --- issuing -------------------------------------------------------------------------


def test_issued_certificate_profile(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    leaf, intermediate = _issue(ca, WEB, ttl=timedelta(hours=2), now=now)

    assert intermediate == ca.intermediate_certificate
    assert spiffe_id_from_certificate(leaf) == WEB
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert leaf.issuer == intermediate.subject
    assert leaf.not_valid_before_utc == now - timedelta(minutes=1)
    assert leaf.not_valid_after_utc == now + timedelta(hours=2)

    constraints = _ext(leaf, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = _ext(leaf, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert certificate_expiry(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, intermediate))
    ) == now + timedelta(hours=2)


def test_issued_chain_verifies_to_the_root(ca: CertificateAuthority) -> None:
    leaf, intermediate = _issue(ca, WEB)
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(ca.root_certificate)
    # cryptography's RFC 5280 path builder, with the client-auth policy.
    roots = load_certificate_chain(ca.trust_bundle_pem())
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, [intermediate])
    assert verified.chain == [leaf, intermediate, ca.root_certificate]
    assert verified.subjects == [x509.UniformResourceIdentifier(WEB.uri)]


def test_issued_certificate_ignores_sans_the_csr_asked_for(ca: CertificateAuthority) -> None:
    key = generate_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(
                        "spiffe://cluster.local/ns/kube-system/sa/admin"
                    ),
                    x509.UniformResourceIdentifier("spiffe://evil.org/ns/a/sa/b"),
                    x509.DNSName("kubernetes.default"),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    leaf = load_certificate_chain(ca.issue_workload_certificate(csr, WEB))[0]
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB.uri)]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


def test_ttl_is_capped_at_the_intermediate_expiry() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    ca = CertificateAuthority.create(TD, intermediate_ttl=timedelta(hours=1), now=now)
    leaf, _ = _issue(ca, WEB, ttl=timedelta(hours=24), now=now)
    assert leaf.not_valid_after_utc == now + timedelta(hours=1)
    with pytest.raises(CAError, match="intermediate CA certificate expired"):
        _issue(ca, WEB, now=now + timedelta(hours=2))


def test_refuses_non_positive_ttl_and_naive_time(ca: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="TTL must be positive"):
        _issue(ca, WEB, ttl=timedelta(0))
    with pytest.raises(CAError, match="timezone-aware"):
        _issue(ca, WEB, now=datetime(2030, 1, 1))


def test_refuses_another_trust_domain(ca: CertificateAuthority) -> None:
    other = SpiffeId("example.org", "default", "web")
    with pytest.raises(CAError, match="trust domain 'cluster.local', not 'example.org'"):
        ca.issue_workload_certificate(make_csr(generate_private_key(), other), other)


def test_refuses_tampered_csr(ca: CertificateAuthority) -> None:
    key = generate_private_key()
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aaaaaaaa")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert der.count(b"aaaaaaaa") == 1
    tampered = x509.load_der_x509_csr(der.replace(b"aaaaaaaa", b"bbbbbbbb"))
    pem = tampered.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="CSR signature does not verify"):
        ca.issue_workload_certificate(pem, WEB)


def _csr_with(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "must be ECDSA P-256"),
        (ec.generate_private_key(ec.SECP384R1()), "curve P-256.*secp384r1"),
    ],
)
def test_refuses_wrong_key_types(
    ca: CertificateAuthority, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, message: str
) -> None:
    with pytest.raises(CAError, match=message):
        ca.issue_workload_certificate(_csr_with(key), WEB)


@pytest.mark.parametrize("garbage", [b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\n"])
def test_refuses_unparseable_csr(ca: CertificateAuthority, garbage: bytes) -> None:
    with pytest.raises(CAError, match="cannot parse PEM certificate signing request"):
        ca.issue_workload_certificate(garbage, WEB)


# --- a real TLS 1.3 handshake on loopback ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    chain: Path  # leaf + intermediate, what the endpoint presents
    key: Path


def _credentials(ca: CertificateAuthority, identity: SpiffeId, directory: Path) -> Credentials:
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    chain_pem = ca.issue_workload_certificate(make_csr(key, identity), identity)
    creds = Credentials(directory / "chain.pem", directory / "key.pem")
    write_file_atomic(creds.chain, chain_pem, 0o644)
    write_private_key(creds.key, key)
    return creds


def _context(
    side: int, bundle: Path, creds: Credentials | None, *, strict: bool = True
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are identified by URI SAN, not by hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if strict:  # the default from Python 3.13 on; prove our certs already pass it
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(bundle))
    if creds is not None:
        ctx.load_cert_chain(str(creds.chain), str(creds.key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class Outcome:
    server_peer: SpiffeId | None = None
    server_error: ssl.SSLError | None = None
    client_peer: SpiffeId | None = None
    client_alpn: str | None = None
    client_handshake_error: ssl.SSLError | None = None
    client_read_error: ssl.SSLError | None = None
    client_read: bytes | None = None


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str) -> Outcome:
    outcome = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                assert peer is not None
                outcome.server_peer = spiffe_id_from_certificate(peer)
                tls.sendall(b"ok")
        except ssl.SSLError as exc:
            outcome.server_error = exc
        finally:
            conn.close()

    server = threading.Thread(target=serve)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                tls = client_ctx.wrap_socket(raw, server_hostname=sni)
            except ssl.SSLError as exc:
                outcome.client_handshake_error = exc
            else:
                with tls:
                    outcome.client_alpn = tls.selected_alpn_protocol()
                    peer = tls.getpeercert(binary_form=True)
                    assert peer is not None
                    outcome.client_peer = spiffe_id_from_certificate(peer)
                    try:
                        outcome.client_read = tls.recv(2)
                    except ssl.SSLError as exc:
                        outcome.client_read_error = exc
    finally:
        server.join(10)
        listener.close()
    return outcome


@pytest.fixture()
def mesh(ca: CertificateAuthority, tmp_path: Path) -> dict[str, Path | Credentials]:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.trust_bundle_pem())
    other_ca = CertificateAuthority.create(TD)  # same trust domain name, different keys
    return {
        "bundle": bundle,
        "server": _credentials(ca, DB, tmp_path / "server"),
        "client": _credentials(ca, WEB, tmp_path / "client"),
        "stranger": _credentials(other_ca, WEB, tmp_path / "stranger"),
    }


def _pick(mesh: dict[str, Path | Credentials], name: str) -> Credentials:
    creds = mesh[name]
    assert isinstance(creds, Credentials)
    return creds


def _bundle(mesh: dict[str, Path | Credentials]) -> Path:
    bundle = mesh["bundle"]
    assert isinstance(bundle, Path)
    return bundle


def test_tls_mutual_handshake_succeeds(mesh: dict[str, Path | Credentials]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, _bundle(mesh), _pick(mesh, "server"))
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, _bundle(mesh), _pick(mesh, "client"))
    outcome = _handshake(server_ctx, client_ctx, DB.sni)
    assert outcome.server_error is None
    assert outcome.client_handshake_error is None
    assert outcome.client_read == b"ok"
    assert outcome.client_alpn == "h2"
    assert outcome.server_peer == WEB
    assert outcome.client_peer == DB


def test_tls_rejects_client_with_cert_from_another_ca(mesh: dict[str, Path | Credentials]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, _bundle(mesh), _pick(mesh, "server"))
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, _bundle(mesh), _pick(mesh, "stranger"))
    outcome = _handshake(server_ctx, client_ctx, DB.sni)
    assert outcome.server_error is not None
    assert outcome.server_error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert outcome.server_peer is None
    # TLS 1.3: the client's handshake completes before the server has checked the
    # client certificate; the server's alert only surfaces on the client's first read.
    assert outcome.client_handshake_error is None
    assert outcome.client_read_error is not None
    assert outcome.client_read_error.reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_tls_rejects_client_without_cert(mesh: dict[str, Path | Credentials]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, _bundle(mesh), _pick(mesh, "server"))
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, _bundle(mesh), None)
    outcome = _handshake(server_ctx, client_ctx, DB.sni)
    assert outcome.server_error is not None
    assert outcome.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert outcome.client_handshake_error is None
    assert outcome.client_read_error is not None
    assert outcome.client_read_error.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def test_tls_client_rejects_server_from_another_ca(mesh: dict[str, Path | Credentials]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, _bundle(mesh), _pick(mesh, "stranger"))
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, _bundle(mesh), _pick(mesh, "client"))
    outcome = _handshake(server_ctx, client_ctx, WEB.sni)
    assert outcome.client_handshake_error is not None
    assert outcome.client_handshake_error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert outcome.server_error is not None
    assert outcome.server_error.reason == "TLSV1_ALERT_UNKNOWN_CA"
