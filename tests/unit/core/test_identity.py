from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshnode.core.identity import (
    IdentityError,
    SpiffeId,
    controlplane_uri,
    node_name_from_certificate,
    node_uri,
    spiffe_id_from_certificate,
    validate_trust_domain,
    zone_controlplane_uri,
    zone_of_controlplane_certificate,
)

LABEL_63 = "a" * 63


@pytest.mark.parametrize(
    ("uri", "trust_domain", "namespace", "service_account"),
    [
        ("spiffe://cluster.local/ns/default/sa/web", "cluster.local", "default", "web"),
        ("spiffe://example.org/ns/kube-system/sa/coredns", "example.org", "kube-system", "coredns"),
        ("spiffe://td/ns/a/sa/b", "td", "a", "b"),
        ("spiffe://mesh-1.example.com/ns/0ns/sa/sa-9", "mesh-1.example.com", "0ns", "sa-9"),
        (f"spiffe://td/ns/{LABEL_63}/sa/{LABEL_63}", "td", LABEL_63, LABEL_63),
    ],
)
def test_parse_and_format_round_trip(
    uri: str, trust_domain: str, namespace: str, service_account: str
) -> None:
    spiffe_id = SpiffeId.parse(uri)
    assert spiffe_id == SpiffeId(trust_domain, namespace, service_account)
    assert spiffe_id.uri == uri
    assert str(spiffe_id) == uri
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "does not start with"),
        ("cluster.local/ns/default/sa/web", "does not start with"),
        ("https://cluster.local/ns/default/sa/web", "does not start with"),
        ("SPIFFE://cluster.local/ns/default/sa/web", "does not start with"),
        ("spiffe:/cluster.local/ns/default/sa/web", "does not start with"),
        ("spiffe://", "path /ns/"),
        ("spiffe://cluster.local", "path /ns/"),
        ("spiffe://cluster.local/", "path /ns/"),
        ("spiffe://cluster.local/ns/default", "path /ns/"),
        ("spiffe://cluster.local/ns/default/sa", "path /ns/"),
        ("spiffe://cluster.local/ns/default/sa/web/extra", "path /ns/"),
        ("spiffe://cluster.local/ns/default/sa/web/", "path /ns/"),
        ("spiffe://cluster.local//ns/default/sa/web", "path /ns/"),
        ("spiffe://cluster.local/sa/web/ns/default", "path /ns/"),
        ("spiffe://cluster.local/node/worker-1", "path /ns/"),
        ("spiffe://cluster.local/ns/default/sa/web?x=1", "query"),
        ("spiffe://cluster.local/ns/default/sa/web#frag", "fragment"),
        ("spiffe://cluster.local/ns/de%66ault/sa/web", "percent-encoding"),
        ("spiffe://user@cluster.local/ns/default/sa/web", "user info or a port"),
        ("spiffe://cluster.local:443/ns/default/sa/web", "user info or a port"),
        ("spiffe:///ns/default/sa/web", "trust domain is empty"),
        ("spiffe://Cluster.Local/ns/default/sa/web", "not a lowercase DNS name"),
        ("spiffe://cluster..local/ns/default/sa/web", "not a lowercase DNS name"),
        ("spiffe://cluster.local./ns/default/sa/web", "not a lowercase DNS name"),
        ("spiffe://-cluster.local/ns/default/sa/web", "not a lowercase DNS name"),
        ("spiffe://clu_ster.local/ns/default/sa/web", "not a lowercase DNS name"),
        ("spiffe://cluster.local/ns/Default/sa/web", "namespace 'Default'"),
        ("spiffe://cluster.local/ns/default/sa/Web", "service account 'Web'"),
        ("spiffe://cluster.local/ns/de.fault/sa/web", "no dots"),
        ("spiffe://cluster.local/ns/default/sa/w.eb", "no dots"),
        ("spiffe://cluster.local/ns//sa/web", "namespace is empty"),
        ("spiffe://cluster.local/ns/default/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/-default/sa/web", "not a DNS label"),
        ("spiffe://cluster.local/ns/default-/sa/web", "not a DNS label"),
        ("spiffe://cluster.local/ns/de_fault/sa/web", "not a DNS label"),
        ("spiffe://cluster.local/ns/dé/sa/web", "not a DNS label"),
        ("spiffe://cluster.local/ns/default/sa/web app", "not a DNS label"),
        (f"spiffe://cluster.local/ns/{'a' * 64}/sa/web", "longer than 63"),
        (f"spiffe://cluster.local/ns/default/sa/{'a' * 64}", "longer than 63"),
        (f"spiffe://{'a' * 64}.local/ns/default/sa/web", "not a lowercase DNS name"),
        (f"spiffe://{'.'.join(['a' * 63] * 4)}/ns/default/sa/web", "longer than 253"),
    ],
)
def test_parse_rejects(uri: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        SpiffeId.parse(uri)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(IdentityError, match="must be a string"):
        not_a_string: Any = b"spiffe://td/ns/a/sa/b"
        SpiffeId.parse(not_a_string)


def test_identity_error_is_a_value_error() -> None:
    assert issubclass(IdentityError, ValueError)


def test_constructor_validates() -> None:
    with pytest.raises(IdentityError, match="namespace"):
        SpiffeId("cluster.local", "a.b", "web")
    with pytest.raises(IdentityError, match="trust domain"):
        SpiffeId("Cluster.local", "default", "web")


def test_is_frozen_hashable_and_slotted() -> None:
    spiffe_id = SpiffeId("cluster.local", "default", "web")
    field = "namespace"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spiffe_id, field, "other")
    assert not hasattr(spiffe_id, "__dict__")
    assert {spiffe_id: 1}[SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")] == 1


@pytest.mark.parametrize("trust_domain", ["cluster.local", "td", "a-b.c-d.e", "1.2.3"])
def test_validate_trust_domain_accepts(trust_domain: str) -> None:
    validate_trust_domain(trust_domain)


# --- SNI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spiffe_id", "sni"),
    [
        (SpiffeId("cluster.local", "default", "web"), "web.default.cluster.local"),
        (SpiffeId("td", "kube-system", "coredns"), "coredns.kube-system.td"),
        (SpiffeId("a.b.c", LABEL_63, "x"), f"x.{LABEL_63}.a.b.c"),
    ],
)
def test_sni_round_trip(spiffe_id: SpiffeId, sni: str) -> None:
    assert spiffe_id.sni == sni
    assert SpiffeId.from_sni(sni, spiffe_id.trust_domain) == spiffe_id


def test_from_sni_is_case_insensitive() -> None:
    assert SpiffeId.from_sni("Web.Default.Cluster.Local", "cluster.local") == SpiffeId(
        "cluster.local", "default", "web"
    )


@pytest.mark.parametrize(
    ("name", "trust_domain", "message"),
    [
        ("web.default.example.org", "cluster.local", "not in trust domain"),
        ("web.default.xcluster.local", "cluster.local", "not in trust domain"),
        ("cluster.local", "cluster.local", "not in trust domain"),
        ("default.cluster.local", "cluster.local", "found 1 label"),
        ("a.web.default.cluster.local", "cluster.local", "found 3 label"),
        (".default.cluster.local", "cluster.local", "service account is empty"),
        ("web..cluster.local", "cluster.local", "namespace is empty"),
        ("we_b.default.cluster.local", "cluster.local", "not a DNS label"),
        ("web.default.cluster.local", "Cluster.Local", "not a lowercase DNS name"),
        ("", "cluster.local", "not in trust domain"),
    ],
)
def test_from_sni_rejects(name: str, trust_domain: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        SpiffeId.from_sni(name, trust_domain)


# --- certificates --------------------------------------------------------------------


def _certificate(san: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


URI = x509.UniformResourceIdentifier


def test_spiffe_id_from_certificate_object_and_der() -> None:
    cert = _certificate([URI("spiffe://cluster.local/ns/default/sa/web"), x509.DNSName("web")])
    expected = SpiffeId("cluster.local", "default", "web")
    assert spiffe_id_from_certificate(cert) == expected
    assert spiffe_id_from_certificate(cert.public_bytes(serialization.Encoding.DER)) == expected


@pytest.mark.parametrize(
    ("san", "message"),
    [
        (None, "no subjectAltName"),
        ([x509.DNSName("web.default.cluster.local")], "exactly one URI SAN, found 0"),
        (
            [URI("spiffe://cluster.local/ns/a/sa/b"), URI("spiffe://cluster.local/ns/c/sa/d")],
            "exactly one URI SAN, found 2",
        ),
        ([URI("https://cluster.local/ns/a/sa/b")], "does not start with"),
        ([URI("spiffe://cluster.local/node/worker-1")], "path /ns/"),
    ],
)
def test_spiffe_id_from_certificate_rejects(
    san: list[x509.GeneralName] | None, message: str
) -> None:
    with pytest.raises(IdentityError, match=message):
        spiffe_id_from_certificate(_certificate(san))


def test_spiffe_id_from_certificate_rejects_garbage_der() -> None:
    with pytest.raises(IdentityError, match="not a DER-encoded X.509 certificate"):
        spiffe_id_from_certificate(b"\x30\x03\x02\x01\x00")


# --- the zone SNI -------------------------------------------------------------------


def test_zone_sni_round_trip_and_shape() -> None:
    from meshnode.core.identity import ZoneSni

    z = ZoneSni("api", "default", 8080, "zone-b", "cluster.local")
    assert z.name == "api.default.8080.zone-b.mz.cluster.local"
    assert z.authority == "api.default.8080.zone-b.mz.cluster.local:8080"
    assert ZoneSni.parse(z.name.upper(), "cluster.local") == z
    assert ZoneSni.shaped(z.name)
    # Never a workload SNI, and a workload SNI is never a zone SNI.
    with pytest.raises(IdentityError):
        SpiffeId.from_sni(z.name, "cluster.local")
    assert not ZoneSni.shaped(SpiffeId("cluster.local", "default", "api").sni)


@pytest.mark.parametrize(
    "name",
    [
        "api.default.08080.zone-b.mz.cluster.local",  # leading zero
        "api.default.0.zone-b.mz.cluster.local",  # port 0
        "api.default.65536.zone-b.mz.cluster.local",
        "api.default.http.zone-b.mz.cluster.local",
        "default.8080.zone-b.mz.cluster.local",  # a label short
        "x.api.default.8080.zone-b.mz.cluster.local",  # a label too many
        "api.default.8080.zone-b.mz.other.local",  # another trust domain
        "api.default.8080.zone_b.mz.cluster.local",
        "api..8080.zone-b.mz.cluster.local",
        "a" * 64 + ".default.8080.zone-b.mz.cluster.local",
    ],
)
def test_zone_sni_refuses_what_is_not_one(name: str) -> None:
    from meshnode.core.identity import ZoneSni

    with pytest.raises(IdentityError):
        ZoneSni.parse(name, "cluster.local")


def test_zone_sni_must_stay_a_dns_name() -> None:
    from meshnode.core.identity import ZoneSni

    long_label = "z" * 63
    with pytest.raises(IdentityError, match="longer than 253"):
        ZoneSni(long_label, long_label, 80, long_label, long_label + ".example.org")


# --- zone control planes ------------------------------------------------------------


def test_zone_controlplane_uri() -> None:
    assert zone_controlplane_uri("cluster.local", "zone-a") == (
        "spiffe://cluster.local/zone/zone-a/controlplane"
    )
    assert zone_controlplane_uri("td", LABEL_63) == f"spiffe://td/zone/{LABEL_63}/controlplane"


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        ("", "zone is empty"),
        ("Zone-A", "not a DNS label"),
        ("zone_a", "not a DNS label"),
        ("a.b", "not a DNS label"),
        ("a/b", "not a DNS label"),
        ("-a", "not a DNS label"),
        ("a" * 64, "longer than 63"),
        (None, "must be a string"),
    ],
)
def test_zone_controlplane_uri_rejects(zone: Any, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        zone_controlplane_uri("cluster.local", zone)


def test_zone_controlplane_certificate_is_read_back() -> None:
    uri = zone_controlplane_uri("cluster.local", "zone-a")
    cert = _certificate([URI(uri), x509.DNSName("cp.zone-a.example")])
    assert zone_of_controlplane_certificate(cert, "cluster.local") == "zone-a"
    assert zone_of_controlplane_certificate(cert, "example.org") is None


def test_zone_controlplane_id_is_neither_a_workload_nor_a_node() -> None:
    td = "cluster.local"
    zone_cp = zone_controlplane_uri(td, "zone-a")
    with pytest.raises(IdentityError, match="path /ns/"):
        SpiffeId.parse(zone_cp)
    with pytest.raises(IdentityError, match="path /ns/"):
        spiffe_id_from_certificate(_certificate([URI(zone_cp)]))
    assert node_name_from_certificate(_certificate([URI(zone_cp)]), td) is None
    # ... and no other identity is a zone control plane's.
    for other in (
        node_uri(td, "zone-a"),
        controlplane_uri(td),
        SpiffeId(td, "zone", "controlplane").uri,
        SpiffeId(td, "zone-a", "controlplane").uri,
    ):
        assert zone_of_controlplane_certificate(_certificate([URI(other)]), td) is None
    assert zone_of_controlplane_certificate(_certificate(None), td) is None
