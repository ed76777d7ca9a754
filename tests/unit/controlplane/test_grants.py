"""Identity grants (controlplane/grants.py, core/resources.py IdentityGrant):
which node may host which identity, decided from the operator's grants only."""

from __future__ import annotations

import pytest

from meshnode.controlplane.grants import decide, token_grant
from meshnode.core.resources import IdentityGrant, ResourceError, parse_documents

GRANTS = parse_documents(
    """
kind: IdentityGrant
metadata: {name: web-nodes}
spec:
  nodes: [web-1, web-2]
  identities: [default/web, default/web-admin]
---
kind: IdentityGrant
metadata: {name: zone-a-shop}
spec:
  zones: [zone-a]
  identities: ["shop/*"]
"""
)


def _grants() -> list[IdentityGrant]:
    return [g for g in GRANTS if isinstance(g, IdentityGrant)]


@pytest.mark.parametrize(
    "node, zone, ns, sa, allowed, grant",
    [
        ("web-1", "", "default", "web", True, "web-nodes"),
        ("web-2", "zone-b", "default", "web-admin", True, "web-nodes"),
        ("web-3", "", "default", "web", False, None),  # another node
        ("web-1", "", "prod", "payments", False, None),  # an identity never granted
        ("web-1", "", "default", "api", False, None),
        ("db-1", "zone-a", "shop", "cart", True, "zone-a-shop"),  # by zone, any sa of shop
        ("db-1", "zone-b", "shop", "cart", False, None),
        ("db-1", "", "shop", "cart", False, None),  # no zone: zone grants don't apply
        ("db-1", "zone-a", "shopping", "cart", False, None),  # namespace exact
    ],
)
def test_decide(node: str, zone: str, ns: str, sa: str, allowed: bool, grant: str | None) -> None:
    decision = decide(_grants(), node, zone, ns, sa)
    assert (decision.allowed, decision.grant) == (allowed, grant)
    if not allowed:
        assert f"node {node} is not granted identity {ns}/{sa}" in decision.message
        assert f"--identity {ns}/{sa}" in decision.message


def test_no_grants_no_identities() -> None:
    assert not decide([], "web-1", "zone-a", "default", "web").allowed


def test_token_grant() -> None:
    grant = token_grant("web-1", ["default/web"])
    assert grant is not None and grant.nodes == ("web-1",)
    assert decide([grant], "web-1", "", "default", "web").allowed
    assert not decide([grant], "web-2", "", "default", "web").allowed
    assert token_grant("web-1", []) is None


@pytest.mark.parametrize(
    "spec, path",
    [
        ("{identities: [default/web]}", "spec"),  # for nobody
        ("{nodes: [web-1]}", "spec.identities"),  # nothing granted
        ("{nodes: [web-1], identities: []}", "spec.identities"),
        ("{nodes: [web-1], identities: [web]}", "spec.identities[0]"),  # no namespace
        ("{nodes: [web-1], identities: ['*/*']}", "spec.identities[0]"),  # no wildcard namespace
        ("{nodes: [Web], identities: [default/web]}", "spec.nodes[0]"),
        ("{zones: [a.b], identities: [default/web]}", "spec.zones[0]"),
        ("{nodes: [web-1], identities: [default/web], extra: 1}", "spec.extra"),
    ],
)
def test_invalid_grants(spec: str, path: str) -> None:
    with pytest.raises(ResourceError) as err:
        parse_documents(f"kind: IdentityGrant\nmetadata: {{name: g}}\nspec: {spec}\n")
    assert path in str(err.value)


def test_grants_are_mesh_wide() -> None:
    with pytest.raises(ResourceError, match="mesh-wide"):
        parse_documents(
            "kind: IdentityGrant\nmetadata: {name: g, namespace: shop}\n"
            "spec: {nodes: [a], identities: [shop/x]}\n"
        )


def test_round_trip() -> None:
    for grant in _grants():
        (again,) = parse_documents(__import__("yaml").safe_dump(grant.to_dict()))
        assert again == grant
