"""The L4 authorization decision for an inbound connection, free of I/O.

The receiving node proxy asks, once per connection, whether `source` (the SPIFFE ID
the peer proved over mTLS) may reach `dest_service` in `dest_namespace` on
`dest_port`. Semantics are Istio's:

1. A policy applies to a destination when it lives in the destination's namespace
   and has no selector or selects the destination service.
2. DENY policies first: any matching DENY rule denies, naming that policy.
3. If any ALLOW policy applies, the connection is allowed iff some rule of one of
   them matches; otherwise denied (an ALLOW policy without rules thus denies all it
   selects unless another ALLOW policy allows).
4. If none applies: the mesh default action (MeshConfig, ALLOW unless configured).

Policies are compiled once, per (namespace, service) and per namespace, so `check`
only looks at the policies that apply. Table-tested in tests/unit/ztunnel/test_authz.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshnode.core.identity import SpiffeId
from meshnode.core.resources import (
    ACTIONS,
    ALLOW,
    DENY,
    AuthorizationPolicy,
    MeshConfig,
    Resource,
    Rule,
    qualify_service,
)

__all__ = ["AuthzDecision", "AuthzRequest", "Authorizer"]


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    source: SpiffeId  # the peer's proven identity
    # the services the source's proven identity backs, as "<namespace>/<service>":
    # derived from the identity (services whose endpoints run as it), never from
    # anything the source declares about itself
    source_services: frozenset[str]
    dest_service: str
    dest_namespace: str
    dest_port: int


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str | None  # "namespace/name" of the deciding policy, None = default
    reason: str  # human-readable, for the access log and the client-facing error


class _Principals:
    """Principal patterns: exact SPIFFE IDs and ``prefix/*`` wildcards (validated
    to end at a path-segment boundary, see core/resources.py)."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self._exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def matches(self, uri: str) -> bool:
        return uri in self._exact or uri.startswith(self._prefixes)


def _set(values: tuple[str, ...]) -> frozenset[str] | None:
    return frozenset(values) if values else None  # None: field absent, matches any


def _services(values: tuple[str, ...], namespace: str) -> frozenset[str] | None:
    return frozenset(qualify_service(v, namespace) for v in values) if values else None


class _CompiledRule:
    __slots__ = (
        "principals",
        "not_principals",
        "namespaces",
        "not_namespaces",
        "services",
        "not_services",
        "ports",
        "not_ports",
    )

    def __init__(self, rule: Rule, namespace: str) -> None:
        src, dst = rule.from_, rule.to
        self.principals = _Principals(src.principals) if src.principals else None
        self.not_principals = _Principals(src.not_principals) if src.not_principals else None
        self.namespaces = _set(src.namespaces)
        self.not_namespaces = _set(src.not_namespaces)
        self.services = _services(src.services, namespace)
        self.not_services = _services(src.not_services, namespace)
        self.ports = frozenset(dst.ports) if dst.ports else None
        self.not_ports = frozenset(dst.not_ports) if dst.not_ports else None

    def matches(self, req: AuthzRequest, uri: str) -> bool:
        """AND across the fields present, OR within each list."""
        namespace = req.source.namespace
        services = req.source_services
        port = req.dest_port
        return not (
            (self.principals is not None and not self.principals.matches(uri))
            or (self.not_principals is not None and self.not_principals.matches(uri))
            or (self.namespaces is not None and namespace not in self.namespaces)
            or (self.not_namespaces is not None and namespace in self.not_namespaces)
            or (self.services is not None and self.services.isdisjoint(services))
            or (self.not_services is not None and not self.not_services.isdisjoint(services))
            or (self.ports is not None and port not in self.ports)
            or (self.not_ports is not None and port in self.not_ports)
        )


class _CompiledPolicy:
    __slots__ = ("ref", "action", "rules")

    def __init__(self, policy: AuthorizationPolicy) -> None:
        self.ref = f"{policy.namespace}/{policy.name}"
        self.action = policy.action
        self.rules = tuple(_CompiledRule(rule, policy.namespace) for rule in policy.rules)

    def first_match(self, req: AuthzRequest, uri: str) -> int | None:
        for index, rule in enumerate(self.rules):
            if rule.matches(req, uri):
                return index
        return None


@dataclass(frozen=True, slots=True)
class _Applicable:
    """The policies that apply to one destination, each list sorted by ref."""

    deny: tuple[_CompiledPolicy, ...]
    allow: tuple[_CompiledPolicy, ...]
    no_match_reason: str  # precomputed: "no ALLOW rule matched (applicable: ...)"

    @classmethod
    def of(cls, policies: Iterable[_CompiledPolicy]) -> _Applicable:
        ordered = sorted(policies, key=lambda p: p.ref)
        allow = tuple(p for p in ordered if p.action == ALLOW)
        return cls(
            deny=tuple(p for p in ordered if p.action == DENY),
            allow=allow,
            no_match_reason=(
                f"no ALLOW rule matched (applicable: {', '.join(p.ref for p in allow)})"
            ),
        )


_NONE = _Applicable.of(())


class Authorizer:
    """Decides connections against a fixed set of policies; build a new one when the
    policies change (cheap: policies are few)."""

    def __init__(
        self, policies: Iterable[AuthorizationPolicy], default_action: str = ALLOW
    ) -> None:
        if default_action not in ACTIONS:
            raise ValueError(
                f"default_action must be one of {', '.join(ACTIONS)}, not {default_action!r}"
            )
        self.default_action = default_action
        namespace_wide: dict[str, list[_CompiledPolicy]] = {}
        selecting: dict[tuple[str, str], list[_CompiledPolicy]] = {}
        for policy in policies:
            compiled = _CompiledPolicy(policy)
            if policy.selector is None:
                namespace_wide.setdefault(policy.namespace, []).append(compiled)
            else:
                for service in set(policy.selector.services):
                    selecting.setdefault((policy.namespace, service), []).append(compiled)
        # A selected service sees its namespace's selector-less policies too; any other
        # service of the namespace sees only those.
        self._by_namespace = {ns: _Applicable.of(ps) for ns, ps in namespace_wide.items()}
        self._by_service = {
            (ns, service): _Applicable.of([*ps, *namespace_wide.get(ns, ())])
            for (ns, service), ps in selecting.items()
        }

    @classmethod
    def from_resources(cls, resources: Iterable[Resource]) -> Authorizer:
        """The AuthorizationPolicies of `resources`, with MeshConfig's default action."""
        policies: list[AuthorizationPolicy] = []
        default_action = ALLOW
        for resource in resources:
            if isinstance(resource, AuthorizationPolicy):
                policies.append(resource)
            elif isinstance(resource, MeshConfig):
                default_action = resource.default_action
        return cls(policies, default_action)

    def _applicable(self, namespace: str, service: str) -> _Applicable:
        found = self._by_service.get((namespace, service))
        if found is None:
            found = self._by_namespace.get(namespace, _NONE)
        return found

    def applicable(self, namespace: str, service: str) -> tuple[str, ...]:
        """Refs ("ns/name") of the policies that apply to a destination, DENY first."""
        found = self._applicable(namespace, service)
        return tuple(p.ref for p in (*found.deny, *found.allow))

    def check(self, req: AuthzRequest) -> AuthzDecision:
        found = self._applicable(req.dest_namespace, req.dest_service)
        uri = req.source.uri
        for policy in found.deny:
            index = policy.first_match(req, uri)
            if index is not None:
                return AuthzDecision(
                    False, policy.ref, f"DENY policy {policy.ref} rules[{index}] matched"
                )
        if found.allow:
            for policy in found.allow:
                index = policy.first_match(req, uri)
                if index is not None:
                    return AuthzDecision(
                        True, policy.ref, f"ALLOW policy {policy.ref} rules[{index}] matched"
                    )
            return AuthzDecision(False, None, found.no_match_reason)
        return AuthzDecision(
            self.default_action == ALLOW,
            None,
            f"no ALLOW policy applies to service {req.dest_service} in namespace "
            f"{req.dest_namespace}: default action {self.default_action}",
        )
