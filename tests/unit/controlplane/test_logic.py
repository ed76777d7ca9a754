"""Pure control-plane logic: tokens, VIPs, node slices, change log, CA additions."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshnode.controlplane import registry as R
from meshnode.controlplane.ca import CAError, CertificateAuthority, RotatingCA
from meshnode.controlplane.feed import Feed
from meshnode.controlplane.tokens import make_token, verify_token
from meshnode.core.contracts import NodeSlice, SliceDelta
from meshnode.core.identity import (
    IdentityError,
    SpiffeId,
    node_name_from_certificate,
    spiffe_id_from_certificate,
)
from meshnode.core.pki import generate_private_key, make_csr, root_pin
from meshnode.core.token import TokenError, parse_token

PIN = "ab" * 32
NOW = 1_700_000_000.0

# --- tokens --------------------------------------------------------------------------


def _token(node: str = "node1", zone: str = "", ttl: float = 3600) -> tuple[str, object]:
    return make_token(node, zone, ttl, PIN, NOW)


def test_token_format_and_stored_hash() -> None:
    text, rec = _token()
    prefix, tid, secret, pin = text.split(".")
    assert prefix == "mn1" and len(tid) == 8 and len(secret) == 32 and pin == PIN
    assert rec.id == tid  # type: ignore[attr-defined]
    assert secret not in repr(rec)  # only its hash is kept
    assert parse_token(text).secret == secret


def test_token_accepted_once_for_its_node() -> None:
    text, rec = make_token("node1", "zone-a", 3600, PIN, NOW)
    assert verify_token(rec, parse_token(text), "node1", "", NOW + 10) == "zone-a"
    used = rec.consumed(NOW + 10, "node1")
    with pytest.raises(TokenError) as exc:
        verify_token(used, parse_token(text), "node1", "", NOW + 20)
    assert exc.value.status == 401 and "already used" in exc.value.message


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("expired", 401, "expired"),
        ("wrong-node", 403, "is for node"),
        ("wrong-zone", 403, "zone"),
        ("tampered-secret", 401, "unknown token"),
        ("unknown", 401, "unknown token"),
    ],
)
def test_token_refusals(case: str, status: int, words: str) -> None:
    text, rec = make_token("node1", "zone-a", 60, PIN, NOW)
    parsed = parse_token(text)
    name, zone, now, record = "node1", "", NOW + 1, rec
    if case == "expired":
        now = NOW + 61
    elif case == "wrong-node":
        name = "node2"
    elif case == "wrong-zone":
        zone = "zone-b"
    elif case == "tampered-secret":
        flipped = ("0" if parsed.secret[0] != "0" else "1") + parsed.secret[1:]
        parsed = parse_token(f"mn1.{parsed.id}.{flipped}.{parsed.pin}")
    elif case == "unknown":
        record = None
    with pytest.raises(TokenError) as exc:
        verify_token(record, parsed, name, zone, now)
    assert exc.value.status == status
    assert words in exc.value.message


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "mn2.01234567.0123456789abcdef0123456789abcdef." + PIN,
        "mn1.0123456.0123456789abcdef0123456789abcdef." + PIN,  # short id
        "mn1.01234567.0123456789abcdef0123456789abcde." + PIN,  # short secret
        "mn1.01234567.0123456789abcdef0123456789abcdef." + PIN[:-1],  # short pin
        "mn1.01234567.0123456789abcdef0123456789abcdef." + PIN.upper(),  # not lowercase hex
        "mn1.01234567.0123456789abcdef0123456789abcdef." + "g" * 64,
        "mn1.01234567.0123456789abcdef0123456789abcdef",
    ],
)
def test_token_bad_format(bad: str) -> None:
    with pytest.raises(TokenError) as exc:
        parse_token(bad)
    assert exc.value.status == 400


def test_token_ttl_must_be_positive() -> None:
    with pytest.raises(TokenError):
        make_token("node1", "", 0, PIN, NOW)


# --- VIPs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        ([], "240.0.0.1"),
        (["240.0.0.1"], "240.0.0.2"),
        (["240.0.0.1", "240.0.0.3"], "240.0.0.2"),
        (["240.0.0.2"], "240.0.0.1"),
        ([f"240.0.{i // 256}.{i % 256}" for i in range(1, 300)], "240.0.1.44"),
    ],
)
def test_allocate_vip_lowest_free(used: list[str], expected: str) -> None:
    assert R.allocate_vip(used) == expected


def _step(reg: R.Registry, fn: Callable[[R.Registry], object]) -> list[R.Change]:
    """One revision of `fn`'s changes; its change-log entries."""
    return reg.run(reg.revision + 1, fn)[0]


def _reg() -> R.Registry:
    reg = R.Registry()

    def fill(r: R.Registry) -> None:
        r.put_node(R.NodeRecord("node1", "z1", "198.18.0.11"))
        r.put_node(R.NodeRecord("node2", "z2", "198.18.0.12"))
        # Both nodes may host every identity of namespace default (their tokens' grants).
        r.set_token_grant("node1", ["default/*"])
        r.set_token_grant("node2", ["default/*"])

    _step(reg, fill)
    return reg


def _wl(
    node: str, name: str, service: str, port: int = 8080, version: str = ""
) -> R.WorkloadRecord:
    return R.WorkloadRecord(node, name, "default", service, service, port, version)


def test_vip_stable_per_service_and_not_reused_while_it_exists() -> None:
    reg = _reg()
    _step(reg, lambda r: r.put_workload(_wl("node1", "web", "web")))
    _step(reg, lambda r: r.put_workload(_wl("node2", "api", "api")))
    _step(reg, lambda r: r.put_workload(_wl("node2", "api-2", "api", version="v2")))
    vips = {k: s.vip for k, s in reg.services.items()}
    assert vips == {("default", "web"): "240.0.0.1", ("default", "api"): "240.0.0.2"}
    # Removing one of two endpoints keeps the service and its VIP.
    _step(reg, lambda r: r.delete_workload("node2", "api"))
    assert reg.services[("default", "api")].vip == "240.0.0.2"
    _step(reg, lambda r: r.put_workload(_wl("node1", "db", "db")))
    assert reg.services[("default", "db")].vip == "240.0.0.3"
    # The last endpoint gone: the service and its VIP go; the VIP is free again.
    _step(reg, lambda r: r.delete_workload("node1", "web"))
    assert ("default", "web") not in reg.services
    _step(reg, lambda r: r.put_workload(_wl("node1", "cache", "cache")))
    assert reg.services[("default", "cache")].vip == "240.0.0.1"
    # A registry loaded from these rows allocates the same way (the gaps are free).
    loaded = R.Registry.load(
        reg.revision,
        reg.nodes.values(),
        reg.workloads.values(),
        reg.services.values(),
        reg.resources.values(),
        (),
    )
    _step(loaded, lambda r: r.delete_workload("node1", "db"))
    _step(loaded, lambda r: r.put_workload(_wl("node1", "x", "x")))
    _step(loaded, lambda r: r.put_workload(_wl("node1", "y", "y")))
    assert loaded.services[("default", "x")].vip == "240.0.0.3"
    assert loaded.services[("default", "y")].vip == "240.0.0.4"


def test_workload_on_unknown_node_refused_and_nothing_changes() -> None:
    reg = R.Registry()
    with pytest.raises(R.RegistryError) as exc:
        _step(reg, lambda r: r.put_workload(_wl("ghost", "web", "web")))
    assert exc.value.status == 404
    assert not reg.broken and reg.revision == 0
    _step(reg, lambda r: r.put_node(R.NodeRecord("node1", "", "198.18.0.11")))
    assert reg.revision == 1


def test_a_run_that_fails_half_way_leaves_the_registry_to_be_loaded_again() -> None:
    reg = _reg()

    def half(r: R.Registry) -> None:
        r.put_workload(_wl("node1", "web", "web"))
        r.delete_workload("node1", "nope")

    with pytest.raises(R.RegistryError):
        _step(reg, half)
    assert reg.broken
    with pytest.raises(R.RegistryError, match="loaded again"):
        _step(reg, lambda r: r.put_workload(_wl("node1", "web", "web")))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"namespace": "default", "port": 80}, "name"),
        ({"name": "Web", "port": 80}, "name"),
        ({"name": "web", "port": 0}, "port"),
        ({"name": "web", "port": "80"}, "port"),
        ({"name": "web", "port": 80, "colour": "red"}, "colour"),
        ({"name": "web", "port": 80, "namespace": "a_b"}, "namespace"),
    ],
)
def test_workload_request_validation_names_the_field(body: dict, field: str) -> None:
    with pytest.raises(R.RegistryError) as exc:
        R.workload_from_request("node1", body)
    assert field in str(exc.value)


# --- slices and changes ----------------------------------------------------------------

POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny", "namespace": "default"},
    "spec": {"action": "DENY", "rules": []},
}


def test_node_slice_shape_matches_the_ztunnel_schema() -> None:
    reg = _reg()
    _step(reg, lambda r: r.put_workload(_wl("node1", "web", "web")))
    _step(reg, lambda r: r.put_workload(_wl("node2", "api", "api", port=9090, version="v1")))
    results = reg.run(reg.revision + 1, lambda r: r.apply_resources([POLICY]))[1]
    assert results == ["AuthorizationPolicy/deny created"]
    s = reg.slice_for("node1", 7, "cluster.local").to_json()
    # The shared-encoding form is the same document.
    assert json.loads(reg.slice_json("node1", 7, "cluster.local")) == s
    assert s["revision"] == 7 and s["full"] is True
    assert s["node"] == {"name": "node1", "zone": "z1", "ip": "198.18.0.11"}
    assert [w["name"] for w in s["workloads"]] == ["web"]  # only this node's
    api = next(x for x in s["services"] if x["name"] == "api")
    assert api == {
        "name": "api",
        "namespace": "default",
        "vip": "240.0.0.2",
        "ports": [{"port": 9090, "target_port": 9090}],
        "endpoints": [
            {
                "workload": "api",
                "namespace": "default",
                "service_account": "api",
                "node": "node2",
                "node_ip": "198.18.0.12",
                "address": "198.18.0.12",
                "zone": "z2",
                "port": 9090,
                "service_port": 9090,
                "version": "v1",
            }
        ],
    }
    assert s["resources"] == [POLICY]
    # The services parse with the data plane's own parser.
    from meshnode.ztunnel.state import parse_snapshot

    state = parse_snapshot(
        {
            "schema": 4,
            "version": 7,
            "node": s["node"],
            "trust_domain": "cluster.local",
            "trust_bundle": "/x",
            "workloads": [],
            "services": s["services"],
        }
    )
    assert state.find_service_by_vip("240.0.0.2") is not None


def _feed(reg: R.Registry, steps: list[Callable[[R.Registry], object]]) -> Feed:
    feed = Feed(floor=0, revision=reg.revision)
    for fn in steps:
        feed.extend(_step(reg, fn), reg.revision)
    return feed


def _answer(feed: Feed, node: str, since: int, endpoints: bool = True) -> list[dict] | None:
    out = feed.answer(node, since, endpoints)
    return None if out is None else [json.loads(b) for b in out]


def test_changes_since_only_the_nodes_slice() -> None:
    reg = _reg()
    start = reg.slice_json("node1", 1, "td")
    feed = _feed(
        reg,
        [
            lambda r: r.put_workload(_wl("node1", "web", "web")),  # rev 2
            lambda r: r.put_workload(_wl("node2", "api", "api")),  # rev 3
            lambda r: r.put_workload(_wl("node2", "api-2", "api")),  # rev 4: one endpoint
            lambda r: r.apply_resources([POLICY]),  # rev 5
        ],
    )
    # node1 since 1: its own workload, both services, the policy; not node2's workload.
    ch = _answer(feed, "node1", 1)
    assert ch is not None
    assert [(c["kind"], c["key"]) for c in ch] == [
        ("workload", "web"),
        ("service", "default/web"),
        ("service", "default/api"),
        ("endpoint", "default/api/node2/api-2"),
        ("resource", "AuthorizationPolicy/default/deny"),
    ]
    ch2 = _answer(feed, "node2", 2)
    assert ch2 is not None
    assert ("workload", "web") not in [(c["kind"], c["key"]) for c in ch2]
    assert ("workload", "api") in [(c["kind"], c["key"]) for c in ch2]
    assert _answer(feed, "node1", 5) == []
    # Applied to node1's slice at rev 1, the changes give its slice at rev 5.
    delta = SliceDelta.from_json({"revision": 5, "full": False, "changes": ch})
    applied = NodeSlice.from_json(json.loads(start)).apply(delta)
    want = reg.slice_for("node1", 5, "td")
    assert tuple(sorted(applied.services, key=lambda x: x.key)) == want.services
    assert applied.workloads == want.workloads and applied.resources == want.resources
    # A node of an older release gets the whole service instead of the endpoint.
    old = feed.answer(
        "node1",
        3,
        endpoints=False,
        service_json=lambda k: reg.service_json(tuple(k.split("/"))),  # type: ignore[arg-type]
    )
    assert old is not None
    kinds = [(c["kind"], c["key"]) for c in map(json.loads, old)]
    assert kinds == [("service", "default/api"), ("resource", "AuthorizationPolicy/default/deny")]
    assert json.loads(old[0])["value"] == reg.service_doc(("default", "api")).to_json()


def test_changes_since_collapses_keys_and_handles_deletes() -> None:
    reg = _reg()
    feed = _feed(
        reg,
        [
            lambda r: r.put_workload(_wl("node1", "web", "web")),
            lambda r: r.delete_workload("node1", "web"),
        ],
    )
    assert _answer(feed, "node1", 1) == [
        {"op": "delete", "kind": "workload", "key": "web"},
        {"op": "delete", "kind": "service", "key": "default/web"},
    ]


def test_changes_since_asks_for_full_when_log_is_too_short_or_node_changed() -> None:
    reg = _reg()
    feed = Feed(floor=4, revision=4)
    reg.revision = 4
    feed.extend(_step(reg, lambda r: r.put_node(R.NodeRecord("node1", "z1", "198.18.0.99"))), 5)
    assert feed.answer("node1", 3) is None  # older than the log keeps
    assert feed.answer("node1", 4) is None  # node1's own record changed
    assert feed.answer("node2", 4) == []
    assert feed.answer("node2", 9) is None  # from the future: full
    feed.extend([R.Change(6, "put", "ca", "bundle", None, None)], 6)
    assert feed.answer("node2", 5) is None
    feed.trim(5)
    assert feed.answer("node2", 4) is None and feed.floor == 5


# --- CA: node and control-plane certificates, rotation ---------------------------------


def _csr() -> bytes:
    return make_csr(generate_private_key(), SpiffeId("cluster.local", "x", "y"))


def _chain_verifies(chain_pem: bytes, bundle_pem: bytes, now: datetime) -> bool:
    """Verify a leaf+intermediate chain against a bundle of roots at `now`."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    certs = x509.load_pem_x509_certificates(chain_pem)
    roots = x509.load_pem_x509_certificates(bundle_pem)
    verifier = PolicyBuilder().store(Store(roots)).time(now).build_client_verifier()
    try:
        verifier.verify(certs[0], certs[1:])
    except VerificationError:
        return False
    return True


def test_node_certificate_has_exactly_one_node_uri() -> None:
    ca = CertificateAuthority.create("cluster.local")
    pem = ca.issue_node_certificate(_csr(), "node1")
    leaf = x509.load_pem_x509_certificates(pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/node/node1"
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert node_name_from_certificate(leaf, "cluster.local") == "node1"
    assert node_name_from_certificate(leaf, "other.domain") is None
    with pytest.raises(IdentityError):  # never a workload identity
        spiffe_id_from_certificate(leaf)
    with pytest.raises(CAError):
        ca.issue_node_certificate(_csr(), "Node_1")


def test_workload_certificate_is_not_a_node_certificate() -> None:
    ca = CertificateAuthority.create("cluster.local")
    pem = ca.issue_workload_certificate(_csr(), SpiffeId("cluster.local", "default", "web"))
    assert (
        node_name_from_certificate(x509.load_pem_x509_certificates(pem)[0], "cluster.local") is None
    )


def test_controlplane_certificate_sans_and_ttl() -> None:
    ca = CertificateAuthority.create("cluster.local")
    key = generate_private_key()
    now = datetime.now(UTC)
    pem = ca.issue_controlplane_certificate(
        key, ["cp.example"], ["127.0.0.1", "10.0.0.5"], timedelta(seconds=30), now=now
    )
    leaf = x509.load_pem_x509_certificates(pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/controlplane"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["cp.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
    assert leaf.not_valid_after_utc - now <= timedelta(seconds=31)
    # It serves TLS: an ssl context accepts it with its key.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import tempfile

    with tempfile.NamedTemporaryFile() as c, tempfile.NamedTemporaryFile() as k:
        c.write(pem)
        c.flush()
        k.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        k.flush()
        ctx.load_cert_chain(c.name, k.name)


def test_workload_ttl_is_configurable_in_seconds() -> None:
    ca = CertificateAuthority.create("cluster.local")
    now = datetime.now(UTC)
    pem = ca.issue_workload_certificate(
        _csr(), SpiffeId("cluster.local", "a", "b"), timedelta(seconds=5), now=now
    )
    assert x509.load_pem_x509_certificates(pem)[0].not_valid_after_utc == (
        now + timedelta(seconds=5)
    ).replace(microsecond=0)


def test_rotation_overlap() -> None:
    t0 = datetime.now(UTC)
    cas = RotatingCA([(CertificateAuthority.create("cluster.local", now=t0), None)])
    old_leaf = cas.active.issue_node_certificate(_csr(), "node1", now=t0)
    old_root = cas.active.root_certificate

    t1 = t0 + timedelta(minutes=5)
    rotated = cas.rotate(timedelta(hours=1), now=t1)
    assert rotated.active.root_certificate != old_root
    new_leaf = rotated.active.issue_node_certificate(_csr(), "node1", now=t1)
    # New certificates come from the new intermediate.
    assert x509.load_pem_x509_certificates(new_leaf)[1] == rotated.active.intermediate_certificate

    during = t1 + timedelta(minutes=30)
    bundle = rotated.trust_bundle_pem(during)
    roots = x509.load_pem_x509_certificates(bundle)
    assert old_root in roots and rotated.active.root_certificate in roots and len(roots) == 2
    assert _chain_verifies(old_leaf, bundle, during)
    assert _chain_verifies(new_leaf, bundle, during)
    assert rotated.verify_leaf(x509.load_pem_x509_certificates(old_leaf)[0], during)

    after = t1 + timedelta(hours=1, seconds=1)
    bundle_after = rotated.trust_bundle_pem(after)
    assert x509.load_pem_x509_certificates(bundle_after) == [rotated.active.root_certificate]
    assert not _chain_verifies(old_leaf, bundle_after, after)
    assert not rotated.verify_leaf(x509.load_pem_x509_certificates(old_leaf)[0], after)
    assert _chain_verifies(new_leaf, bundle_after, after)


def test_root_pin_is_sha256_of_der() -> None:
    import hashlib

    ca = CertificateAuthority.create("cluster.local")
    der = ca.root_certificate.public_bytes(serialization.Encoding.DER)
    assert root_pin(der) == hashlib.sha256(der).hexdigest()


# --- rotation overlap (docs/security.md: a rotation must not lock the fleet out) -------


def test_rotation_refuses_an_overlap_shorter_than_a_certificate_lifetime() -> None:
    from datetime import timedelta

    from meshnode.controlplane.ca import minimum_rotation_overlap

    ca = RotatingCA([(CertificateAuthority.create("cluster.local"), None)])
    minimum = minimum_rotation_overlap(timedelta(hours=24), timedelta(seconds=60))
    assert minimum > timedelta(hours=24, seconds=60)
    with pytest.raises(CAError, match=r"lock nodes out.*at least one certificate lifetime"):
        ca.rotate(timedelta(0), minimum=minimum)
    with pytest.raises(CAError, match=f"--overlap {int(minimum.total_seconds())}"):
        ca.rotate(minimum - timedelta(seconds=1), minimum=minimum)
    rotated = ca.rotate(minimum, minimum=minimum)
    assert len(rotated.trusted()) == 2  # old and new root, both in the bundle
