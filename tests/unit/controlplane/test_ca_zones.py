"""Multi-zone trust: zone intermediates issued by the global root, zone CAs that hold
the root certificate but not its key, and zone control plane certificates. The TLS
tests are real TLS 1.3 handshakes through OpenSSL (Python's ssl, in memory)."""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshnode.controlplane.ca import CLOCK_SKEW, CAError, CertificateAuthority, RotatingCA
from meshnode.core.identity import (
    IdentityError,
    SpiffeId,
    node_name_from_certificate,
    single_uri_san,
    spiffe_id_from_certificate,
    zone_of_controlplane_certificate,
)
from meshnode.core.pki import (
    generate_private_key,
    load_certificate_chain,
    make_csr,
    make_node_csr,
    private_key_pem,
    subject_name,
)

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
DB = SpiffeId(TD, "data", "postgres")
URI = x509.UniformResourceIdentifier

ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return cert.extensions.get_extension_for_class(kind)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _plain_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zone")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _greedy_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR asking for everything it should not get: another subject, names in
    this and another trust domain, and CA powers."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil.org"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "meshnode root CA"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    URI(f"spiffe://{TD}/zone/zone-b/controlplane"),
                    URI(f"spiffe://{TD}/controlplane"),
                    URI("spiffe://evil.org/ns/a/sa/b"),
                    x509.DNSName("kubernetes.default"),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _tampered_csr() -> bytes:
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aaaaaaaa")]))
        .sign(generate_private_key(), hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert der.count(b"aaaaaaaa") == 1
    tampered = x509.load_der_x509_csr(der.replace(b"aaaaaaaa", b"bbbbbbbb"))
    return tampered.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Zone:
    ca: CertificateAuthority
    key: ec.EllipticCurvePrivateKey  # the zone intermediate's, for hand-made leaves


def _zone(global_ca: CertificateAuthority, zone: str, now: datetime | None = None) -> Zone:
    """What a zone control plane does: make a key, have the global sign its
    intermediate, and build its CA from the global root's certificate."""
    key = generate_private_key()
    pem = global_ca.issue_zone_intermediate(_plain_csr(key), zone, now=now)
    intermediate = x509.load_pem_x509_certificate(pem)
    return Zone(CertificateAuthority.for_zone(global_ca.root_certificate, intermediate, key), key)


@pytest.fixture(scope="module")
def global_ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture(scope="module")
def zone_a(global_ca: CertificateAuthority) -> Zone:
    return _zone(global_ca, "zone-a")


@pytest.fixture(scope="module")
def zone_b(global_ca: CertificateAuthority) -> Zone:
    return _zone(global_ca, "zone-b")


def _workload(ca: CertificateAuthority, identity: SpiffeId) -> list[x509.Certificate]:
    csr = make_csr(generate_private_key(), identity)
    return load_certificate_chain(ca.issue_workload_certificate(csr, identity))


# --- the zone intermediate -----------------------------------------------------------


def test_zone_intermediate_profile() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    now = t0 + timedelta(days=1)
    global_ca = CertificateAuthority.create(TD, root_ttl=timedelta(days=30), now=t0)
    key = generate_private_key()
    pem = global_ca.issue_zone_intermediate(_plain_csr(key), "zone-a", timedelta(days=7), now=now)

    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 1  # the intermediate only
    inter = x509.load_pem_x509_certificate(pem)
    root = global_ca.root_certificate
    inter.verify_directly_issued_by(root)
    assert inter.issuer == root.subject
    assert inter.subject == subject_name(TD, "meshnode zone zone-a intermediate CA")
    assert inter.public_key() == key.public_key()
    assert inter.not_valid_before_utc == now - CLOCK_SKEW
    assert inter.not_valid_after_utc == now + timedelta(days=7)

    constraints = _ext(inter, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(inter, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert _ext(inter, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    )
    root_ski = _ext(root, x509.SubjectKeyIdentifier).value
    assert _ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski.digest
    names = _ext(inter, x509.NameConstraints)
    assert names.critical
    assert names.value.permitted_subtrees == [URI(TD)]
    assert names.value.excluded_subtrees is None
    assert {type(e.value) for e in inter.extensions} == {
        x509.BasicConstraints,
        x509.KeyUsage,
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
        x509.NameConstraints,
    }


def test_zone_intermediate_stays_within_the_root_validity() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    global_ca = CertificateAuthority.create(TD, root_ttl=timedelta(days=30), now=t0)
    root = global_ca.root_certificate
    # Issued as the root is made: not backdated to before the root existed.
    inter = x509.load_pem_x509_certificate(
        global_ca.issue_zone_intermediate(_plain_csr(generate_private_key()), "a", now=t0)
    )
    assert inter.not_valid_before_utc == root.not_valid_before_utc == t0
    # The default TTL (a year) is capped at the root's expiry.
    assert inter.not_valid_after_utc == root.not_valid_after_utc == t0 + timedelta(days=30)
    with pytest.raises(CAError, match="root CA certificate expired"):
        global_ca.issue_zone_intermediate(
            _plain_csr(generate_private_key()), "a", now=t0 + timedelta(days=31)
        )


@pytest.mark.parametrize("zone", ["", "Zone-A", "zone_a", "a.b", "a/b", "-a", "a" * 64])
def test_zone_names_must_be_dns_labels(global_ca: CertificateAuthority, zone: str) -> None:
    csr = _plain_csr(generate_private_key())
    with pytest.raises(CAError, match=f"cannot issue for zone {zone!r}"):
        global_ca.issue_zone_intermediate(csr, zone)
    with pytest.raises(CAError, match=f"cannot issue for zone {zone!r}"):
        global_ca.issue_zone_controlplane_certificate(csr, zone)


def test_zone_intermediate_refuses_a_non_positive_ttl(global_ca: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="TTL must be positive"):
        global_ca.issue_zone_intermediate(_plain_csr(generate_private_key()), "a", timedelta(0))


def test_new_issuers_use_only_the_csr_key(global_ca: CertificateAuthority, zone_a: Zone) -> None:
    key = generate_private_key()
    inter = x509.load_pem_x509_certificate(
        global_ca.issue_zone_intermediate(_greedy_csr(key), "zone-a")
    )
    assert inter.public_key() == key.public_key()
    assert inter.subject == subject_name(TD, "meshnode zone zone-a intermediate CA")
    assert _ext(inter, x509.BasicConstraints).value.path_length == 0
    with pytest.raises(x509.ExtensionNotFound):
        _ext(inter, x509.SubjectAlternativeName)

    leaf, _ = load_certificate_chain(
        zone_a.ca.issue_zone_controlplane_certificate(_greedy_csr(key), "zone-a")
    )
    assert leaf.public_key() == key.public_key()
    assert leaf.subject == subject_name(TD)
    assert list(_ext(leaf, x509.SubjectAlternativeName).value) == [
        URI(f"spiffe://{TD}/zone/zone-a/controlplane")
    ]
    assert not _ext(leaf, x509.BasicConstraints).value.ca


def test_new_issuers_refuse_a_csr_whose_signature_does_not_verify(
    global_ca: CertificateAuthority, zone_a: Zone
) -> None:
    with pytest.raises(CAError, match="CSR signature does not verify"):
        global_ca.issue_zone_intermediate(_tampered_csr(), "zone-a")
    with pytest.raises(CAError, match="CSR signature does not verify"):
        zone_a.ca.issue_zone_controlplane_certificate(_tampered_csr(), "zone-a")


# --- the zone CA -----------------------------------------------------------------------


def test_zone_ca_issues_leaf_plus_its_intermediate(
    global_ca: CertificateAuthority, zone_a: Zone
) -> None:
    ca = zone_a.ca
    assert global_ca.holds_root_key and not ca.holds_root_key
    assert ca.trust_domain == TD
    assert ca.root_certificate == global_ca.root_certificate
    assert ca.trust_bundle_pem() == global_ca.trust_bundle_pem()
    inter = ca.intermediate_certificate
    assert inter != global_ca.intermediate_certificate
    inter.verify_directly_issued_by(global_ca.root_certificate)

    leaf, chained = _workload(ca, WEB)
    assert chained == inter
    leaf.verify_directly_issued_by(inter)
    assert spiffe_id_from_certificate(leaf) == WEB
    with pytest.raises(ValueError):  # not the global's intermediate's leaf
        leaf.verify_directly_issued_by(global_ca.intermediate_certificate)

    node_leaf, node_inter = load_certificate_chain(
        ca.issue_node_certificate(make_node_csr(generate_private_key(), TD, "n1"), "n1")
    )
    assert node_inter == inter
    node_leaf.verify_directly_issued_by(inter)
    assert node_name_from_certificate(node_leaf, TD) == "n1"


def test_zone_ca_cannot_issue_intermediates_nor_rotate(zone_a: Zone) -> None:
    with pytest.raises(
        CAError,
        match="does not hold the root key; zone intermediates are issued by the global",
    ):
        zone_a.ca.issue_zone_intermediate(_plain_csr(generate_private_key()), "zone-c")
    cas = RotatingCA([(zone_a.ca, None)])
    with pytest.raises(CAError, match="zone control plane: its CA is rotated by the global"):
        cas.rotate(timedelta(days=2))
    assert cas.entries == ((zone_a.ca, None),)


def test_global_ca_still_rotates(global_ca: CertificateAuthority) -> None:
    rotated = RotatingCA([(global_ca, None)]).rotate(timedelta(days=2))
    assert rotated.active.holds_root_key
    assert rotated.active.root_certificate != global_ca.root_certificate


def test_zone_ca_round_trips_through_pem_with_an_empty_root_key(zone_a: Zone) -> None:
    pem = zone_a.ca.to_pem()
    assert pem["root_key"] == b""
    assert pem["root_key"].decode() == ""  # what the store's NOT NULL column keeps
    for root_key in (b"", b"  \n"):
        back = CertificateAuthority.from_pem(
            pem["root_cert"], root_key, pem["intermediate_cert"], pem["intermediate_key"]
        )
        assert not back.holds_root_key
        assert back.root_certificate == zone_a.ca.root_certificate
        assert back.intermediate_certificate == zone_a.ca.intermediate_certificate
        assert back.to_pem() == pem
        leaf, _ = _workload(back, WEB)  # the intermediate key came back with it
        leaf.verify_directly_issued_by(zone_a.ca.intermediate_certificate)


def test_global_ca_round_trips_through_pem_with_its_root_key(
    global_ca: CertificateAuthority,
) -> None:
    back = CertificateAuthority.from_pem(**global_ca.to_pem())
    assert back.holds_root_key
    assert back.to_pem() == global_ca.to_pem()


def test_zone_ca_save_and_load(zone_a: Zone, tmp_path: Path) -> None:
    zone_a.ca.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "intermediate-key.pem",
        "intermediate.pem",
        "root.pem",
    ]
    loaded = CertificateAuthority.load(tmp_path)
    assert not loaded.holds_root_key
    assert loaded.to_pem() == zone_a.ca.to_pem()


def test_zone_ca_load_still_refuses_an_open_intermediate_key(zone_a: Zone, tmp_path: Path) -> None:
    zone_a.ca.save(tmp_path)
    os.chmod(tmp_path / "intermediate-key.pem", 0o640)
    with pytest.raises(CAError, match="accessible by group or others"):
        CertificateAuthority.load(tmp_path)


def _signed_intermediate(
    root: CertificateAuthority, root_key: ec.EllipticCurvePrivateKey, trust_domain: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An intermediate signed by `root`'s key that names `trust_domain` (which the
    CA itself would never do)."""
    key = generate_private_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject_name(trust_domain, "intermediate"))
        .issuer_name(root.root_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return cert, key


def test_zone_ca_refuses_material_that_does_not_belong_together(
    global_ca: CertificateAuthority, zone_a: Zone
) -> None:
    root = global_ca.root_certificate
    # An intermediate of another trust domain's root.
    other_td = CertificateAuthority.create("example.org")
    foreign = _zone(other_td, "zone-a")
    assert foreign.ca.trust_domain == "example.org"  # fine under its own root
    with pytest.raises(CAError, match="not issued by the root"):
        CertificateAuthority.for_zone(root, foreign.ca.intermediate_certificate, foreign.key)
    # An intermediate of another root of the same trust domain name.
    stranger = _zone(CertificateAuthority.create(TD), "zone-a")
    with pytest.raises(CAError, match="not issued by the root"):
        CertificateAuthority.for_zone(root, stranger.ca.intermediate_certificate, stranger.key)
    # Signed by this root, but naming another trust domain.
    root_key = serialization.load_pem_private_key(global_ca.to_pem()["root_key"], None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    cert, key = _signed_intermediate(global_ca, root_key, "example.org")
    with pytest.raises(CAError, match="different trust domains"):
        CertificateAuthority.for_zone(root, cert, key)
    # The zone's intermediate with another key.
    with pytest.raises(CAError, match="intermediate private key does not match"):
        CertificateAuthority.for_zone(
            root, zone_a.ca.intermediate_certificate, generate_private_key()
        )
    # Something that is not a root as the root.
    with pytest.raises(CAError, match="not a self-signed CA certificate"):
        CertificateAuthority.for_zone(
            global_ca.intermediate_certificate, zone_a.ca.intermediate_certificate, zone_a.key
        )


def test_verify_leaf_accepts_only_this_zones_leaves(
    global_ca: CertificateAuthority, zone_a: Zone, zone_b: Zone
) -> None:
    cas = RotatingCA([(zone_a.ca, None)])
    assert cas.verify_leaf(_workload(zone_a.ca, WEB)[0])
    # Same root, other issuer: a zone control plane accepts only its own nodes.
    assert not cas.verify_leaf(_workload(zone_b.ca, WEB)[0])
    assert not cas.verify_leaf(_workload(global_ca, WEB)[0])


# --- the zone control plane's certificate --------------------------------------------


def test_zone_controlplane_certificate(zone_a: Zone) -> None:
    key = generate_private_key()
    now = datetime.now(UTC).replace(microsecond=0)
    leaf, inter = load_certificate_chain(
        zone_a.ca.issue_zone_controlplane_certificate(
            _plain_csr(key), "zone-a", timedelta(hours=2), now=now
        )
    )
    assert inter == zone_a.ca.intermediate_certificate
    leaf.verify_directly_issued_by(inter)
    assert leaf.public_key() == key.public_key()
    assert list(_ext(leaf, x509.SubjectAlternativeName).value) == [
        URI("spiffe://cluster.local/zone/zone-a/controlplane")
    ]
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert leaf.not_valid_after_utc == now + timedelta(hours=2)
    assert zone_of_controlplane_certificate(leaf, TD) == "zone-a"
    assert zone_of_controlplane_certificate(leaf, "example.org") is None
    # Neither a node nor a workload.
    assert node_name_from_certificate(leaf, TD) is None
    with pytest.raises(IdentityError):
        spiffe_id_from_certificate(leaf)


def test_zone_of_controlplane_certificate_is_none_for_issued_certificates_of_other_kinds(
    global_ca: CertificateAuthority, zone_a: Zone
) -> None:
    node = load_certificate_chain(
        zone_a.ca.issue_node_certificate(make_node_csr(generate_private_key(), TD, "n1"), "n1")
    )[0]
    workload = _workload(zone_a.ca, WEB)[0]
    controlplane = load_certificate_chain(
        global_ca.issue_controlplane_certificate(generate_private_key(), ["localhost"])
    )[0]
    other_td = CertificateAuthority.create("example.org")
    foreign = load_certificate_chain(
        other_td.issue_zone_controlplane_certificate(_plain_csr(generate_private_key()), "zone-a")
    )[0]
    assert zone_of_controlplane_certificate(foreign, "example.org") == "zone-a"
    for cert in (node, workload, controlplane, foreign):
        assert zone_of_controlplane_certificate(cert, TD) is None


def _self_signed(san: list[x509.GeneralName] | None) -> x509.Certificate:
    key = generate_private_key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name(TD))
        .issuer_name(subject_name(TD))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_zone_of_controlplane_certificate_reads_a_well_formed_uri() -> None:
    # The hand-made certificates of the refusals below are read when well-formed.
    cert = _self_signed([URI(f"spiffe://{TD}/zone/zone-a/controlplane"), x509.DNSName("x")])
    assert zone_of_controlplane_certificate(cert, TD) == "zone-a"
    cert = _self_signed([URI(f"spiffe://{TD}/zone/{'a' * 63}/controlplane")])
    assert zone_of_controlplane_certificate(cert, TD) == "a" * 63


@pytest.mark.parametrize(
    "san",
    [
        None,
        [],
        [x509.DNSName("zone-a.cluster.local")],
        [
            URI(f"spiffe://{TD}/zone/zone-a/controlplane"),
            URI(f"spiffe://{TD}/zone/zone-b/controlplane"),
        ],
        [URI(f"spiffe://{TD}/zone/zone-a/controlplane"), URI(f"spiffe://{TD}/node/n1")],
        [URI(f"spiffe://{TD}/zone/a/b/controlplane")],
        [URI(f"spiffe://{TD}/zone//controlplane")],
        [URI(f"spiffe://{TD}/zone/controlplane")],
        [URI(f"spiffe://{TD}/zone/Zone-A/controlplane")],
        [URI(f"spiffe://{TD}/zone/zone_a/controlplane")],
        [URI(f"spiffe://{TD}/zone/-a/controlplane")],
        [URI(f"spiffe://{TD}/zone/{'a' * 64}/controlplane")],
        [URI(f"spiffe://{TD}/zone/zone-a/controlplane/")],
        [URI(f"spiffe://{TD}/zone/zone-a/controlplanes")],
        [URI(f"spiffe://{TD}/zone/zone-a")],
        [URI(f"spiffe://{TD}/zones/zone-a/controlplane")],
        [URI(f"spiffe://{TD}.evil/zone/zone-a/controlplane")],
        [URI(f"spiffe://sub.{TD}/zone/zone-a/controlplane")],
        [URI(f"spiffe://{TD.upper()}/zone/zone-a/controlplane")],
        [URI(f"https://{TD}/zone/zone-a/controlplane")],
        [URI(f"spiffe://{TD}/controlplane")],
        [URI(f"spiffe://{TD}/node/zone-a")],
        [URI(f"spiffe://{TD}/ns/zone/sa/controlplane")],
    ],
)
def test_zone_of_controlplane_certificate_refuses(san: list[x509.GeneralName] | None) -> None:
    assert zone_of_controlplane_certificate(_self_signed(san), TD) is None


# --- real TLS 1.3 through OpenSSL --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    chain: Path  # leaf + intermediate, what the endpoint presents
    key: Path


def _credentials(directory: Path, chain_pem: bytes, key: ec.EllipticCurvePrivateKey) -> Credentials:
    directory.mkdir(parents=True, exist_ok=True)
    creds = Credentials(directory / "chain.pem", directory / "key.pem")
    creds.chain.write_bytes(chain_pem)
    creds.key.write_bytes(private_key_pem(key))
    creds.key.chmod(0o600)
    return creds


def _workload_credentials(
    ca: CertificateAuthority, identity: SpiffeId, directory: Path
) -> Credentials:
    key = generate_private_key()
    chain_pem = ca.issue_workload_certificate(make_csr(key, identity), identity)
    return _credentials(directory, chain_pem, key)


def _context(
    side: int, bundle_pem: bytes, creds: Credentials, *, check_hostname: bool = False
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = check_hostname  # mesh peers are identified by URI SAN
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.load_cert_chain(str(creds.chain), str(creds.key))
    return ctx


@dataclass
class Outcome:
    server_peer: str | None = None  # the URI SAN each side verified
    client_peer: str | None = None
    server_error: str | None = None  # OpenSSL's verify message, or the alert received
    client_error: str | None = None
    received: bytes = b""


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message)
    return str(exc.reason)


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "peer"
) -> Outcome:
    """A TLS handshake between two in-memory OpenSSL endpoints, then the server sends
    b"ok". In TLS 1.3 the client finishes before the server has checked the client
    certificate; the server's refusal reaches the client on its first read."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    outcome = Outcome()
    pending = {"client": client, "server": server}
    for _ in range(10):
        for side, end in list(pending.items()):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError as exc:
                setattr(outcome, f"{side}_error", _reason(exc))
            del pending[side]
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            break
    else:
        raise AssertionError(f"handshake stuck: {sorted(pending)} never finished")
    if outcome.server_error is None:
        outcome.server_peer = single_uri_san(server.getpeercert(binary_form=True))
        server.write(b"ok")
        c_in.write(s_out.read())
    if outcome.client_error is None:
        outcome.client_peer = single_uri_san(client.getpeercert(binary_form=True))
        try:
            outcome.received = client.read(2)
        except ssl.SSLError as exc:
            outcome.client_error = _reason(exc)
    return outcome


@pytest.fixture(scope="module")
def cas(
    global_ca: CertificateAuthority, zone_a: Zone, zone_b: Zone
) -> dict[str, CertificateAuthority]:
    return {"global": global_ca, "zone-a": zone_a.ca, "zone-b": zone_b.ca}


@pytest.mark.parametrize(
    ("client_ca", "server_ca"),
    [("zone-a", "zone-b"), ("zone-b", "zone-a"), ("global", "zone-a"), ("zone-b", "global")],
)
def test_cross_zone_mutual_tls(
    cas: dict[str, CertificateAuthority], client_ca: str, server_ca: str, tmp_path: Path
) -> None:
    client, server = cas[client_ca], cas[server_ca]
    # Every zone hands its nodes the same bundle: the global root, and only it.
    assert (
        client.trust_bundle_pem() == server.trust_bundle_pem() == cas["global"].trust_bundle_pem()
    )
    assert load_certificate_chain(client.trust_bundle_pem()) == [cas["global"].root_certificate]
    server_ctx = _context(
        ssl.PROTOCOL_TLS_SERVER,
        server.trust_bundle_pem(),
        _workload_credentials(server, DB, tmp_path / "server"),
    )
    client_ctx = _context(
        ssl.PROTOCOL_TLS_CLIENT,
        client.trust_bundle_pem(),
        _workload_credentials(client, WEB, tmp_path / "client"),
    )
    outcome = _handshake(server_ctx, client_ctx, DB.sni)
    assert outcome == Outcome(server_peer=WEB.uri, client_peer=DB.uri, received=b"ok")


def test_cross_zone_tls_refuses_a_zone_of_another_root(
    global_ca: CertificateAuthority, zone_a: Zone, tmp_path: Path
) -> None:
    # Same trust domain name, another global: its zones are strangers.
    stranger = _zone(CertificateAuthority.create(TD), "zone-b").ca
    bundle = global_ca.trust_bundle_pem()
    server_ctx = _context(
        ssl.PROTOCOL_TLS_SERVER, bundle, _workload_credentials(zone_a.ca, DB, tmp_path / "s")
    )
    client_ctx = _context(
        ssl.PROTOCOL_TLS_CLIENT, bundle, _workload_credentials(stranger, WEB, tmp_path / "c")
    )
    outcome = _handshake(server_ctx, client_ctx, DB.sni)
    assert outcome.server_error == "unable to get local issuer certificate"
    assert outcome.server_peer is None
    assert outcome.client_error == "TLSV1_ALERT_UNKNOWN_CA"


def _hand_made_leaf(
    inter: x509.Certificate, inter_key: ec.EllipticCurvePrivateKey, uri: str, directory: Path
) -> Credentials:
    """A leaf with the profile the CA issues, but for any URI: what a zone whose
    intermediate key leaked could make."""
    key = generate_private_key()
    now = datetime.now(UTC)
    usage = x509.KeyUsage(
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
    inter_ski = _ext(inter, x509.SubjectKeyIdentifier).value
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject_name(TD))
        .issuer_name(inter.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([URI(uri)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(inter_ski),
            critical=False,
        )
        .sign(inter_key, hashes.SHA256())
    )
    return _credentials(directory, _pem(leaf) + _pem(inter), key)


FOREIGN = "spiffe://example.org/ns/default/sa/web"


@pytest.mark.parametrize(
    ("issuer", "uri", "refused"),
    [
        ("zone-a", WEB.uri, False),  # the hand-made profile itself verifies
        ("zone-a", FOREIGN, True),  # the name constraint
        ("zone-a", f"spiffe://sub.{TD}/ns/default/sa/web", True),  # exact host, not suffix
        ("global", FOREIGN, False),  # the global's intermediate is not constrained
    ],
)
@pytest.mark.parametrize("side", ["client", "server"])
def test_zone_intermediate_cannot_certify_another_trust_domain(
    global_ca: CertificateAuthority,
    zone_a: Zone,
    issuer: str,
    uri: str,
    refused: bool,
    side: str,
    tmp_path: Path,
) -> None:
    if issuer == "zone-a":
        inter, inter_key = zone_a.ca.intermediate_certificate, zone_a.key
    else:
        inter = global_ca.intermediate_certificate
        loaded = serialization.load_pem_private_key(global_ca.to_pem()["intermediate_key"], None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        inter_key = loaded
    forged = _hand_made_leaf(inter, inter_key, uri, tmp_path / "forged")
    honest = _workload_credentials(zone_a.ca, DB, tmp_path / "honest")
    bundle = global_ca.trust_bundle_pem()
    server_creds, client_creds = (honest, forged) if side == "client" else (forged, honest)
    outcome = _handshake(
        _context(ssl.PROTOCOL_TLS_SERVER, bundle, server_creds),
        _context(ssl.PROTOCOL_TLS_CLIENT, bundle, client_creds),
    )
    verifier = "server" if side == "client" else "client"
    if refused:
        assert getattr(outcome, f"{verifier}_error") == "permitted subtree violation"
        assert getattr(outcome, f"{verifier}_peer") is None
        assert outcome.received == b""
    else:
        assert getattr(outcome, f"{verifier}_error") is None
        assert getattr(outcome, f"{verifier}_peer") == uri
        assert outcome.received == b"ok"


def test_zone_controlplane_meets_the_global_over_mutual_tls(
    global_ca: CertificateAuthority, zone_a: Zone, tmp_path: Path
) -> None:
    # The global serves with DNS and IP SANs; the zone control plane presents its
    # zone certificate, issued under its own (name-constrained) intermediate.
    server_key = generate_private_key()
    server = _credentials(
        tmp_path / "global",
        global_ca.issue_controlplane_certificate(server_key, ["global.example"], ["127.0.0.1"]),
        server_key,
    )
    client_key = generate_private_key()
    client = _credentials(
        tmp_path / "zone",
        zone_a.ca.issue_zone_controlplane_certificate(_plain_csr(client_key), "zone-a"),
        client_key,
    )
    outcome = _handshake(
        _context(ssl.PROTOCOL_TLS_SERVER, global_ca.trust_bundle_pem(), server),
        _context(
            ssl.PROTOCOL_TLS_CLIENT, zone_a.ca.trust_bundle_pem(), client, check_hostname=True
        ),
        "global.example",
    )
    assert outcome == Outcome(
        server_peer=f"spiffe://{TD}/zone/zone-a/controlplane",
        client_peer=f"spiffe://{TD}/controlplane",
        received=b"ok",
    )


def test_zone_serving_certificate_keeps_its_dns_and_ip_names(zone_a: Zone, tmp_path: Path) -> None:
    # The name constraint is on URIs only: a zone control plane's serving
    # certificate (DNS and IP SANs) still verifies, hostname checked.
    key = generate_private_key()
    server = _credentials(
        tmp_path / "cp",
        zone_a.ca.issue_controlplane_certificate(key, ["cp.zone-a.example"], ["127.0.0.1"]),
        key,
    )
    node = _workload_credentials(zone_a.ca, WEB, tmp_path / "node")
    bundle = zone_a.ca.trust_bundle_pem()
    for name in ("cp.zone-a.example", "127.0.0.1"):
        outcome = _handshake(
            _context(ssl.PROTOCOL_TLS_SERVER, bundle, server),
            _context(ssl.PROTOCOL_TLS_CLIENT, bundle, node, check_hostname=True),
            name,
        )
        assert outcome == Outcome(
            server_peer=WEB.uri, client_peer=f"spiffe://{TD}/controlplane", received=b"ok"
        )
    outcome = _handshake(
        _context(ssl.PROTOCOL_TLS_SERVER, bundle, server),
        _context(ssl.PROTOCOL_TLS_CLIENT, bundle, node, check_hostname=True),
        "other.example",
    )
    assert outcome.client_error is not None and "mismatch" in outcome.client_error
