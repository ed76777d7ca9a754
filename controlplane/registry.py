"""What the control plane knows, as values, and the node slices cut from it.

Pure: no I/O, no clocks. A :class:`Registry` holds nodes, workloads, services (with
their VIPs) and policy resources. Mutations are functions ``Registry -> Registry``;
:func:`diff` turns a before/after pair into change-log entries, so every way of
changing the registry produces the same, correct log. :func:`node_slice` and
:func:`changes_since` answer a node's ``GET /v1/node/config`` (docs/protocol.md).

Keys in the change log (what a node receives in ``changes[].key``):

- workload: ``<name>`` (workload names are unique per node; only the owning node
  sees the change),
- service: ``<namespace>/<name>``,
- resource: ``<kind>/<namespace>/<name>``.

Two internal kinds never reach a node as changes: ``node`` (this node's own record
changed) and ``ca`` (the trust bundle changed); both make :func:`changes_since`
answer "send a full slice" for the nodes concerned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from meshnode.core import constants
from meshnode.core import contracts as wire
from meshnode.core.contracts import ContractError, NodeDoc, NodeSlice, ServiceDoc, WorkloadDoc
from meshnode.core.errors import MeshnodeError
from meshnode.core.resources import DEFAULT_NAMESPACE, IdentityGrant, resource_from_dict

from . import grants as grant_rules

__all__ = [
    "VIP_NETWORK",
    "Change",
    "NodeRecord",
    "Registry",
    "RegistryError",
    "RevokedRecord",
    "ServiceRecord",
    "WorkloadRecord",
    "allocate_vip",
    "apply_resources",
    "changes_since",
    "delete_node",
    "delete_resource",
    "delete_workload",
    "diff",
    "node_slice",
    "put_node",
    "put_workload",
    "register_workload",
    "set_token_grant",
    "granted",
    "grants_of",
    "service_docs",
    "service_documents",
    "slice_for",
]

VIP_NETWORK = ipaddress.IPv4Network(constants.VIP_NETWORK)
CA_BACKDATE = 60.0  # seconds; ca.CLOCK_SKEW (tests/unit/controlplane checks they agree)
# How many workloads one node may register; a node cannot fill every node's
# destination map by registering without end (`controlplane run` can change it).
DEFAULT_MAX_WORKLOADS_PER_NODE = 256
GRANT_KIND = IdentityGrant.kind


class RegistryError(MeshnodeError, ValueError):
    """A request would make the registry invalid. `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    zone: str
    ip: str

    def doc(self) -> NodeDoc:
        return NodeDoc(name=self.name, ip=self.ip, zone=self.zone)

    def to_dict(self) -> dict[str, Any]:
        return self.doc().to_json()


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    node: str
    name: str
    namespace: str
    service: str  # "" = in no service
    service_account: str
    port: int
    version: str = ""

    def doc(self) -> WorkloadDoc:
        """The form in a node slice (meshnode.core.contracts)."""
        return WorkloadDoc(
            name=self.name,
            namespace=self.namespace,
            service=self.service,
            service_account=self.service_account,
            port=self.port,
            version=self.version,
        )

    def slice_dict(self) -> dict[str, Any]:
        return self.doc().to_json()

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, **self.slice_dict()}


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    vip: str
    port: int  # the service port: the port of the workload that created the service


@dataclass(frozen=True, slots=True)
class Registry:
    nodes: Mapping[str, NodeRecord] = field(default_factory=dict)
    workloads: Mapping[tuple[str, str], WorkloadRecord] = field(default_factory=dict)
    services: Mapping[tuple[str, str], ServiceRecord] = field(default_factory=dict)
    # (kind, namespace, name) -> resource document (resources.py JSON form)
    resources: Mapping[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    # deleted node -> its revocation, kept while a certificate issued before it may live
    revoked: Mapping[str, RevokedRecord] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RevokedRecord:
    """A deleted node's certificates issued before `issued_before` are refused
    mesh-wide; the record is dropped after `until` (when the last of them expired)."""

    node: str
    issued_before: float
    until: float


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry. `nodes` None = every node's slice is affected."""

    revision: int
    op: str  # "put" | "delete"
    kind: str  # "workload" | "service" | "resource" | "node" | "ca" | "revoked"
    key: str
    value: dict[str, Any] | None
    nodes: tuple[str, ...] | None

    def concerns(self, node: str) -> bool:
        return self.nodes is None or node in self.nodes

    def wire(self) -> dict[str, Any]:
        """The entry in a node's ``changes`` (meshnode.core.contracts.SliceChange);
        `value` was made by that contract's ``to_json`` (see :func:`diff`)."""
        out: dict[str, Any] = {"op": self.op, "kind": self.kind, "key": self.key}
        if self.op == "put":
            out["value"] = self.value
        return out


# --- validation ---------------------------------------------------------------------


def _checked(check: Any, value: object, what: str) -> Any:
    """A validator of meshnode.core.contracts, with RegistryError (status 400)."""
    try:
        return check(value, what)
    except ContractError as exc:
        raise RegistryError(str(exc)) from None


def check_label(value: object, what: str) -> str:
    return str(_checked(wire.check_label, value, what))


def check_port(value: object, what: str) -> int:
    return int(_checked(wire.check_port, value, what))


def check_ip(value: object, what: str) -> str:
    return str(_checked(wire.check_ip, value, what))


def workload_from_request(node: str, body: Mapping[str, Any]) -> WorkloadRecord:
    """Validate a ``POST /v1/node/workloads`` body; errors name the field."""
    allowed = {"name", "namespace", "service", "service_account", "port", "version"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RegistryError(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    name = check_label(body.get("name"), "name")
    namespace = check_label(body.get("namespace", "default"), "namespace")
    service = body.get("service", name)
    if service != "":
        check_label(service, "service")
    account = check_label(body.get("service_account", service or name), "service_account")
    port = check_port(body.get("port"), "port")
    version = _checked(wire.check_version_label, body.get("version", "") or "", "version")
    return WorkloadRecord(node, name, namespace, service, account, port, version)


# --- VIPs ---------------------------------------------------------------------------


def allocate_vip(used: Iterable[str]) -> str:
    """The lowest free address of 240.0.0.0/4, skipping the network address."""
    taken = {int(ipaddress.IPv4Address(v)) for v in used}
    first = int(VIP_NETWORK.network_address) + 1
    last = int(VIP_NETWORK.broadcast_address) - 1
    candidate = first
    for value in sorted(t for t in taken if t >= first):
        if value > candidate:
            break
        if value == candidate:
            candidate += 1
    if candidate > last:
        raise RegistryError("no free VIP left in 240.0.0.0/4", status=507)
    return str(ipaddress.IPv4Address(candidate))


# --- mutations ----------------------------------------------------------------------


def put_node(reg: Registry, node: NodeRecord) -> Registry:
    check_label(node.name, "node name")
    if node.zone:
        check_label(node.zone, "zone")
    check_ip(node.ip, "ip")
    return replace(reg, nodes={**reg.nodes, node.name: node})


def delete_node(
    reg: Registry, name: str, now: float | None = None, cert_ttl: float = 0.0
) -> Registry:
    """Forget a node and its workloads (services left empty go with them). With
    `now`, its certificates issued until now are revoked mesh-wide for `cert_ttl`
    (every node closes tunnels resting on one), and expired revocations go."""
    if name not in reg.nodes:
        raise RegistryError(f"node {name!r} is not registered", status=404)
    nodes = {k: v for k, v in reg.nodes.items() if k != name}
    workloads = {k: v for k, v in reg.workloads.items() if v.node != name}
    revoked = dict(reg.revoked)
    if now is not None:
        revoked = {k: r for k, r in revoked.items() if r.until >= now}
        # The CA backdates notBefore by its clock skew: a certificate issued at t
        # has notBefore t - skew, so "issued before now" is "notBefore < now - skew".
        revoked[name] = RevokedRecord(name, now - CA_BACKDATE, now + cert_ttl + CA_BACKDATE)
    return _prune_services(replace(reg, nodes=nodes, workloads=workloads, revoked=revoked))


def put_workload(reg: Registry, wl: WorkloadRecord) -> Registry:
    """Register or update a workload; a new (namespace, service) gets the lowest free VIP."""
    if wl.node not in reg.nodes:
        raise RegistryError(f"node {wl.node!r} is not registered", status=404)
    workloads = {**reg.workloads, (wl.node, wl.name): wl}
    services = dict(reg.services)
    if wl.service and (wl.namespace, wl.service) not in services:
        vip = allocate_vip(s.vip for s in services.values())
        services[(wl.namespace, wl.service)] = ServiceRecord(wl.namespace, wl.service, vip, wl.port)
    return _prune_services(replace(reg, workloads=workloads, services=services))


def delete_workload(reg: Registry, node: str, name: str) -> Registry:
    if (node, name) not in reg.workloads:
        raise RegistryError(f"no workload {name!r} is registered on node {node!r}", status=404)
    workloads = {k: v for k, v in reg.workloads.items() if k != (node, name)}
    return _prune_services(replace(reg, workloads=workloads))


def register_workload(
    reg: Registry, wl: WorkloadRecord, limit: int = DEFAULT_MAX_WORKLOADS_PER_NODE
) -> Registry:
    """:func:`put_workload` for a node's own request: refused (403) unless the node is
    granted the workload's identity, and (429) past the per-node workload limit."""
    node = reg.nodes.get(wl.node)
    if node is None:
        raise RegistryError(f"node {wl.node!r} is not registered", status=404)
    decision = granted(reg, grants_of(reg), wl.node, wl.namespace, wl.service_account)
    if not decision.allowed:
        raise RegistryError(f"workload {wl.name}: {decision.message}", status=403)
    others = sum(1 for w in reg.workloads.values() if w.node == wl.node and w.name != wl.name)
    if others >= limit:
        raise RegistryError(
            f"workload {wl.name}: node {wl.node} already has {others} workloads, the limit "
            "per node; remove one (meshnode workload rm) or raise the limit "
            "(meshnode controlplane run --max-workloads-per-node)",
            status=429,
        )
    return put_workload(reg, wl)


def set_token_grant(reg: Registry, node: str, identities: Sequence[str]) -> Registry:
    """The grant a node's join token gives it (``token-<node>``): replaced at each
    enrollment, removed when the token named no identity."""
    grant = grant_rules.token_grant(node, identities)
    key = (GRANT_KIND, DEFAULT_NAMESPACE, f"{grant_rules.TOKEN_GRANT_PREFIX}{node}")
    resources = {k: v for k, v in reg.resources.items() if k != key}
    if grant is not None:
        resources[key] = grant.to_dict()
    return replace(reg, resources=resources)


def grants_of(reg: Registry) -> tuple[IdentityGrant, ...]:
    """Every identity grant in the registry (``IdentityGrant`` resources)."""
    return tuple(
        IdentityGrant.from_dict(doc) for key, doc in reg.resources.items() if key[0] == GRANT_KIND
    )


def granted(
    reg: Registry, grants: Sequence[IdentityGrant], node: str, namespace: str, account: str
) -> grant_rules.Decision:
    """May `node` host ``<namespace>/<account>``, by `grants` (see grants.py)?"""
    record = reg.nodes.get(node)
    zone = record.zone if record is not None else ""
    return grant_rules.decide(grants, node, zone, namespace, account)


def _prune_services(reg: Registry) -> Registry:
    """A service exists while a workload names it; then its VIP is free again."""
    wanted = {(w.namespace, w.service) for w in reg.workloads.values() if w.service}
    return replace(reg, services={k: v for k, v in reg.services.items() if k in wanted})


def apply_resources(reg: Registry, docs: Sequence[dict[str, Any]]) -> tuple[Registry, list[str]]:
    """Put validated resource documents; results like ``AuthorizationPolicy/x created``."""
    resources = dict(reg.resources)
    results = []
    for doc in docs:
        key = resource_key(doc)
        old = resources.get(key)
        verb = "created" if old is None else ("unchanged" if old == doc else "configured")
        resources[key] = doc
        results.append(f"{key[0]}/{key[2]} {verb}")
    return replace(reg, resources=resources), results


def delete_resource(reg: Registry, kind: str, namespace: str, name: str) -> Registry:
    key = (kind, namespace, name)
    if key not in reg.resources:
        raise RegistryError(f"{kind} {namespace}/{name} not found", status=404)
    return replace(reg, resources={k: v for k, v in reg.resources.items() if k != key})


def resource_key(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata", {})
    return (str(doc["kind"]), str(meta.get("namespace", "default")), str(meta["name"]))


# --- what nodes see -----------------------------------------------------------------


def service_docs(
    reg: Registry, keys: Iterable[tuple[str, str]] | None = None
) -> dict[tuple[str, str], ServiceDoc]:
    """The service documents nodes receive (meshnode.core.contracts), by key; with
    `keys`, only those services (the ones a change touched, see :func:`diff`)."""
    out = {}
    grants = grants_of(reg)
    wanted = sorted(reg.services) if keys is None else sorted(set(keys) & set(reg.services))
    by_service: dict[tuple[str, str], list[WorkloadRecord]] = {k: [] for k in wanted}
    for wl in reg.workloads.values():  # one pass, not one per service
        members = by_service.get((wl.namespace, wl.service))
        if members is not None:
            members.append(wl)
    for key in wanted:
        svc = reg.services[key]
        endpoints = []
        for wl in sorted(by_service[key], key=lambda w: (w.node, w.name)):
            node = reg.nodes.get(wl.node)
            if node is None:
                continue
            # Only a granted registration is an endpoint: a revoked grant takes the
            # workload out of every node's view at once.
            if not granted(reg, grants, wl.node, wl.namespace, wl.service_account).allowed:
                continue
            endpoints.append(
                wire.EndpointDoc(
                    workload=wl.name,
                    namespace=wl.namespace,
                    service_account=wl.service_account,
                    node=node.name,
                    node_ip=node.ip,
                    address=node.ip,
                    zone=node.zone,
                    port=wl.port,
                    service_port=svc.port,
                    version=wl.version,
                )
            )
        out[key] = ServiceDoc(
            name=svc.name,
            namespace=svc.namespace,
            vip=svc.vip,
            ports=(wire.ServicePort(svc.port, svc.port),),
            endpoints=tuple(endpoints),
        )
    return out


def service_documents(reg: Registry) -> dict[tuple[str, str], dict[str, Any]]:
    """:func:`service_docs` in their JSON form (the admin API lists them)."""
    return {key: doc.to_json() for key, doc in service_docs(reg).items()}


def slice_for(
    reg: Registry, node: str, revision: int, trust_domain: str, trust_bundle: str | None = None
) -> NodeSlice:
    """The full slice for `node` (which must be registered)."""
    return NodeSlice(
        revision=revision,
        node=reg.nodes[node].doc(),
        trust_domain=trust_domain,
        workloads=tuple(w.doc() for (n, _), w in sorted(reg.workloads.items()) if n == node),
        services=tuple(service_docs(reg).values()),
        resources=tuple(
            resource_from_dict(doc)
            for key, doc in sorted(reg.resources.items())
            if key[0] != GRANT_KIND  # grants are for the control plane, not for nodes
        ),
        trust_bundle=trust_bundle,
        revoked=tuple(
            wire.Revocation(r.node, r.issued_before) for _, r in sorted(reg.revoked.items())
        ),
    )


def node_slice(
    reg: Registry, node: str, revision: int, trust_domain: str, trust_bundle: str | None = None
) -> dict[str, Any]:
    """:func:`slice_for` as the JSON answer of ``GET /v1/node/config``."""
    return slice_for(reg, node, revision, trust_domain, trust_bundle).to_json()


def diff(before: Registry, after: Registry, revision: int) -> list[Change]:
    """The change-log entries that take every node's slice from `before` to `after`."""
    changes: list[Change] = []

    def add(
        op: str, kind: str, key: str, value: dict[str, Any] | None, nodes: tuple[str, ...] | None
    ) -> None:
        changes.append(Change(revision, op, kind, key, value, nodes))

    for name in sorted(set(before.nodes) | set(after.nodes)):
        old, new = before.nodes.get(name), after.nodes.get(name)
        if old != new:
            add("put" if new else "delete", "node", name, new.to_dict() if new else None, (name,))
    for wkey in sorted(set(before.workloads) | set(after.workloads)):
        wold, wnew = before.workloads.get(wkey), after.workloads.get(wkey)
        if wold != wnew:
            value = wnew.slice_dict() if wnew else None
            add("put" if wnew else "delete", "workload", wkey[1], value, (wkey[0],))
    touched = _touched_services(before, after)
    sold, snew = service_docs(before, touched), service_docs(after, touched)
    for skey in sorted(set(sold) | set(snew)):
        sdoc = snew.get(skey)
        if sold.get(skey) != sdoc:
            add(
                "put" if sdoc else "delete",
                "service",
                "/".join(skey),
                sdoc.to_json() if sdoc else None,
                None,
            )
    for rkey in sorted(set(before.resources) | set(after.resources)):
        rold, rnew = before.resources.get(rkey), after.resources.get(rkey)
        if rold != rnew and rkey[0] != GRANT_KIND:
            add("put" if rnew else "delete", "resource", "/".join(rkey), rnew, None)
    if before.revoked != after.revoked:  # rare: every node gets a full slice
        add("put", "revoked", "*", None, None)
    return changes


def _touched_services(before: Registry, after: Registry) -> set[tuple[str, str]] | None:
    """The services whose documents a change from `before` to `after` can alter
    (None: every one, when the grants changed). A service document is made of its
    own record, its workloads, their nodes, and the grants."""
    if any(
        key[0] == GRANT_KIND and before.resources.get(key) != after.resources.get(key)
        for key in set(before.resources) | set(after.resources)
    ):
        return None
    touched: set[tuple[str, str]] = set()
    for key in set(before.services) | set(after.services):
        if before.services.get(key) != after.services.get(key):
            touched.add(key)
    nodes_changed = {
        name
        for name in set(before.nodes) | set(after.nodes)
        if before.nodes.get(name) != after.nodes.get(name)
    }
    if before.workloads is not after.workloads:
        for wkey in set(before.workloads) | set(after.workloads):
            old, new = before.workloads.get(wkey), after.workloads.get(wkey)
            if old != new:
                touched.update((w.namespace, w.service) for w in (old, new) if w is not None)
    if nodes_changed:
        for reg in (before, after):
            touched.update(
                (w.namespace, w.service) for w in reg.workloads.values() if w.node in nodes_changed
            )
    return touched


def changes_since(
    log: Sequence[Change], floor: int, since: int, node: str, revision: int
) -> list[dict[str, Any]] | None:
    """`node`'s slice changes after revision `since`, oldest first, one per key (the
    last wins), or None when a full slice must be sent instead: `since` is older than
    the log keeps (`floor` = the newest revision no longer in `log`), newer than the
    current `revision`, or the node's own record or the trust bundle changed."""
    if since < floor or since > revision:
        return None
    latest: dict[tuple[str, str], Change] = {}
    for change in log:
        if change.revision <= since or not change.concerns(node):
            continue
        if change.kind in ("ca", "revoked") or (change.kind == "node" and change.key == node):
            return None
        latest.pop((change.kind, change.key), None)
        latest[(change.kind, change.key)] = change  # re-insert: order by last change
    return [c.wire() for c in latest.values() if c.kind in ("workload", "service", "resource")]
