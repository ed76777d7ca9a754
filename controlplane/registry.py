"""What the control plane knows, as an indexed in-memory model, and the changes
that take every node's slice from one revision to the next.

Pure: no I/O, no clocks. A :class:`Registry` holds nodes, workloads, services (with
their VIPs), policy resources, identity grants and revocations, and keeps indexes
(workloads by node and by service, nodes by zone, grants by node and by zone, the
free VIPs, every service's endpoints as nodes see them). So a write costs what it
changes, not the size of the mesh: nothing here scans the whole registry except a
load and a grant change naming a whole zone.

Every change runs in :meth:`Registry.run`, which records the first value of each row
it touches and, at the end, derives the change-log entries from what really
changed (so every way of changing the registry produces the same, correct log) and
the rows the store must write. A replica, or the API's read-side copy, follows the
log with :meth:`Registry.follow`: it applies the logged rows and derives the same
endpoints, so both sides agree without reading the whole store.

Keys in the change log (what a node receives in ``changes[].key``):

- workload: ``<name>`` (workload names are unique per node; only the owning node
  sees the change),
- service: ``<namespace>/<name>`` (a whole service document: sent when a service
  appears or goes, or its VIP or port changes),
- endpoint: ``<namespace>/<service>/<node>/<workload>`` (one endpoint of a service
  added, changed or removed; the node updates that one entry),
- resource: ``<kind>/<namespace>/<name>``.

Internal kinds never reach a node as changes: ``node`` (this node's own record
changed; that node gets a full slice), ``grant`` (the control plane's identity
grants; they reach nodes only as endpoint changes), ``zone`` (multi-zone state kept
as internal resources, below; a zone's remote entries reach nodes as service
changes), ``revoked`` and ``ca`` (both make every node take a full slice).

Multi-zone (docs/multizone.md) keeps its state as resources of internal kinds, so
the change log, the store and every replica carry it like any other row:

- ``Zone`` (at the global control plane): one per enrolled zone, with the last
  :class:`~meshnode.core.contracts.zone.ZoneState` it published;
- ``RemoteZone`` (at a zone control plane): another zone's state, as the global
  sent it. Its services become remote entries of this zone's service documents
  (a service only another zone runs gets a VIP here too);
- ``ZoneSync`` (at a zone control plane): where its sync with the global stands.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshnode.core import constants
from meshnode.core import contracts as wire
from meshnode.core.contracts import ContractError, NodeDoc, NodeSlice, ServiceDoc, WorkloadDoc
from meshnode.core.contracts.documents import RemoteZoneDoc
from meshnode.core.contracts.zone import ZoneService, ZoneState
from meshnode.core.errors import MeshnodeError
from meshnode.core.resources import DEFAULT_NAMESPACE, IdentityGrant, resource_from_dict

from . import grants as grant_rules

__all__ = [
    "VIP_NETWORK",
    "Change",
    "GrantIndex",
    "INTERNAL_KINDS",
    "REMOTE_ZONE_KIND",
    "NodeRecord",
    "Registry",
    "RegistryError",
    "RevokedRecord",
    "RowChanges",
    "ServiceRecord",
    "WorkloadRecord",
    "allocate_vip",
    "resource_key",
    "workload_from_request",
    "ZONE_KIND",
    "ZONE_SYNC_KIND",
    "internal_doc",
]

T = TypeVar("T")
VIP_NETWORK = ipaddress.IPv4Network(constants.VIP_NETWORK)
CA_BACKDATE = 60.0  # seconds; ca.CLOCK_SKEW (tests/unit/controlplane checks they agree)
# How many workloads one node may register; a node cannot fill every node's
# destination map by registering without end (`controlplane run` can change it).
DEFAULT_MAX_WORKLOADS_PER_NODE = 256
GRANT_KIND = IdentityGrant.kind
# Multi-zone state, as resources no node and no `meshnode get` sees (module docstring).
ZONE_KIND = "Zone"
REMOTE_ZONE_KIND = "RemoteZone"
ZONE_SYNC_KIND = "ZoneSync"
INTERNAL_KINDS = frozenset({ZONE_KIND, REMOTE_ZONE_KIND, ZONE_SYNC_KIND})
# Distinct node views whose encodings are kept at once (most nodes share a few).
MAX_CACHED_VIEWS = 64
# Change kinds a node receives; the others are the control plane's own.
NODE_KINDS = frozenset({"workload", "service", "endpoint", "resource"})

ServiceKey = tuple[str, str]  # (namespace, name)
WorkloadKey = tuple[str, str]  # (node, name)
ResourceKey = tuple[str, str, str]  # (kind, namespace, name)


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

    @property
    def service_key(self) -> ServiceKey | None:
        return (self.namespace, self.service) if self.service else None


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    vip: str
    port: int  # the service port: the port of the workload that created the service


@dataclass(frozen=True, slots=True)
class RevokedRecord:
    """A deleted node's certificates issued before `issued_before` are refused
    mesh-wide; the record is dropped after `until` (when the last of them expired)."""

    node: str
    issued_before: float
    until: float


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry. `nodes` None = every node's slice is affected;
    ``()`` = no node's (the control plane's own rows)."""

    revision: int
    op: str  # "put" | "delete"
    kind: str  # NODE_KINDS | "node" | "grant" | "revoked" | "ca"
    key: str
    value: Any
    nodes: tuple[str, ...] | None

    def concerns(self, node: str) -> bool:
        return self.nodes is None or node in self.nodes

    def wire(self) -> dict[str, Any]:
        """The entry in a node's ``changes`` (meshnode.core.contracts.SliceChange);
        `value` was made by that contract's ``to_json``."""
        out: dict[str, Any] = {"op": self.op, "kind": self.kind, "key": self.key}
        if self.op == "put":
            out["value"] = self.value
        return out


@dataclass(slots=True)
class RowChanges:
    """The rows one :meth:`Registry.run` changed: key -> new value (None: deleted)."""

    nodes: dict[str, NodeRecord | None] = field(default_factory=dict)
    workloads: dict[WorkloadKey, WorkloadRecord | None] = field(default_factory=dict)
    services: dict[ServiceKey, ServiceRecord | None] = field(default_factory=dict)
    resources: dict[ResourceKey, dict[str, Any] | None] = field(default_factory=dict)
    revoked: dict[str, RevokedRecord | None] = field(default_factory=dict)


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


def resource_key(doc: Mapping[str, Any]) -> ResourceKey:
    meta = doc.get("metadata", {})
    return (str(doc["kind"]), str(meta.get("namespace", "default")), str(meta["name"]))


# --- VIPs ---------------------------------------------------------------------------

_VIP_FIRST = int(VIP_NETWORK.network_address) + 1
_VIP_LAST = int(VIP_NETWORK.broadcast_address) - 1


def allocate_vip(used: Iterable[str]) -> str:
    """The lowest free address of 240.0.0.0/4, skipping the network address."""
    pool = _VipPool()
    for vip in used:
        pool.take(int(ipaddress.IPv4Address(vip)))
    return str(ipaddress.IPv4Address(pool.lowest_free()))


class _VipPool:
    """The VIPs in use, and the lowest free one in O(log n): every free address
    below `fresh` sits in `free` (a heap, with stale entries skipped lazily)."""

    def __init__(self) -> None:
        self.used: set[int] = set()
        self.free: list[int] = []
        self.fresh = _VIP_FIRST

    def take(self, vip: int) -> None:
        self.used.add(vip)
        while self.fresh <= vip:  # addresses skipped over become free ones
            if self.fresh not in self.used:
                heapq.heappush(self.free, self.fresh)
            self.fresh += 1

    def release(self, vip: int) -> None:
        self.used.discard(vip)
        if vip < self.fresh:
            heapq.heappush(self.free, vip)

    def lowest_free(self) -> int:
        while self.free and self.free[0] in self.used:
            heapq.heappop(self.free)
        candidate = self.free[0] if self.free else self.fresh
        if candidate > _VIP_LAST:
            raise RegistryError("no free VIP left in 240.0.0.0/4", status=507)
        return candidate


# --- grants -------------------------------------------------------------------------


class GrantIndex:
    """Identity grants by name, and which of them name each node and each zone, so
    a decision reads only the grants that can cover the node."""

    def __init__(self) -> None:
        self.grants: dict[str, IdentityGrant] = {}
        self._by_node: dict[str, set[str]] = {}
        self._by_zone: dict[str, set[str]] = {}

    def put(self, grant: IdentityGrant | None, name: str) -> None:
        old = self.grants.pop(name, None)
        if old is not None:
            for node in old.nodes:
                self._by_node[node].discard(name)
            for zone in old.zones:
                self._by_zone[zone].discard(name)
        if grant is not None:
            self.grants[name] = grant
            for node in grant.nodes:
                self._by_node.setdefault(node, set()).add(name)
            for zone in grant.zones:
                self._by_zone.setdefault(zone, set()).add(name)

    def decide(self, node: str, zone: str, namespace: str, account: str) -> grant_rules.Decision:
        names = set(self._by_node.get(node, ()))
        if zone:
            names |= self._by_zone.get(zone, set())
        return grant_rules.decide((self.grants[n] for n in names), node, zone, namespace, account)


# --- the model ----------------------------------------------------------------------


@dataclass(slots=True)
class _Txn:
    """What one run touched: each row's value before it, and the endpoints to
    derive again."""

    revision: int
    nodes: dict[str, NodeRecord | None] = field(default_factory=dict)
    workloads: dict[WorkloadKey, WorkloadRecord | None] = field(default_factory=dict)
    services: dict[ServiceKey, ServiceRecord | None] = field(default_factory=dict)
    resources: dict[ResourceKey, dict[str, Any] | None] = field(default_factory=dict)
    revoked: dict[str, RevokedRecord | None] = field(default_factory=dict)
    endpoints: set[tuple[ServiceKey, WorkloadKey]] = field(default_factory=set)
    endpoint_nodes: set[str] = field(default_factory=set)  # every workload on them
    endpoint_zones: set[str] = field(default_factory=set)  # every workload in them
    views: dict[str, frozenset[str]] = field(default_factory=dict)  # node -> namespaces
    remote: set[ServiceKey] = field(default_factory=set)  # services whose remote entries changed

    def touched(self) -> bool:
        return bool(self.nodes or self.workloads or self.services or self.resources or self.revoked)


class Registry:
    """The control plane's registry: rows plus indexes, changed only inside
    :meth:`run` (or :meth:`follow`)."""

    def __init__(self) -> None:
        self.revision = 0
        self.nodes: dict[str, NodeRecord] = {}
        self.workloads: dict[WorkloadKey, WorkloadRecord] = {}
        self.services: dict[ServiceKey, ServiceRecord] = {}
        # (kind, namespace, name) -> resource document (resources.py JSON form)
        self.resources: dict[ResourceKey, dict[str, Any]] = {}
        # deleted node -> its revocation, kept while a certificate issued before it may live
        self.revoked: dict[str, RevokedRecord] = {}
        self.grants = GrantIndex()
        self.last_rows = RowChanges()  # the rows the last run changed (the store writes them)
        self._by_node: dict[str, dict[str, WorkloadRecord]] = {}
        # node -> namespace -> how many of its workloads are in it (its view, below)
        self._namespaces: dict[str, dict[str, int]] = {}
        # node -> the revision its set of namespaces last changed
        self.view_changed: dict[str, int] = {}
        self._by_zone: dict[str, set[str]] = {}
        self._members: dict[ServiceKey, set[WorkloadKey]] = {}
        self._endpoints: dict[ServiceKey, dict[WorkloadKey, wire.EndpointDoc]] = {}
        # service -> zone -> its remote entry (from RemoteZone resources)
        self._remote: dict[ServiceKey, dict[str, RemoteZoneDoc]] = {}
        self._vips = _VipPool()
        self._txn: _Txn | None = None
        self._broken = False
        # Encodings, made once and shared by every node's answer until they change.
        self._service_json: dict[ServiceKey, bytes] = {}
        self._services_blob: bytes | None = None
        self._scoped_blobs: dict[frozenset[str], bytes] = {}
        self._resources_blob: bytes | None = None

    # -- runs ------------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        """A run failed half-way: the model no longer matches the store; load it again."""
        return self._broken

    def run(self, revision: int, fn: Callable[[Registry], T]) -> tuple[list[Change], T]:
        """Apply `fn` (which calls the mutation methods) as revision `revision`; the
        change-log entries and (in `last_rows`) the rows it changed. If `fn` raises
        after it changed anything, the registry is :attr:`broken`."""
        self._begin(revision)
        try:
            result = fn(self)
            changes = self._commit()
        except BaseException:
            assert self._txn is not None
            if self._txn.touched():
                self._broken = True
            raise
        finally:
            self._txn = None
        self.revision = revision
        return changes, result

    def follow(self, changes: Sequence[Change], revision: int) -> None:
        """Apply logged changes made by another registry (the store's writer, or
        another replica) up to `revision`: set the rows they carry, derive the rest."""

        def apply(reg: Registry) -> None:
            for c in changes:
                reg._follow_one(c)

        self.run(revision, apply)

    def _follow_one(self, c: Change) -> None:
        put = c.op == "put"
        if c.kind == "node":
            self._set_node(c.key, NodeRecord(**c.value) if put else None)
        elif c.kind == "workload":
            assert c.nodes is not None and len(c.nodes) == 1
            node = c.nodes[0]
            self._set_workload((node, c.key), WorkloadRecord(node=node, **c.value) if put else None)
        elif c.kind == "service":
            ns, name = c.key.split("/", 1)
            record = None
            if put:
                record = ServiceRecord(ns, name, c.value["vip"], int(c.value["ports"][0]["port"]))
            self._set_service((ns, name), record)
        elif c.kind in ("resource", "grant", "zone"):
            kind, ns, name = c.key.split("/", 2)
            self._set_resource((kind, ns, name), c.value if put else None)
        elif c.kind == "revoked":
            new = {
                r["node"]: RevokedRecord(r["node"], r["issued_before"], r["until"]) for r in c.value
            }
            for name in set(self.revoked) | set(new):
                self._set_revoked(name, new.get(name))
        # "endpoint" entries are derived again here; "ca" is not in the registry.

    @classmethod
    def load(
        cls,
        revision: int,
        nodes: Iterable[NodeRecord],
        workloads: Iterable[WorkloadRecord],
        services: Iterable[ServiceRecord],
        resources: Iterable[dict[str, Any]],
        revoked: Iterable[RevokedRecord],
    ) -> Registry:
        """A registry from stored rows."""
        reg = cls()

        def fill(r: Registry) -> None:
            for n in nodes:
                r._set_node(n.name, n)
            for s in services:
                r._set_service((s.namespace, s.name), s)
            for w in workloads:
                r._set_workload((w.node, w.name), w)
            for doc in resources:
                r._set_resource(resource_key(doc), doc)
            for rv in revoked:
                r._set_revoked(rv.node, rv)

        reg.run(revision, fill)
        reg.last_rows = RowChanges()
        return reg

    def _begin(self, revision: int) -> None:
        if self._broken:
            raise RegistryError("the registry must be loaded again after a failed change", 500)
        if self._txn is not None:
            raise RegistryError("a change is already in progress", 500)
        self._txn = _Txn(revision)

    def _t(self) -> _Txn:
        if self._txn is None:
            raise RegistryError("registry changes run inside Registry.run", 500)
        return self._txn

    # -- primitive row setters: keep every index, remember the first value -------------

    def _set_node(self, name: str, rec: NodeRecord | None) -> None:
        t = self._t()
        old = self.nodes.get(name)
        t.nodes.setdefault(name, old)
        if old is not None and old.zone:
            self._by_zone[old.zone].discard(name)
        if rec is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = rec
            if rec.zone:
                self._by_zone.setdefault(rec.zone, set()).add(name)
        t.endpoint_nodes.add(name)

    def _set_workload(self, key: WorkloadKey, rec: WorkloadRecord | None) -> None:
        t = self._t()
        old = self.workloads.get(key)
        t.workloads.setdefault(key, old)
        if old is not None:
            self._by_node[old.node].pop(old.name, None)
            self._count_namespace(old.node, old.namespace, -1)
            if old.service_key is not None:
                self._members[old.service_key].discard(key)
                t.endpoints.add((old.service_key, key))
        if rec is None:
            self.workloads.pop(key, None)
        else:
            self.workloads[key] = rec
            self._by_node.setdefault(rec.node, {})[rec.name] = rec
            self._count_namespace(rec.node, rec.namespace, +1)
            if rec.service_key is not None:
                self._members.setdefault(rec.service_key, set()).add(key)
                t.endpoints.add((rec.service_key, key))

    def _count_namespace(self, node: str, namespace: str, delta: int) -> None:
        counts = self._namespaces.setdefault(node, {})
        self._t().views.setdefault(node, frozenset(counts))
        count = counts.get(namespace, 0) + delta
        if count > 0:
            counts[namespace] = count
        else:
            counts.pop(namespace, None)

    def _set_service(self, key: ServiceKey, rec: ServiceRecord | None) -> None:
        t = self._t()
        old = self.services.get(key)
        t.services.setdefault(key, old)
        if old is not None:
            self._vips.release(int(ipaddress.IPv4Address(old.vip)))
        if rec is None:
            self.services.pop(key, None)
        else:
            self.services[key] = rec
            self._vips.take(int(ipaddress.IPv4Address(rec.vip)))

    def _set_resource(self, key: ResourceKey, doc: dict[str, Any] | None) -> None:
        t = self._t()
        old = self.resources.get(key)
        t.resources.setdefault(key, old)
        if doc is None:
            self.resources.pop(key, None)
        else:
            self.resources[key] = doc
        if key[0] == GRANT_KIND:
            for g in (old, doc):  # whatever the grant named, before or after, is touched
                if g is not None:
                    grant = IdentityGrant.from_dict(g)
                    t.endpoint_nodes.update(grant.nodes)
                    t.endpoint_zones.update(grant.zones)
            self.grants.put(IdentityGrant.from_dict(doc) if doc is not None else None, key[2])
        elif key[0] == REMOTE_ZONE_KIND:
            # Only the services whose entry of this zone changed are sent again: one
            # endpoint more in a zone of 10,000 services sends one document, not all.
            zone, before, after = key[2], _remote_entries(old), _remote_entries(doc)
            for skey in before.keys() - after.keys():
                self._remote[skey].pop(zone, None)
                if not self._remote[skey]:
                    del self._remote[skey]
            for skey, entry in after.items():
                self._remote.setdefault(skey, {})[zone] = entry
            changed = before.keys() | after.keys()
            t.remote.update(k for k in changed if before.get(k) != after.get(k))

    def _set_revoked(self, name: str, rec: RevokedRecord | None) -> None:
        t = self._t()
        t.revoked.setdefault(name, self.revoked.get(name))
        if rec is None:
            self.revoked.pop(name, None)
        else:
            self.revoked[name] = rec

    # -- mutations (each checks before it changes anything) ------------------------------

    def put_node(self, node: NodeRecord) -> None:
        check_label(node.name, "node name")
        if node.zone:
            check_label(node.zone, "zone")
        check_ip(node.ip, "ip")
        self._set_node(node.name, node)

    def delete_node(self, name: str, now: float | None = None, cert_ttl: float = 0.0) -> None:
        """Forget a node and its workloads (services left empty go with them). With
        `now`, its certificates issued until now are revoked mesh-wide for `cert_ttl`
        (every node closes tunnels resting on one), and expired revocations go."""
        if name not in self.nodes:
            raise RegistryError(f"node {name!r} is not registered", status=404)
        for wl in list(self._by_node.get(name, {}).values()):
            self._remove_workload(wl)
        self._set_node(name, None)
        if now is not None:
            for old in [r for r in self.revoked.values() if r.until < now]:
                self._set_revoked(old.node, None)
            # The CA backdates notBefore by its clock skew: a certificate issued at t
            # has notBefore t - skew, so "issued before now" is "notBefore < now - skew".
            self._set_revoked(
                name, RevokedRecord(name, now - CA_BACKDATE, now + cert_ttl + CA_BACKDATE)
            )

    def put_workload(self, wl: WorkloadRecord) -> None:
        """Register or update a workload; a new (namespace, service) gets the lowest free VIP."""
        if wl.node not in self.nodes:
            raise RegistryError(f"node {wl.node!r} is not registered", status=404)
        key = wl.service_key
        vip = None
        if key is not None and key not in self.services:
            vip = str(ipaddress.IPv4Address(self._vips.lowest_free()))  # may raise: first
        old = self.workloads.get((wl.node, wl.name))
        self._set_workload((wl.node, wl.name), wl)
        if key is not None and vip is not None:
            self._set_service(key, ServiceRecord(wl.namespace, wl.service, vip, wl.port))
        if old is not None:
            self._prune(old.service_key)

    def delete_workload(self, node: str, name: str) -> None:
        wl = self.workloads.get((node, name))
        if wl is None:
            raise RegistryError(f"no workload {name!r} is registered on node {node!r}", status=404)
        self._remove_workload(wl)

    def _remove_workload(self, wl: WorkloadRecord) -> None:
        self._set_workload((wl.node, wl.name), None)
        self._prune(wl.service_key)

    def _prune(self, key: ServiceKey | None) -> None:
        """A service exists while a workload names it or another zone runs it; then
        its VIP is free again."""
        if (
            key is not None
            and key in self.services
            and not self._members.get(key)
            and not self._remote.get(key)
        ):
            self._set_service(key, None)

    # -- multi-zone ------------------------------------------------------------------------

    def set_remote_zones(self, states: Sequence[ZoneState], synced: dict[str, Any]) -> None:
        """A zone control plane takes the other zones' states from the global: each
        becomes a ``RemoteZone`` row (gone ones are deleted), a service only they
        run gets a VIP here, one no zone runs any more goes. `synced` is the
        ``ZoneSync`` row's new spec."""
        wanted = {s.zone: internal_doc(REMOTE_ZONE_KIND, s.zone, s.to_json()) for s in states}
        current = {k[2] for k in self.resources if k[0] == REMOTE_ZONE_KIND}
        before = {k for zone in current for k in _remote_entries(self._remote_doc(zone))}
        for zone in sorted(current - set(wanted)):
            self._set_resource((REMOTE_ZONE_KIND, DEFAULT_NAMESPACE, zone), None)
        for zone, doc in sorted(wanted.items()):
            key = (REMOTE_ZONE_KIND, DEFAULT_NAMESPACE, zone)
            if self.resources.get(key) != doc:
                self._set_resource(key, doc)
        for skey in sorted(self._remote):
            if skey not in self.services:
                entry = min(self._remote[skey].values(), key=lambda e: e.zone)
                vip = str(ipaddress.IPv4Address(self._vips.lowest_free()))
                self._set_service(skey, ServiceRecord(skey[0], skey[1], vip, entry.port))
        for skey in sorted(before - set(self._remote)):
            self._prune(skey)
        self.put_internal(ZONE_SYNC_KIND, "global", synced)

    def apply_global(
        self, docs: Sequence[dict[str, Any]], zones: Sequence[ZoneState], synced: dict[str, Any]
    ) -> None:
        """(Zone) Take the global control plane's configuration: its resources
        replace this zone's (except the grants of this zone's own join tokens, which
        name its nodes), and the other `zones` become remote entries."""
        wanted = {resource_key(doc): doc for doc in docs}
        for key in wanted:  # checked before anything changes
            if key[0] in INTERNAL_KINDS:
                raise RegistryError(f"the global sent an internal row {'/'.join(key)}")
        for key in sorted(self.resources):
            local = key[0] == GRANT_KIND and key[2].startswith(grant_rules.TOKEN_GRANT_PREFIX)
            if key[0] not in INTERNAL_KINDS and not local and key not in wanted:
                self._set_resource(key, None)
        for key, doc in sorted(wanted.items()):
            if self.resources.get(key) != doc:
                self._set_resource(key, doc)
        self.set_remote_zones(zones, synced)

    def put_internal(self, kind: str, name: str, spec: dict[str, Any] | None) -> None:
        """Set (None: delete) the internal row `kind`/`name`, when it differs."""
        key = (kind, DEFAULT_NAMESPACE, name)
        doc = internal_doc(kind, name, spec) if spec is not None else None
        if self.resources.get(key) != doc:
            self._set_resource(key, doc)

    def internal(self, kind: str) -> dict[str, dict[str, Any]]:
        """The internal rows of `kind`: name -> spec."""
        return {k[2]: d["spec"] for k, d in sorted(self.resources.items()) if k[0] == kind}

    def _remote_doc(self, zone: str) -> dict[str, Any] | None:
        return self.resources.get((REMOTE_ZONE_KIND, DEFAULT_NAMESPACE, zone))

    def enroll_zone(self, zone: str, now: float, intermediate: str, keep: int = 2) -> None:
        """(Global) Zone `zone` enrolled with the `intermediate` CA (PEM) issued to
        it: from now on its control plane is known by a certificate that
        intermediate signed, and may publish its state. Enrolling again (a new zone
        control plane) keeps the state published and the `keep` - 1 intermediates
        before."""
        check_label(zone, "zone")
        spec = dict(self.internal(ZONE_KIND).get(zone) or {"state": None})
        spec["enrolled_at"] = now
        self.put_internal(ZONE_KIND, zone, spec)
        self.add_zone_intermediate(zone, intermediate, keep)

    def add_zone_intermediate(self, zone: str, intermediate: str, keep: int = 2) -> None:
        """(Global) A new intermediate issued to enrolled zone `zone` (after a root
        rotation); its last `keep` are kept, newest last."""
        spec = self.internal(ZONE_KIND).get(zone)
        if spec is None:
            raise RegistryError(f"zone {zone!r} is not enrolled", status=403)
        kept = [*spec.get("intermediates", []), intermediate][-max(keep, 1) :]
        self.put_internal(ZONE_KIND, zone, {**spec, "intermediates": kept})

    def put_zone_state(self, state: ZoneState, now: float) -> int:
        """(Global) Keep what zone `state.zone` published, unless the state kept is
        of a newer generation; the generation kept. What other zones get of it is
        decided when they read it (:meth:`zone_states`), so a grant change applies
        to what was published before it."""
        spec = self.internal(ZONE_KIND).get(state.zone)
        if spec is None:
            raise RegistryError(f"zone {state.zone!r} is not enrolled", status=403)
        # Generations compare only within one enrollment: a zone enrolled again (a new
        # control plane, a new database) counts from 0 again.
        kept = spec.get("state") if spec.get("state_enrolled_at") == spec["enrolled_at"] else None
        if kept is not None and kept["generation"] > state.generation:
            return int(kept["generation"])
        if kept is not None and {**kept, "generation": state.generation} == state.to_json():
            return state.generation  # the same services again: nothing to write or send
        self.put_internal(
            ZONE_KIND,
            state.zone,
            {
                **spec,
                "state": state.to_json(),
                "state_enrolled_at": spec["enrolled_at"],
                "received_at": now,
            },
        )
        return state.generation

    def zone_states(self) -> dict[str, tuple[ZoneState, list[str]]]:
        """(Global) By zone: the state it last published, with only the services
        whose identity an IdentityGrant gives the zone (a zone cannot publish
        endpoints of a namespace or service account it was not granted), and what
        was left out and why. A zone that published nothing yet is left out."""
        out = {}
        for zone, spec in self.internal(ZONE_KIND).items():
            if not spec.get("state"):
                continue
            state = ZoneState.from_json(spec["state"], f"Zone/{zone}")
            services, refused = [], []
            for s in state.services:
                if self.grants.decide("", zone, s.namespace, s.service_account).allowed:
                    services.append(s)
                else:
                    refused.append(
                        f"{s.namespace}/{s.name}: zone {zone} is not granted identity "
                        f"{s.namespace}/{s.service_account}; at the global control plane, "
                        f"`meshnode apply` an IdentityGrant with zones: [{zone}] and that "
                        "identity"
                    )
            allowed = ZoneState(
                zone, state.generation, state.ingress_ip, state.ingress_port, tuple(services)
            )
            out[zone] = (allowed, refused)
        return out

    def zone_services(self) -> tuple[ZoneService, ...]:
        """What this zone publishes to the others: each service with endpoints here,
        under the one identity its endpoints prove across zones (the least by name,
        as the destination node proxy picks it: ztunnel/tls.py zone_identities) and
        how many endpoints have it."""
        out = []
        for skey in sorted(self._endpoints):
            eps = self._endpoints[skey]
            svc = self.services.get(skey)
            if not eps or svc is None:
                continue
            account = min(e.service_account for e in eps.values())
            count = sum(1 for e in eps.values() if e.service_account == account)
            out.append(ZoneService(skey[0], skey[1], svc.port, account, count))
        return tuple(out)

    def register_workload(
        self, wl: WorkloadRecord, limit: int = DEFAULT_MAX_WORKLOADS_PER_NODE
    ) -> None:
        """:meth:`put_workload` for a node's own request: refused (403) unless the node
        is granted the workload's identity, and (429) past the per-node workload limit."""
        if wl.node not in self.nodes:
            raise RegistryError(f"node {wl.node!r} is not registered", status=404)
        decision = self.granted(wl.node, wl.namespace, wl.service_account)
        if not decision.allowed:
            raise RegistryError(f"workload {wl.name}: {decision.message}", status=403)
        mine = self._by_node.get(wl.node, {})
        others = len(mine) - (1 if wl.name in mine else 0)
        if others >= limit:
            raise RegistryError(
                f"workload {wl.name}: node {wl.node} already has {others} workloads, the limit "
                "per node; remove one (meshnode workload rm) or raise the limit "
                "(meshnode controlplane run --max-workloads-per-node)",
                status=429,
            )
        self.put_workload(wl)

    def set_token_grant(self, node: str, identities: Sequence[str]) -> None:
        """The grant a node's join token gives it (``token-<node>``): replaced at each
        enrollment, removed when the token named no identity."""
        grant = grant_rules.token_grant(node, identities)
        key = (GRANT_KIND, DEFAULT_NAMESPACE, f"{grant_rules.TOKEN_GRANT_PREFIX}{node}")
        doc = grant.to_dict() if grant is not None else None
        if self.resources.get(key) != doc:
            self._set_resource(key, doc)

    def apply_resources(self, docs: Sequence[dict[str, Any]]) -> list[str]:
        """Put validated resource documents; results like ``AuthorizationPolicy/x created``."""
        results = []
        for doc in docs:
            key = resource_key(doc)
            old = self.resources.get(key)
            verb = "created" if old is None else ("unchanged" if old == doc else "configured")
            if old != doc:
                self._set_resource(key, doc)
            results.append(f"{key[0]}/{key[2]} {verb}")
        return results

    def delete_resource(self, kind: str, namespace: str, name: str) -> None:
        key = (kind, namespace, name)
        if key not in self.resources or kind in INTERNAL_KINDS:
            raise RegistryError(f"{kind} {namespace}/{name} not found", status=404)
        self._set_resource(key, None)

    # -- questions ---------------------------------------------------------------------

    def granted(self, node: str, namespace: str, account: str) -> grant_rules.Decision:
        """May `node` host ``<namespace>/<account>``, by the grants (see grants.py)?"""
        record = self.nodes.get(node)
        zone = record.zone if record is not None else ""
        return self.grants.decide(node, zone, namespace, account)

    def hosts(self, node: str, namespace: str, account: str) -> bool:
        """Does `node` host a workload with identity ``<namespace>/<account>``?"""
        return any(
            w.namespace == namespace and w.service_account == account
            for w in self._by_node.get(node, {}).values()
        )

    def views_changed_in(self, changes: Iterable[Change]) -> None:
        """After a load: when each node's view may have changed, as far as the
        logged `changes` tell (a load knows the views, not when they changed). A
        node's view changes only with its workloads, so the revision of its last
        logged workload change is a safe stand-in: a node that asks from before it
        gets a full slice, the others go on with changes."""
        self.view_changed = {}
        for c in changes:
            if c.kind == "workload":
                for node in c.nodes or ():
                    self.view_changed[node] = max(self.view_changed.get(node, 0), c.revision)

    def view(self, node: str, shared: Iterable[str] = ()) -> frozenset[str]:
        """The namespaces whose services `node` sees when nodes see only their own
        namespaces (``controlplane run --node-view namespace``): those of its
        workloads, and the `shared` ones every node sees."""
        return frozenset(self._namespaces.get(node, {})) | frozenset(shared)

    def workloads_of(self, node: str) -> list[WorkloadRecord]:
        return [w for _, w in sorted(self._by_node.get(node, {}).items())]

    def service_doc(self, key: ServiceKey) -> ServiceDoc:
        svc = self.services[key]
        endpoints = self._endpoints.get(key, {})
        return ServiceDoc(
            name=svc.name,
            namespace=svc.namespace,
            vip=svc.vip,
            ports=(wire.ServicePort(svc.port, svc.port),),
            endpoints=tuple(endpoints[k] for k in sorted(endpoints)),
            remote=tuple(entry for _, entry in sorted(self._remote.get(key, {}).items())),
        )

    def service_docs(self) -> dict[ServiceKey, ServiceDoc]:
        """Every service document nodes receive, by key."""
        return {key: self.service_doc(key) for key in sorted(self.services)}

    def service_json(self, key: ServiceKey) -> bytes:
        """The service's document as compact JSON, encoded once until it changes."""
        out = self._service_json.get(key)
        if out is None:
            out = self._service_json[key] = _dumps(self.service_doc(key).to_json())
        return out

    def rows(self) -> tuple[Any, ...]:
        """The stored rows, comparable (tests compare two registries by them)."""
        return (
            dict(self.nodes),
            dict(self.workloads),
            dict(self.services),
            dict(self.resources),
            dict(self.revoked),
        )

    # -- what nodes see ----------------------------------------------------------------

    def slice_for(
        self,
        node: str,
        revision: int,
        trust_domain: str,
        trust_bundle: str | None = None,
        view: frozenset[str] | None = None,
    ) -> NodeSlice:
        """The full slice for `node` (which must be registered), as a contract value;
        with `view`, only the services of those namespaces."""
        return NodeSlice(
            revision=revision,
            node=self.nodes[node].doc(),
            trust_domain=trust_domain,
            workloads=tuple(w.doc() for w in self.workloads_of(node)),
            services=tuple(
                doc for key, doc in self.service_docs().items() if view is None or key[0] in view
            ),
            resources=tuple(resource_from_dict(doc) for _, doc in self._node_resources()),
            trust_bundle=trust_bundle,
            revoked=self._revocations(),
        )

    def slice_json(
        self,
        node: str,
        revision: int,
        trust_domain: str,
        trust_bundle: str | None = None,
        view: frozenset[str] | None = None,
    ) -> bytes:
        """:meth:`slice_for`'s JSON: what ``GET /v1/node/config`` sends. Equal to
        ``slice_for(...).to_json()``."""
        return b"".join(self.slice_parts(node, revision, trust_domain, trust_bundle, view))

    def slice_parts(
        self,
        node: str,
        revision: int,
        trust_domain: str,
        trust_bundle: str | None = None,
        view: frozenset[str] | None = None,
    ) -> tuple[bytes, ...]:
        """:meth:`slice_json` in pieces, the large ones (the services, the policies)
        the same objects for every node (with the same `view`) until they change: a
        full sync is written from them, never copied per node."""
        services = self._services(view)
        if self._resources_blob is None:
            self._resources_blob = b",".join(_dumps(doc) for _, doc in self._node_resources())
        head: dict[str, Any] = {
            "revision": revision,
            "full": True,
            "node": self.nodes[node].to_dict(),
            "trust_domain": trust_domain,
            "workloads": [w.slice_dict() for w in self.workloads_of(node)],
        }
        if trust_bundle is not None:
            head["trust_bundle"] = trust_bundle
        revoked = self._revocations()
        if revoked:
            head["revoked"] = [r.to_json() for r in revoked]
        return (
            _dumps(head)[:-1] + b',"services":[',
            services,
            b'],"resources":[',
            self._resources_blob,
            b"]}",
        )

    def _services(self, view: frozenset[str] | None) -> bytes:
        """Every service's document (of the `view`'s namespaces), joined, made once
        per change and view."""
        if view is None:
            if self._services_blob is None:
                self._services_blob = b",".join(self.service_json(k) for k in sorted(self.services))
            return self._services_blob
        blob = self._scoped_blobs.get(view)
        if blob is None:
            if len(self._scoped_blobs) >= MAX_CACHED_VIEWS:
                self._scoped_blobs.clear()
            blob = self._scoped_blobs[view] = b",".join(
                self.service_json(k) for k in sorted(self.services) if k[0] in view
            )
        return blob

    def _node_resources(self) -> list[tuple[ResourceKey, dict[str, Any]]]:
        # Grants are for the control plane, not for nodes.
        return [
            (k, d)
            for k, d in sorted(self.resources.items())
            if k[0] != GRANT_KIND and k[0] not in INTERNAL_KINDS
        ]

    def _revocations(self) -> tuple[wire.Revocation, ...]:
        return tuple(
            wire.Revocation(r.node, r.issued_before) for _, r in sorted(self.revoked.items())
        )

    # -- deriving the changes ----------------------------------------------------------

    def _endpoint(self, skey: ServiceKey, wkey: WorkloadKey) -> wire.EndpointDoc | None:
        """What nodes see of workload `wkey` in service `skey` now (None: nothing)."""
        wl = self.workloads.get(wkey)
        svc = self.services.get(skey)
        if wl is None or svc is None or wl.service_key != skey:
            return None
        node = self.nodes.get(wl.node)
        if node is None:
            return None
        # Only a granted registration is an endpoint: a revoked grant takes the
        # workload out of every node's view at once.
        if not self.grants.decide(node.name, node.zone, wl.namespace, wl.service_account).allowed:
            return None
        return wire.EndpointDoc(
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

    def _commit(self) -> list[Change]:
        t = self._t()
        rev = t.revision
        changes: list[Change] = []
        rows = RowChanges()

        def add(op: str, kind: str, key: str, value: Any, nodes: tuple[str, ...] | None) -> None:
            changes.append(Change(rev, op, kind, key, value, nodes))

        for name, old in sorted(t.nodes.items()):
            new = self.nodes.get(name)
            if old != new:
                rows.nodes[name] = new
                value = new.to_dict() if new else None
                add("put" if new else "delete", "node", name, value, (name,))
        for wkey, wold in sorted(t.workloads.items()):
            wnew = self.workloads.get(wkey)
            if wold != wnew:
                rows.workloads[wkey] = wnew
                value = wnew.slice_dict() if wnew else None
                add("put" if wnew else "delete", "workload", wkey[1], value, (wkey[0],))

        # Services that appeared, went or changed their record: whole documents.
        # (A change of another zone's entries sends the whole document too.)
        whole: set[ServiceKey] = set()
        for skey in sorted(set(t.services) | t.remote):
            snew = self.services.get(skey)
            if skey in t.services and t.services[skey] != snew:
                rows.services[skey] = snew
            elif snew is None or skey not in t.remote:
                continue
            whole.add(skey)
            self._invalidate(skey)
            if snew is None:
                self._endpoints.pop(skey, None)
                add("delete", "service", "/".join(skey), None, None)
                continue
            members = self._members.get(skey, set())
            eps = {w: ep for w in members if (ep := self._endpoint(skey, w)) is not None}
            self._endpoints[skey] = eps
            add("put", "service", "/".join(skey), self.service_doc(skey).to_json(), None)

        # Single endpoints: of the workloads touched, on the nodes touched (address,
        # zone, grants) and in the zones whose grants changed.
        touched = set(t.endpoints)
        for zone in t.endpoint_zones:
            t.endpoint_nodes.update(self._by_zone.get(zone, ()))
        for name in t.endpoint_nodes:
            for wl in self._by_node.get(name, {}).values():
                if wl.service_key is not None:
                    touched.add((wl.service_key, (wl.node, wl.name)))
        for skey, wkey in sorted(touched):
            if skey in whole or skey not in self.services:
                continue
            eps = self._endpoints.setdefault(skey, {})
            old_ep, new_ep = eps.get(wkey), self._endpoint(skey, wkey)
            if old_ep == new_ep:
                continue
            self._invalidate(skey)
            key = f"{skey[0]}/{skey[1]}/{wkey[0]}/{wkey[1]}"
            if new_ep is None:
                del eps[wkey]
                add("delete", "endpoint", key, None, None)
            else:
                eps[wkey] = new_ep
                add("put", "endpoint", key, new_ep.to_json(), None)

        for rkey, rold in sorted(t.resources.items()):
            rnew = self.resources.get(rkey)
            if rold == rnew:
                continue
            rows.resources[rkey] = rnew
            kind = "grant" if rkey[0] == GRANT_KIND else "resource"
            if rkey[0] in INTERNAL_KINDS:
                kind = "zone"
            if kind == "resource":
                self._resources_blob = None
            # A grant concerns no node: they see its effect as endpoint changes.
            nodes = () if kind in ("grant", "zone") else None
            add("put" if rnew else "delete", kind, "/".join(rkey), rnew, nodes)
        revoked_changed = False
        for name, vold in t.revoked.items():
            vnew = self.revoked.get(name)
            if vold != vnew:
                rows.revoked[name] = vnew
                revoked_changed = True
        if revoked_changed:  # rare: every node gets a full slice
            revocations = [
                {"node": r.node, "issued_before": r.issued_before, "until": r.until}
                for _, r in sorted(self.revoked.items())
            ]
            add("put", "revoked", "*", revocations, None)
        for name, before in t.views.items():
            if frozenset(self._namespaces.get(name, {})) != before:
                self.view_changed[name] = rev
        self.last_rows = rows
        return changes

    def _invalidate(self, skey: ServiceKey) -> None:
        self._service_json.pop(skey, None)
        self._services_blob = None
        self._scoped_blobs.clear()


def internal_doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An internal row in the shape of a resource document (so the store keeps it)."""
    return {"kind": kind, "metadata": {"name": name}, "spec": spec}


def _remote_entries(doc: Mapping[str, Any] | None) -> dict[ServiceKey, RemoteZoneDoc]:
    if doc is None:
        return {}
    path = f"RemoteZone/{doc['metadata']['name']}"
    return ZoneState.from_json(doc["spec"], path).remote_entries()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
