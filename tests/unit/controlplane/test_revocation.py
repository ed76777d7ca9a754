"""A deleted node's certificates are revoked mesh-wide (issue 10, attack 6 for
nodes): the registry keeps a revocation for one certificate lifetime, every
node's slice carries it, and a change makes every node fetch a full slice. Pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509

from meshnode.controlplane import registry as R
from meshnode.controlplane.ca import CLOCK_SKEW, CertificateAuthority
from meshnode.core.contracts import NodeSlice, Revocation
from meshnode.core.identity import SpiffeId
from meshnode.core.pki import generate_private_key, issued_to_node, make_csr

NOW = 1_800_000_000.0


def _reg() -> R.Registry:
    reg = R.put_node(R.Registry(), R.NodeRecord("node1", "z1", "198.18.0.11"))
    return R.put_node(reg, R.NodeRecord("node2", "z1", "198.18.0.12"))


def test_the_backdate_matches_the_ca() -> None:
    assert CLOCK_SKEW.total_seconds() == R.CA_BACKDATE


def test_deleting_a_node_revokes_its_certificates_for_one_lifetime() -> None:
    reg = R.delete_node(_reg(), "node1", NOW, 3600)
    rev = reg.revoked["node1"]
    assert rev.issued_before == NOW - 60 and rev.until == NOW + 3600 + 60
    sl = R.slice_for(reg, "node2", 5, "cluster.local")
    assert sl.revoked == (Revocation("node1", NOW - 60),)
    doc = sl.to_json()
    assert doc["revoked"] == [{"node": "node1", "issued_before": NOW - 60}]
    assert NodeSlice.from_json(doc) == sl
    # A slice with nothing revoked does not carry the field (older nodes read it).
    assert "revoked" not in R.slice_for(_reg(), "node2", 5, "cluster.local").to_json()
    # Every node is told: a full slice for all (the change is rare).
    changes = R.diff(_reg(), reg, 7)
    assert any(c.kind == "revoked" and c.nodes is None for c in changes)
    assert R.changes_since(changes, 0, 6, "node2", 7) is None
    # Expired revocations go with the next deletion.
    later = R.put_node(reg, R.NodeRecord("node3", "z1", "198.18.0.13"))
    reg2 = R.delete_node(later, "node3", NOW + 7200, 3600)
    assert set(reg2.revoked) == {"node3"}
    # Without a clock (an internal removal) nothing is revoked.
    assert R.delete_node(_reg(), "node1").revoked == {}


def test_workload_certificates_name_their_node_and_revocation_compares_issue_time() -> None:
    ca = CertificateAuthority.create("cluster.local")
    ident = SpiffeId("cluster.local", "default", "web")
    issued_at = datetime.fromtimestamp(NOW, UTC)
    pem = ca.issue_workload_certificate(
        make_csr(generate_private_key(), ident), ident, node="node1", now=issued_at
    )
    leaf = x509.load_pem_x509_certificates(pem)[0]
    assert issued_to_node(leaf) == "node1"
    not_before = leaf.not_valid_before_utc.timestamp()
    deleted_after = R.delete_node(_reg(), "node1", NOW + 10, 3600).revoked["node1"]
    deleted_before = R.delete_node(_reg(), "node1", NOW - 10, 3600).revoked["node1"]
    assert Revocation("node1", deleted_after.issued_before).revokes("node1", not_before)
    assert not Revocation("node1", deleted_before.issued_before).revokes("node1", not_before)
    assert not Revocation("node2", deleted_after.issued_before).revokes("node1", not_before)
    # A certificate issued for no node (older releases) names none.
    plain = ca.issue_workload_certificate(make_csr(generate_private_key(), ident), ident)
    assert issued_to_node(x509.load_pem_x509_certificates(plain)[0]) == ""
    assert timedelta(seconds=R.CA_BACKDATE) == CLOCK_SKEW
