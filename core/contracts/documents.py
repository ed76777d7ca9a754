"""The parts the slice and the snapshot share: a node, a workload of the
slice, and the service document (ports, endpoints, traffic split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshnode.core.contracts.validate import (
    ContractError,
    Fields,
    check_label,
    check_port,
    check_version_label,
)
from meshnode.core.identity import SpiffeId


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
        f = Fields(obj, path, ("name", "zone", "ip"))
        return cls(name=f.label("name"), ip=f.ip("ip"), zone=f.label("zone", ""))


@dataclass(frozen=True, slots=True)
class Revocation:
    """A deleted node: every workload certificate issued to it (subject OU, see
    core/pki.py) before `issued_before` (Unix time, compared with the
    certificate's notBefore) is refused, and live tunnels resting on one are
    closed. Kept by the control plane for one certificate lifetime."""

    node: str
    issued_before: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "issued_before": self.issued_before}

    @classmethod
    def from_json(cls, obj: object, path: str = "revocation") -> Revocation:
        f = Fields(obj, path, ("node", "issued_before"))
        when = f.raw("issued_before")
        if isinstance(when, bool) or not isinstance(when, int | float) or when < 0:
            raise ContractError(f"{f.at('issued_before')}: {when!r} is not a Unix time")
        return cls(node=f.label("node"), issued_before=float(when))

    def revokes(self, node: str, not_before: float) -> bool:
        return node == self.node and not_before < self.issued_before


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
        return {
            "name": self.name,
            "namespace": self.namespace,
            "service": self.service,
            "service_account": self.service_account,
            "port": self.port,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "workload") -> WorkloadDoc:
        f = Fields(
            obj, path, ("name", "namespace", "service", "service_account", "port", "version")
        )
        return cls(
            name=f.label("name"),
            namespace=f.label("namespace"),
            service=f.label("service", ""),
            service_account=f.label("service_account"),
            port=f.port("port"),
            version=check_version_label(f.raw("version", ""), f.at("version")),
        )


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "target_port": self.target_port}

    @classmethod
    def from_json(cls, obj: object, path: str = "port") -> ServicePort:
        f = Fields(obj, path, ("port", "target_port"))
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
        return {
            "workload": self.workload,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "node": self.node,
            "node_ip": self.node_ip,
            "address": self.address,
            "zone": self.zone,
            "port": self.port,
            "service_port": self.service_port,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "endpoint") -> EndpointDoc:
        f = Fields(
            obj,
            path,
            (
                "workload",
                "namespace",
                "service_account",
                "node",
                "node_ip",
                "address",
                "zone",
                "port",
                "service_port",
                "version",
            ),
        )
        service_port = f.raw("service_port", 0)
        return cls(
            workload=f.label("workload"),
            namespace=f.label("namespace"),
            service_account=f.label("service_account"),
            node=f.label("node"),
            node_ip=f.ip("node_ip"),
            address=f.ip("address"),
            port=f.port("port"),
            zone=f.label("zone", ""),
            service_port=0 if service_port == 0 else check_port(service_port, f.at("service_port")),
            version=check_version_label(f.raw("version", ""), f.at("version")),
        )


@dataclass(frozen=True, slots=True)
class RemoteZoneDoc:
    """A service's endpoints in another zone, as this node may reach them: only
    through that zone's ingress, never by their node addresses (which the
    node is not told). One entry per zone, identity and version; ``port`` is
    the service port (what the zone SNI names), ``endpoints`` how many live
    there (a weight). Tunnels carry :class:`meshnode.core.identity.ZoneSni`."""

    zone: str
    ingress_ip: str
    ingress_port: int
    namespace: str  # the identity the endpoints prove: spiffe://<td>/ns/<namespace>/sa/<sa>
    service_account: str
    port: int
    version: str = ""
    endpoints: int = 1

    FIELDS = (
        "zone",
        "ingress_ip",
        "ingress_port",
        "namespace",
        "service_account",
        "port",
        "version",
        "endpoints",
    )

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_json(cls, obj: object, path: str = "remote") -> RemoteZoneDoc:
        f = Fields(obj, path, cls.FIELDS)
        return cls(
            zone=f.label("zone"),
            ingress_ip=f.ip("ingress_ip"),
            ingress_port=f.port("ingress_port"),
            namespace=f.label("namespace"),
            service_account=f.label("service_account"),
            port=f.port("port"),
            version=check_version_label(f.raw("version", ""), f.at("version")),
            endpoints=f.count("endpoints", 1),
        )


@dataclass(frozen=True, slots=True)
class ServiceDoc:
    """A service: its VIP, ports and endpoints (and traffic splits, in snapshots)."""

    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[EndpointDoc, ...]
    # Traffic split: (version, weight) pairs; empty = no split, all endpoints.
    split: tuple[tuple[str, int], ...] = ()
    # Endpoints in other zones, behind their ingress (multi-zone; docs/multizone.md).
    remote: tuple[RemoteZoneDoc, ...] = ()
    # Traffic split by zone: (zone, weight) pairs; empty = no split. An endpoint is
    # its `zone`'s, a remote entry its zone's; a zone not named weighs 0.
    zone_split: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "vip": self.vip,
            "ports": [p.to_json() for p in self.ports],
            "endpoints": [e.to_json() for e in self.endpoints],
        }
        if self.split:
            out["split"] = dict(self.split)
        if self.zone_split:
            out["zone_split"] = dict(self.zone_split)
        if self.remote:
            out["remote"] = [r.to_json() for r in self.remote]
        return out

    @classmethod
    def from_json(cls, obj: object, path: str = "service") -> ServiceDoc:
        f = Fields(
            obj,
            path,
            ("name", "namespace", "vip", "ports", "endpoints", "split", "zone_split", "remote"),
        )
        return cls(
            name=f.label("name"),
            namespace=f.label("namespace"),
            vip=f.ip("vip"),
            ports=tuple(ServicePort.from_json(p, pp) for p, pp in f.items("ports")),
            endpoints=tuple(EndpointDoc.from_json(e, ep) for e, ep in f.items("endpoints")),
            split=cls._weights(f, "split"),
            remote=tuple(RemoteZoneDoc.from_json(r, rp) for r, rp in f.items("remote", [])),
            zone_split=cls._weights(f, "zone_split"),
        )

    @staticmethod
    def _weights(f: Fields, key: str) -> tuple[tuple[str, int], ...]:
        """``split`` ({version: weight}) or ``zone_split`` ({zone: weight}): integers
        >= 0 that do not all add up to 0; absent (or empty) = no split."""
        check = check_label if key == "zone_split" else check_version_label
        pairs = []
        for label, weight in f.typed(key, dict, {}).items():
            check(label, f"{f.at(key)}.{label}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise ContractError(f"{f.at(key)}.{label}: weight must be an integer >= 0")
            pairs.append((label, weight))
        if pairs and not sum(w for _, w in pairs):
            raise ContractError(f"{f.at(key)}: the weights add up to 0")
        return tuple(pairs)
