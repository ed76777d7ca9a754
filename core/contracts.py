"""The wire contracts between meshnode's components, defined once.

Each contract is a frozen, slotted dataclass with ``to_json()`` (a plain dict
``json.dumps`` takes) and ``from_json(obj)`` (validating). Producer and consumer
both go through these classes, so the two ends cannot drift:

- the control plane's node slice (``GET /v1/node/config``): :class:`NodeSlice`
  (full), :class:`SliceDelta` (incremental, :class:`SliceChange` entries),
  :class:`SliceUnchanged`; read with :func:`parse_slice_answer`. Its parts are
  :class:`NodeDoc`, :class:`WorkloadDoc` and the service document
  :class:`ServiceDoc` (:class:`ServicePort`, :class:`EndpointDoc`);
- the ztunnel snapshot (agent -> ztunnel), :class:`Snapshot`, schema
  ``SNAPSHOT_SCHEMA``, with :class:`SnapshotWorkload` and the same service
  documents;
- the control messages on ztunnel's Unix socket (agent <-> ztunnel), version
  ``CONTROL_PROTOCOL_VERSION``: :class:`SnapshotMessage`, :class:`AddMessage`,
  :class:`DeleteMessage` (:func:`parse_control_message`) and :class:`Ack` /
  :class:`Nack` (:func:`parse_control_reply`).

Validation rules, the same for every contract:

- every field is checked with the validators below (DNS labels, ports, IP
  addresses -- normalised, ``"FD00::1"`` becomes ``"fd00::1"`` -- trust domains
  and SPIFFE IDs via :mod:`meshnode.core.identity`); a :class:`ContractError`
  names the field's path, e.g. ``snapshot.services[0].endpoints[1].port``;
- **unknown fields are refused**: a misspelt field silently ignored would route
  or authorize differently from what its author meant. A new field therefore
  comes with a new ``SNAPSHOT_SCHEMA`` / ``CONTROL_PROTOCOL_VERSION`` (the slice
  travels with the node's release, like the snapshot);
- an optional field may be absent or ``null``; both mean its default.

docs/protocol.md shows an example of each and points here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import IdentityError, SpiffeId, validate_trust_domain
from meshnode.core.resources import (
    AuthorizationPolicy,
    Resource,
    ResourceError,
    resource_from_dict,
)

__all__ = [
    "CONTROL_PROTOCOL_VERSION",
    "SNAPSHOT_SCHEMA",
    "Ack",
    "AddMessage",
    "ContractError",
    "ControlMessage",
    "ControlReply",
    "DeleteMessage",
    "EndpointDoc",
    "Nack",
    "NodeDoc",
    "NodeSlice",
    "ServiceDoc",
    "ServicePort",
    "SliceAnswer",
    "SliceChange",
    "SliceDelta",
    "SliceUnchanged",
    "Snapshot",
    "SnapshotMessage",
    "SnapshotWorkload",
    "WorkloadDoc",
    "check_ip",
    "check_label",
    "check_port",
    "check_version_label",
    "parse_control_message",
    "parse_control_reply",
    "parse_slice_answer",
    "resource_key",
]

SNAPSHOT_SCHEMA = 1
CONTROL_PROTOCOL_VERSION = 1

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_MISSING: Any = object()


class ContractError(MeshnodeError, ValueError):
    """A document does not follow its contract; the message starts with the
    path of the offending field."""


# --- the one set of validators --------------------------------------------------------


def check_label(value: object, path: str) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise ContractError(
            f"{path}: {value!r} is not a DNS label (1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit)"
        )
    return value


def check_version_label(value: object, path: str) -> str:
    """A subset label such as ``v1`` (letters, digits, ``.``, ``_``, ``-``) or ``""``."""
    if value == "":
        return ""
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise ContractError(f"{path}: {value!r} is not a version label like v1")
    return value


def check_port(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ContractError(f"{path}: {value!r} is not a port (an integer 1-65535)")
    return value


def check_ip(value: object, path: str) -> str:
    """The address in its normal form."""
    if not isinstance(value, str):
        raise ContractError(f"{path}: {value!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ContractError(f"{path}: {value!r} is not an IP address") from None


def check_trust_domain(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ContractError(f"{path}: expected str, got {value!r}")
    try:
        validate_trust_domain(value)
    except IdentityError as exc:
        raise ContractError(f"{path}: {exc}") from None
    return value


def check_identity(trust_domain: str, namespace: str, service_account: str, path: str) -> SpiffeId:
    try:
        return SpiffeId(trust_domain, namespace, service_account)
    except IdentityError as exc:
        raise ContractError(f"{path}: {exc}") from None


class _Fields:
    """One JSON object being read: refuses unknown fields, names paths."""

    __slots__ = ("obj", "path")

    def __init__(self, value: object, path: str, known: Collection[str]) -> None:
        if not isinstance(value, dict):
            raise ContractError(f"{path}: expected dict, got {value!r}")
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise ContractError(
                f"{path}: unknown field {unknown[0]!r} (known: {', '.join(known)}); "
                "is the sender a newer meshnode?"
            )
        self.obj: dict[str, Any] = value
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        value = self.obj.get(key)
        if value is None:
            if default is _MISSING:
                raise ContractError(f"{self.path}: missing field {key!r}")
            return default
        return value

    def typed(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise ContractError(f"{self.at(key)}: expected {kind.__name__}, got {value!r}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self.typed(key, str, default)

    def integer(self, key: str, default: Any = _MISSING) -> Any:
        return self.typed(key, int, default)

    def label(self, key: str, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        return value if value == default == "" else check_label(value, self.at(key))

    def port(self, key: str, default: Any = _MISSING) -> int:
        return check_port(self.raw(key, default), self.at(key))

    def ip(self, key: str) -> str:
        return check_ip(self.raw(key), self.at(key))

    def items(self, key: str, default: Any = _MISSING) -> list[tuple[Any, str]]:
        """A list field's entries with their paths."""
        value = self.typed(key, list, default)
        return [(item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]


def _resource(value: object, path: str) -> Resource:
    try:
        return resource_from_dict(value)
    except ResourceError as exc:
        raise ContractError(f"{path}: {exc}") from None


def resource_key(resource: Resource) -> str:
    """The key of a resource in slice changes: ``<kind>/<namespace>/<name>``."""
    return f"{resource.kind}/{resource.namespace}/{resource.name}"


# --- the parts: node, workload, service -------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeDoc:
    """A node as the slice and the snapshot name it."""

    name: str
    ip: str
    zone: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "zone": self.zone, "ip": self.ip}

    @classmethod
    def from_json(cls, obj: object, path: str = "node") -> NodeDoc:
        f = _Fields(obj, path, ("name", "zone", "ip"))
        return cls(name=f.label("name"), ip=f.ip("ip"), zone=f.label("zone", ""))


@dataclass(frozen=True, slots=True)
class WorkloadDoc:
    """A workload of the node, as the control plane's slice lists it."""

    name: str
    namespace: str
    service: str  # "" = in no service
    service_account: str
    port: int
    version: str = ""

    @property
    def key(self) -> str:
        return self.name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "service": self.service,
                "service_account": self.service_account, "port": self.port,
                "version": self.version}  # fmt: skip

    @classmethod
    def from_json(cls, obj: object, path: str = "workload") -> WorkloadDoc:
        f = _Fields(obj, path, ("name", "namespace", "service", "service_account", "port",
                                "version"))  # fmt: skip
        return cls(
            name=f.label("name"), namespace=f.label("namespace"), service=f.label("service", ""),
            service_account=f.label("service_account"), port=f.port("port"),
            version=check_version_label(f.raw("version", ""), f.at("version")),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "target_port": self.target_port}

    @classmethod
    def from_json(cls, obj: object, path: str = "port") -> ServicePort:
        f = _Fields(obj, path, ("port", "target_port"))
        port = f.port("port")
        return cls(port, f.port("target_port", port))  # absent: the same port


@dataclass(frozen=True, slots=True)
class EndpointDoc:
    """One workload behind a service, wherever it runs."""

    workload: str
    namespace: str
    service_account: str
    node: str
    node_ip: str
    address: str
    port: int
    zone: str = ""
    # The service port this endpoint serves; 0 = the one whose target_port is `port`.
    service_port: int = 0
    version: str = ""  # subset label, for traffic splits

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "namespace": self.namespace,
                "service_account": self.service_account, "node": self.node,
                "node_ip": self.node_ip, "address": self.address, "zone": self.zone,
                "port": self.port, "service_port": self.service_port,
                "version": self.version}  # fmt: skip

    @classmethod
    def from_json(cls, obj: object, path: str = "endpoint") -> EndpointDoc:
        f = _Fields(obj, path, ("workload", "namespace", "service_account", "node", "node_ip",
                                "address", "zone", "port", "service_port", "version"))  # fmt: skip
        service_port = f.raw("service_port", 0)
        return cls(
            workload=f.label("workload"), namespace=f.label("namespace"),
            service_account=f.label("service_account"), node=f.label("node"),
            node_ip=f.ip("node_ip"), address=f.ip("address"), port=f.port("port"),
            zone=f.label("zone", ""),
            service_port=0 if service_port == 0 else check_port(service_port,
                                                                f.at("service_port")),
            version=check_version_label(f.raw("version", ""), f.at("version")),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServiceDoc:
    """A service: its VIP, ports and endpoints (and a traffic split, in snapshots)."""

    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[EndpointDoc, ...]
    # Traffic split: (version, weight) pairs; empty = no split, all endpoints.
    split: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "namespace": self.namespace, "vip": self.vip,
            "ports": [p.to_json() for p in self.ports],
            "endpoints": [e.to_json() for e in self.endpoints],
        }  # fmt: skip
        if self.split:
            out["split"] = dict(self.split)
        return out

    @classmethod
    def from_json(cls, obj: object, path: str = "service") -> ServiceDoc:
        f = _Fields(obj, path, ("name", "namespace", "vip", "ports", "endpoints", "split"))
        split_doc = f.typed("split", dict, {})
        split = []
        for version, weight in split_doc.items():
            check_version_label(version, f"{f.at('split')}.{version}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise ContractError(f"{f.at('split')}.{version}: weight must be an integer >= 0")
            split.append((version, weight))
        if split and not sum(w for _, w in split):
            raise ContractError(f"{f.at('split')}: the weights add up to 0")
        return cls(
            name=f.label("name"), namespace=f.label("namespace"), vip=f.ip("vip"),
            ports=tuple(ServicePort.from_json(p, pp) for p, pp in f.items("ports")),
            endpoints=tuple(EndpointDoc.from_json(e, ep) for e, ep in f.items("endpoints")),
            split=tuple(split),
        )  # fmt: skip


# --- the node slice (control plane -> agent) -------------------------------------------

ChangeKind: TypeAlias = Literal["workload", "service", "resource"]


def _value_key(value: WorkloadDoc | ServiceDoc | Resource) -> str:
    if isinstance(value, WorkloadDoc | ServiceDoc):
        return value.key
    return resource_key(value)


@dataclass(frozen=True, slots=True)
class NodeSlice:
    """A node's full slice of the mesh: its own workloads, every service, the
    policy resources. ``trust_bundle`` (PEM) is sent by the control plane."""

    revision: int
    node: NodeDoc
    trust_domain: str
    workloads: tuple[WorkloadDoc, ...] = ()
    services: tuple[ServiceDoc, ...] = ()
    resources: tuple[Resource, ...] = ()
    trust_bundle: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "revision": self.revision, "full": True, "node": self.node.to_json(),
            "trust_domain": self.trust_domain,
            "workloads": [w.to_json() for w in self.workloads],
            "services": [s.to_json() for s in self.services],
            "resources": [r.to_dict() for r in self.resources],
        }  # fmt: skip
        if self.trust_bundle is not None:
            out["trust_bundle"] = self.trust_bundle
        return out

    @classmethod
    def from_json(cls, obj: object, path: str = "slice") -> NodeSlice:
        f = _Fields(obj, path, ("revision", "full", "node", "trust_domain", "workloads",
                                "services", "resources", "trust_bundle"))  # fmt: skip
        if f.raw("full", True) is not True:
            raise ContractError(f"{f.at('full')}: a full slice has full: true")
        return cls(
            revision=_revision(f),
            node=NodeDoc.from_json(f.raw("node"), f.at("node")),
            trust_domain=check_trust_domain(f.raw("trust_domain"), f.at("trust_domain")),
            workloads=tuple(WorkloadDoc.from_json(w, p) for w, p in f.items("workloads", [])),
            services=tuple(ServiceDoc.from_json(s, p) for s, p in f.items("services", [])),
            resources=tuple(_resource(r, p) for r, p in f.items("resources", [])),
            trust_bundle=f.string("trust_bundle", None),
        )  # fmt: skip

    def apply(self, delta: SliceDelta) -> NodeSlice:
        """This slice with `delta`'s changes folded in (a put replaces the item
        with the same key, or adds it; a delete of an absent key is a no-op)."""
        items: dict[str, dict[str, Any]] = {
            "workload": {w.key: w for w in self.workloads},
            "service": {s.key: s for s in self.services},
            "resource": {resource_key(r): r for r in self.resources},
        }
        for change in delta.changes:
            coll = items[change.kind]
            coll.pop(change.key, None)
            if change.value is not None:
                coll[change.key] = change.value
        return replace(
            self, revision=delta.revision,
            workloads=tuple(items["workload"].values()),
            services=tuple(items["service"].values()),
            resources=tuple(items["resource"].values()),
        )  # fmt: skip


def _revision(f: _Fields) -> int:
    revision: int = f.integer("revision")
    if revision < 0:
        raise ContractError(f"{f.at('revision')}: {revision} is negative")
    return revision


@dataclass(frozen=True, slots=True)
class SliceChange:
    """One entry of an incremental slice: ``value`` is set for a put, None for a delete."""

    op: Literal["put", "delete"]
    kind: ChangeKind
    key: str
    value: WorkloadDoc | ServiceDoc | Resource | None = None

    def __post_init__(self) -> None:
        if (self.op == "put") != (self.value is not None):
            raise ContractError(f"a {self.op} change of {self.kind} {self.key!r} "
                                f"{'needs' if self.op == 'put' else 'has no'} a value")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "kind": self.kind, "key": self.key}
        if self.value is not None:
            value = self.value
            out["value"] = (value.to_json() if isinstance(value, WorkloadDoc | ServiceDoc)
                            else value.to_dict())
        return out

    @classmethod
    def from_json(cls, obj: object, path: str = "change") -> SliceChange:
        f = _Fields(obj, path, ("op", "kind", "key", "value"))
        op, kind, key = f.string("op"), f.string("kind"), f.string("key")
        if op not in ("put", "delete"):
            raise ContractError(f"{f.at('op')}: {op!r} is not put or delete")
        if kind not in ("workload", "service", "resource"):
            raise ContractError(f"{f.at('kind')}: {kind!r} is not workload, service or resource")
        if op == "delete":
            if "value" in f.obj:
                raise ContractError(f"{f.at('value')}: a delete carries no value")
            return cls(op, kind, key)
        raw, vpath = f.raw("value"), f.at("value")
        value: WorkloadDoc | ServiceDoc | Resource
        if kind == "workload":
            value = WorkloadDoc.from_json(raw, vpath)
        elif kind == "service":
            value = ServiceDoc.from_json(raw, vpath)
        else:
            value = _resource(raw, vpath)
        if _value_key(value) != key:
            raise ContractError(f"{f.at('key')}: {key!r} is not the key of the value "
                                f"({_value_key(value)!r})")
        return cls(op, kind, key, value)


@dataclass(frozen=True, slots=True)
class SliceDelta:
    """The changes to a node's slice since the revision it asked from."""

    revision: int
    changes: tuple[SliceChange, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "full": False,
                "changes": [c.to_json() for c in self.changes]}

    @classmethod
    def from_json(cls, obj: object, path: str = "slice") -> SliceDelta:
        f = _Fields(obj, path, ("revision", "full", "changes"))
        if f.raw("full") is not False:
            raise ContractError(f"{f.at('full')}: a delta has full: false")
        return cls(_revision(f),
                   tuple(SliceChange.from_json(c, p) for c, p in f.items("changes")))


@dataclass(frozen=True, slots=True)
class SliceUnchanged:
    """The long poll ended without a change."""

    revision: int

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "unchanged": True}

    @classmethod
    def from_json(cls, obj: object, path: str = "slice") -> SliceUnchanged:
        f = _Fields(obj, path, ("revision", "unchanged"))
        if f.raw("unchanged") is not True:
            raise ContractError(f"{f.at('unchanged')}: expected true")
        return cls(_revision(f))


SliceAnswer: TypeAlias = NodeSlice | SliceDelta | SliceUnchanged


def parse_slice_answer(obj: object, path: str = "slice") -> SliceAnswer:
    """An answer of ``GET /v1/node/config``: which of the three it is, validated."""
    if isinstance(obj, dict) and "unchanged" in obj:
        return SliceUnchanged.from_json(obj, path)
    if isinstance(obj, dict) and obj.get("full") is False:
        return SliceDelta.from_json(obj, path)
    return NodeSlice.from_json(obj, path)


# --- the ztunnel snapshot (agent -> ztunnel) -------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotWorkload:
    """A workload in the snapshot; ``cert``/``key`` (paths) only for local ones."""

    id: int
    name: str
    namespace: str
    service_account: str
    node: str
    address: str
    port: int
    service: str = ""
    cert: str | None = None
    key: str | None = None

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "namespace": self.namespace,
                "service_account": self.service_account, "node": self.node,
                "address": self.address, "port": self.port, "service": self.service,
                "cert": self.cert, "key": self.key}  # fmt: skip

    @classmethod
    def from_json(cls, obj: object, path: str = "workload") -> SnapshotWorkload:
        f = _Fields(obj, path, ("id", "name", "namespace", "service_account", "node",
                                "address", "port", "service", "cert", "key"))  # fmt: skip
        wid = f.integer("id")
        if wid < 0:
            raise ContractError(f"{f.at('id')}: {wid} is negative")
        return cls(
            id=wid, name=f.label("name"), namespace=f.label("namespace"),
            service_account=f.label("service_account"), node=f.label("node"),
            address=f.ip("address"), port=f.port("port"), service=f.label("service", ""),
            cert=f.string("cert", None), key=f.string("key", None),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ztunnel needs, schema ``SNAPSHOT_SCHEMA``."""

    version: int
    node: NodeDoc
    trust_domain: str
    trust_bundle: str  # path of the PEM roots
    bpf_pin_dir: str | None = None  # bpffs dir with the original-destination map
    workloads: tuple[SnapshotWorkload, ...] = ()
    services: tuple[ServiceDoc, ...] = ()
    policies: tuple[AuthorizationPolicy, ...] = ()
    authorization_default: Literal["ALLOW", "DENY"] = "ALLOW"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SNAPSHOT_SCHEMA, "version": self.version, "node": self.node.to_json(),
            "trust_domain": self.trust_domain, "trust_bundle": self.trust_bundle,
            "bpf_pin_dir": self.bpf_pin_dir,
            "workloads": [w.to_json() for w in self.workloads],
            "services": [s.to_json() for s in self.services],
            "policies": [p.to_dict() for p in self.policies],
            "authorization_default": self.authorization_default,
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: object, path: str = "snapshot") -> Snapshot:
        f = _Fields(obj, path, ("schema", "version", "node", "trust_domain", "trust_bundle",
                                "bpf_pin_dir", "workloads", "services", "policies",
                                "authorization_default"))  # fmt: skip
        schema = f.obj.get("schema")
        if schema != SNAPSHOT_SCHEMA or isinstance(schema, bool):
            raise ContractError(f"{f.at('schema')}: snapshot schema {schema!r} is not "
                                f"{SNAPSHOT_SCHEMA}; run the same meshnode version for the "
                                "agent and ztunnel")
        td = check_trust_domain(f.raw("trust_domain"), f.at("trust_domain"))
        workloads = tuple(SnapshotWorkload.from_json(w, p) for w, p in f.items("workloads"))
        services = tuple(ServiceDoc.from_json(s, p) for s, p in f.items("services"))
        for (_, wpath), w in zip(f.items("workloads"), workloads, strict=True):
            check_identity(td, w.namespace, w.service_account, wpath)
        policies = []
        for raw, ppath in f.items("policies", []):
            policy = _resource(raw, ppath)
            if not isinstance(policy, AuthorizationPolicy):
                raise ContractError(f"{ppath}: a {policy.kind}, not an AuthorizationPolicy")
            policies.append(policy)
        default = f.raw("authorization_default", "ALLOW")
        if default not in ("ALLOW", "DENY"):
            raise ContractError(f"{f.at('authorization_default')}: {default!r} is not "
                                "ALLOW or DENY")
        return cls(
            version=f.integer("version"),
            node=NodeDoc.from_json(f.raw("node"), f.at("node")),
            trust_domain=td,
            trust_bundle=f.string("trust_bundle"),
            bpf_pin_dir=f.string("bpf_pin_dir", None),
            workloads=workloads, services=services, policies=tuple(policies),
            authorization_default=default,
        )  # fmt: skip


# --- control messages (agent <-> ztunnel) ----------------------------------------------


def _message_fields(obj: object, path: str, known: tuple[str, ...]) -> _Fields:
    f = _Fields(obj, path, ("v", "type", *known))
    v = f.obj.get("v")
    if v != CONTROL_PROTOCOL_VERSION or isinstance(v, bool):
        raise ContractError(f"{f.at('v')}: protocol version {v!r} is not "
                            f"{CONTROL_PROTOCOL_VERSION}; run the same meshnode version for "
                            "the agent and ztunnel")
    return f


@dataclass(frozen=True, slots=True)
class SnapshotMessage:
    """Replace ztunnel's whole state. The message's version is the snapshot's."""

    version: int
    state: Snapshot

    def to_json(self) -> dict[str, Any]:
        return {"v": CONTROL_PROTOCOL_VERSION, "type": "snapshot", "version": self.version,
                "state": self.state.to_json()}

    @classmethod
    def from_json(cls, obj: object, path: str = "message") -> SnapshotMessage:
        f = _message_fields(obj, path, ("version", "state"))
        version = f.integer("version")
        state = Snapshot.from_json(f.raw("state"), f.at("state"))
        return cls(version, replace(state, version=version))


@dataclass(frozen=True, slots=True)
class AddMessage:
    """Add (or replace, by key) one workload or service."""

    version: int
    value: SnapshotWorkload | ServiceDoc

    @property
    def kind(self) -> Literal["workload", "service"]:
        return "workload" if isinstance(self.value, SnapshotWorkload) else "service"

    def to_json(self) -> dict[str, Any]:
        return {"v": CONTROL_PROTOCOL_VERSION, "type": "add", "version": self.version,
                "kind": self.kind, "value": self.value.to_json()}

    @classmethod
    def from_json(cls, obj: object, path: str = "message") -> AddMessage:
        f = _message_fields(obj, path, ("version", "kind", "value"))
        kind, version = f.string("kind"), f.integer("version")
        if kind == "workload":
            return cls(version, SnapshotWorkload.from_json(f.raw("value"), f.at("value")))
        if kind == "service":
            return cls(version, ServiceDoc.from_json(f.raw("value"), f.at("value")))
        raise ContractError(f"{f.at('kind')}: {kind!r} is not workload or service")


@dataclass(frozen=True, slots=True)
class DeleteMessage:
    """Delete one workload (key: its name) or service (key: ``namespace/name``)."""

    version: int
    kind: Literal["workload", "service"]
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"v": CONTROL_PROTOCOL_VERSION, "type": "delete", "version": self.version,
                "kind": self.kind, "key": self.key}

    @classmethod
    def from_json(cls, obj: object, path: str = "message") -> DeleteMessage:
        f = _message_fields(obj, path, ("version", "kind", "key"))
        kind = f.string("kind")
        if kind not in ("workload", "service"):
            raise ContractError(f"{f.at('kind')}: {kind!r} is not workload or service")
        return cls(f.integer("version"), kind, f.string("key"))


ControlMessage: TypeAlias = SnapshotMessage | AddMessage | DeleteMessage
_MESSAGES: dict[str, type[SnapshotMessage] | type[AddMessage] | type[DeleteMessage]] = {
    "snapshot": SnapshotMessage, "add": AddMessage, "delete": DeleteMessage,
}


def parse_control_message(obj: object, path: str = "message") -> ControlMessage:
    if not isinstance(obj, dict):
        raise ContractError(f"{path}: expected dict, got {obj!r}")
    kind = obj.get("type")
    cls = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ContractError(f"{path}.type: unknown message type {kind!r} "
                            f"({', '.join(_MESSAGES)})")
    return cls.from_json(obj, path)


@dataclass(frozen=True, slots=True)
class Ack:
    """The change of `version` is live."""

    version: int

    def to_json(self) -> dict[str, Any]:
        return {"v": CONTROL_PROTOCOL_VERSION, "type": "ack", "version": self.version}

    @classmethod
    def from_json(cls, obj: object, path: str = "reply") -> Ack:
        return cls(_message_fields(obj, path, ("version",)).integer("version"))


@dataclass(frozen=True, slots=True)
class Nack:
    """The change was refused; the previous state stays. ``version`` is None when
    the message was too broken to have one."""

    version: int | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"v": CONTROL_PROTOCOL_VERSION, "type": "nack", "version": self.version,
                "error": self.error}

    @classmethod
    def from_json(cls, obj: object, path: str = "reply") -> Nack:
        f = _message_fields(obj, path, ("version", "error"))
        return cls(f.integer("version", None), f.string("error"))


ControlReply: TypeAlias = Ack | Nack


def parse_control_reply(obj: object, path: str = "reply") -> ControlReply:
    if not isinstance(obj, dict):
        raise ContractError(f"{path}: expected dict, got {obj!r}")
    kind = obj.get("type")
    if kind == "ack":
        return Ack.from_json(obj, path)
    if kind == "nack":
        return Nack.from_json(obj, path)
    raise ContractError(f"{path}.type: {kind!r} is not ack or nack")
