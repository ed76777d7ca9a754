"""Identity grants: which node may host which workload identity. Pure.

The control plane asks this before it registers a workload, signs a workload
certificate or lists an endpoint: the node must be covered by an
``IdentityGrant`` (core/resources.py) that names the identity. A node's own
declaration counts for nothing; what it may be is what the operator granted.

Grants come from two places, both the operator's: ``IdentityGrant`` resources
(``meshnode apply``) and the ``--identity`` of the join token the node enrolled
with (kept as the node's own grant).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshnode.core.resources import IdentityGrant

__all__ = ["Decision", "decide", "token_grant", "TOKEN_GRANT_PREFIX"]

# A token's --identity list becomes a grant of this name for the node it enrolled.
TOKEN_GRANT_PREFIX = "token-"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    grant: str | None  # the grant that allows it
    message: str  # for a refusal: what to add (a person can act on it)


def token_grant(node: str, identities: Iterable[str]) -> IdentityGrant | None:
    """The grant a join token's ``--identity`` values give the node it enrolls."""
    idents = tuple(identities)
    if not idents:
        return None
    return IdentityGrant(name=f"{TOKEN_GRANT_PREFIX}{node}", nodes=(node,), identities=idents)


def decide(
    grants: Iterable[IdentityGrant], node: str, zone: str, namespace: str, service_account: str
) -> Decision:
    """May `node` (in `zone`) host ``<namespace>/<service_account>``?"""
    for grant in sorted(grants, key=lambda g: g.name):
        if grant.covers_node(node, zone) and grant.covers_identity(namespace, service_account):
            return Decision(True, grant.name, "")
    return Decision(
        False,
        None,
        f"node {node} is not granted identity {namespace}/{service_account}: an operator "
        f"grants it with `meshnode apply` of an IdentityGrant naming node {node} (or its "
        f"zone) and identity {namespace}/{service_account}, or with a join token made by "
        f"`meshnode token create --node {node} --identity {namespace}/{service_account}`",
    )
