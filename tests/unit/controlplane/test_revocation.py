"""A deleted node's certificates are revoked mesh-wide (issue 10, attack 6 for
nodes): the registry keeps a revocation for one certificate lifetime, every
node's slice carries it, and a change makes every node fetch a full slice. Pure."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509

from meshnode.controlplane import registry as R
from meshnode.controlplane.ca import CLOCK_SKEW, CertificateAuthority
from meshnode.controlplane.feed import Feed
from meshnode.core.contracts import NodeSlice, Revocation
from meshnode.core.identity import SpiffeId
from meshnode.core.pki import generate_private_key, issued_to_node, make_csr

NOW = 1_800_000_000.0


def _step(reg: R.Registry, fn: Callable[[R.Registry], object]) -> list[R.Change]:
    return reg.run(reg.revision + 1, fn)[0]


def _reg() -> R.Registry:
    reg = R.Registry()
    _step(reg, lambda r: r.put_node(R.NodeRecord("node1", "z1", "198.18.0.11")))
    _step(reg, lambda r: r.put_node(R.NodeRecord("node2", "z1", "198.18.0.12")))
    return reg


def _deleted(name: str, now: float | None, ttl: float = 3600) -> R.Registry:
    reg = _reg()
    _step(reg, lambda r: r.delete_node(name, now, ttl))
    return reg


def test_the_backdate_matches_the_ca() -> None:
    assert CLOCK_SKEW.total_seconds() == R.CA_BACKDATE


def test_deleting_a_node_revokes_its_certificates_for_one_lifetime() -> None:
    reg = _reg()
    changes = _step(reg, lambda r: r.delete_node("node1", NOW, 3600))
    rev = reg.revoked["node1"]
    assert rev.issued_before == NOW - 60 and rev.until == NOW + 3600 + 60
    sl = reg.slice_for("node2", 5, "cluster.local")
    assert sl.revoked == (Revocation("node1", NOW - 60),)
    doc = sl.to_json()
    assert doc["revoked"] == [{"node": "node1", "issued_before": NOW - 60}]
    assert NodeSlice.from_json(doc) == sl
    assert json.loads(reg.slice_json("node2", 5, "cluster.local")) == doc
    # A slice with nothing revoked does not carry the field (older nodes read it).
    assert "revoked" not in _reg().slice_for("node2", 5, "cluster.local").to_json()
    # Every node is told: a full slice for all (the change is rare).
    assert any(c.kind == "revoked" and c.nodes is None for c in changes)
    feed = Feed(floor=2, revision=2)
    feed.extend(changes, 3)
    assert feed.answer("node2", 2) is None
    # A follower learns the revocation from the log alone.
    follower = _reg()
    follower.follow(changes, 3)
    assert follower.revoked == reg.revoked
    # Expired revocations go with the next deletion.
    _step(reg, lambda r: r.put_node(R.NodeRecord("node3", "z1", "198.18.0.13")))
    _step(reg, lambda r: r.delete_node("node3", NOW + 7200, 3600))
    assert set(reg.revoked) == {"node3"}
    # Without a clock (an internal removal) nothing is revoked.
    assert _deleted("node1", None).revoked == {}


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
    deleted_after = _deleted("node1", NOW + 10).revoked["node1"]
    deleted_before = _deleted("node1", NOW - 10).revoked["node1"]
    assert Revocation("node1", deleted_after.issued_before).revokes("node1", not_before)
    assert not Revocation("node1", deleted_before.issued_before).revokes("node1", not_before)
    assert not Revocation("node2", deleted_after.issued_before).revokes("node1", not_before)
    # A certificate issued for no node (older releases) names none.
    plain = ca.issue_workload_certificate(make_csr(generate_private_key(), ident), ident)
    assert issued_to_node(x509.load_pem_x509_certificates(plain)[0]) == ""
    assert timedelta(seconds=R.CA_BACKDATE) == CLOCK_SKEW
