"""What the node proxy knows: workloads, services and their endpoints, indexed
for the lookups on the data path. Built from the snapshot the node agent hands
over; no I/O here but :func:`load_snapshot_file`.

Snapshot schema (version 1), JSON::

    {"schema": 1, "version": <int, grows with every change>,
     "node": {"name": "node1", "ip": "198.18.0.11", "zone": "z1"},
     "trust_domain": "cluster.local",
     "trust_bundle": "<path to PEM>",
     "bpf_pin_dir": "<bpffs dir with the original-destination map>" | null,
     "workloads": [{"id": 1, "name": "web", "namespace": "default",
                    "service_account": "web", "node": "node1",
                    "address": "198.18.0.11", "port": 8080, "service": "web",
                    "cert": "<path>", "key": "<path>"}],      # cert/key: local ones only
     "services": [{"name": "api", "namespace": "default", "vip": "240.0.0.1",
                   "ports": [{"port": 8080, "target_port": 8080}],
                   "endpoints": [{"workload": "api", "namespace": "default",
                                  "service_account": "api", "node": "node2",
                                  "node_ip": "198.18.0.12", "address": "198.18.0.12",
                                  "zone": "z2", "port": 8080}]}]}
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.core.constants import HBONE_PORT
from meshnode.core.contracts import SNAPSHOT_SCHEMA as SCHEMA
from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import SpiffeId

__all__ = ["HBONE_PORT", "SCHEMA"]


class StateError(MeshnodeError, ValueError):
    """The snapshot is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Workload:
    id: int
    name: str
    identity: SpiffeId
    node: str
    address: str
    port: int
    service: str
    cert_path: str | None = None
    key_path: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    workload: str
    identity: SpiffeId
    node: str
    node_ip: str
    address: str
    port: int
    zone: str = ""
    version: str = ""  # subset label, for traffic splits (e.g. "v1", "v2")
    # The service port this endpoint serves; 0 = the one whose target_port is `port`.
    # Lets endpoints of one service listen on different ports (two on one VM).
    service_port: int = 0


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    # Traffic split: (version, weight) pairs; empty = no split, all endpoints.
    split: tuple[tuple[str, int], ...] = ()

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.mesh"

    def target_port(self, port: int) -> int | None:
        for p in self.ports:
            if p.port == port:
                return p.target_port
        return None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    ip: str
    zone: str = ""


@dataclass(slots=True)
class ProxyState:
    """Indexed stores; rebuilt whole from each snapshot (cheap at node scale)."""

    version: int
    node: NodeInfo
    trust_domain: str
    trust_bundle: str
    bpf_pin_dir: str | None
    policies: tuple[Any, ...] = ()  # AuthorizationPolicy resources (controlplane.resources)
    authz_default: str = "ALLOW"  # decision when no ALLOW policy applies
    workloads_by_id: dict[int, Workload] = field(default_factory=dict)
    local_by_addr: dict[tuple[str, int], Workload] = field(default_factory=dict)
    services_by_vip: dict[str, Service] = field(default_factory=dict)
    services_by_name: dict[tuple[str, str], Service] = field(default_factory=dict)
    endpoints_by_addr: dict[tuple[str, int], Endpoint] = field(default_factory=dict)

    def find_local_workload(self, workload_id: int) -> Workload | None:
        return self.workloads_by_id.get(workload_id)

    def find_local_by_addr(self, ip: str, port: int) -> Workload | None:
        return self.local_by_addr.get((ip, port))

    def find_service_by_vip(self, vip: str) -> Service | None:
        return self.services_by_vip.get(vip)

    def find_endpoint_by_addr(self, ip: str, port: int) -> Endpoint | None:
        return self.endpoints_by_addr.get((ip, port))

    def local_identities(self) -> dict[SpiffeId, Workload]:
        return {w.identity: w for w in self.workloads_by_id.values() if w.cert_path}

    def dump(self) -> dict[str, Any]:
        """For the admin config dump."""
        return {
            "version": self.version,
            "node": {"name": self.node.name, "ip": self.node.ip, "zone": self.node.zone},
            "trust_domain": self.trust_domain,
            "authorization_default": self.authz_default,
            "policies": [p.to_dict() for p in self.policies],
            "workloads": [
                {
                    "id": w.id,
                    "name": w.name,
                    "identity": w.identity.uri,
                    "address": f"{w.address}:{w.port}",
                    "service": w.service,
                    "certificate": w.cert_path,
                }
                for w in self.workloads_by_id.values()
            ],
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": s.vip,
                    "ports": [{"port": p.port, "target_port": p.target_port} for p in s.ports],
                    "split": dict(s.split),
                    "endpoints": [
                        {
                            "workload": e.workload,
                            "identity": e.identity.uri,
                            "node": e.node,
                            "address": f"{e.address}:{e.port}",
                            "zone": e.zone,
                            "version": e.version,
                        }
                        for e in s.endpoints
                    ],
                }
                for s in self.services_by_vip.values()
            ],
        }


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateError(f"{where}: expected an object, got {value!r}")
    return value


def _req(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise StateError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise StateError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _ip(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise StateError(f"{where}: {value!r} is not an IP address") from None


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise StateError(f"{where}: {value!r} is not a port (1-65535)")
    return value


def parse_snapshot(doc: dict[str, Any]) -> ProxyState:
    """Validate a snapshot document and index it. Raises StateError naming the
    offending field; the caller keeps its previous state in that case."""
    if doc.get("schema") != SCHEMA:
        raise StateError(
            f"snapshot schema {doc.get('schema')!r} is not {SCHEMA}; upgrade meshnode"
        )
    node_doc = _req(doc, "node", dict, "snapshot")
    node = NodeInfo(
        name=_req(node_doc, "name", str, "node"),
        ip=_ip(_req(node_doc, "ip", str, "node"), "node.ip"),
        zone=node_doc.get("zone", "") or "",
    )
    td = _req(doc, "trust_domain", str, "snapshot")
    state = ProxyState(
        version=_req(doc, "version", int, "snapshot"),
        node=node,
        trust_domain=td,
        trust_bundle=_req(doc, "trust_bundle", str, "snapshot"),
        bpf_pin_dir=doc.get("bpf_pin_dir"),
    )
    state.policies, state.authz_default = _policies(doc)
    for i, w in enumerate(_req(doc, "workloads", list, "snapshot")):
        where = f"workloads[{i}]"
        w = _obj(w, where)
        try:
            ident = SpiffeId(
                td, _req(w, "namespace", str, where), _req(w, "service_account", str, where)
            )
        except ValueError as exc:
            raise StateError(f"{where}: {exc}") from None
        wl = Workload(
            id=_req(w, "id", int, where),
            name=_req(w, "name", str, where),
            identity=ident,
            node=_req(w, "node", str, where),
            address=_ip(_req(w, "address", str, where), f"{where}.address"),
            port=_port(w.get("port"), f"{where}.port"),
            service=w.get("service", "") or "",
            cert_path=w.get("cert"),
            key_path=w.get("key"),
        )
        if wl.node == node.name:
            if wl.id in state.workloads_by_id:
                raise StateError(f"{where}.id: duplicate workload id {wl.id}")
            state.workloads_by_id[wl.id] = wl
            state.local_by_addr[(wl.address, wl.port)] = wl
    for i, s in enumerate(_req(doc, "services", list, "snapshot")):
        where = f"services[{i}]"
        s = _obj(s, where)
        ports = []
        for j, p in enumerate(_req(s, "ports", list, where)):
            pw = f"{where}.ports[{j}]"
            p = _obj(p, pw)
            ports.append(ServicePort(
                _port(p.get("port"), f"{pw}.port"),
                _port(p.get("target_port", p.get("port")), f"{pw}.target_port"),
            ))
        split = []
        for version, weight in _obj(s.get("split", {}) or {}, f"{where}.split").items():
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise StateError(f"{where}.split.{version}: weight must be an integer >= 0")
            split.append((str(version), weight))
        if split and not sum(w for _, w in split):
            raise StateError(f"{where}.split: the weights add up to 0")
        endpoints = []
        for j, e in enumerate(_req(s, "endpoints", list, where)):
            ew = f"{where}.endpoints[{j}]"
            e = _obj(e, ew)
            try:
                ident = SpiffeId(
                    td, _req(e, "namespace", str, ew), _req(e, "service_account", str, ew)
                )
            except ValueError as exc:
                raise StateError(f"{ew}: {exc}") from None
            ep = Endpoint(
                workload=_req(e, "workload", str, ew),
                identity=ident,
                node=_req(e, "node", str, ew),
                node_ip=_ip(_req(e, "node_ip", str, ew), f"{ew}.node_ip"),
                address=_ip(_req(e, "address", str, ew), f"{ew}.address"),
                port=_port(e.get("port"), f"{ew}.port"),
                zone=e.get("zone", "") or "",
                version=e.get("version", "") or "",
                service_port=_port(e["service_port"], f"{ew}.service_port")
                if e.get("service_port") else 0,
            )
            endpoints.append(ep)
            state.endpoints_by_addr[(ep.address, ep.port)] = ep
        svc = Service(
            name=_req(s, "name", str, where),
            namespace=_req(s, "namespace", str, where),
            vip=_ip(_req(s, "vip", str, where), f"{where}.vip"),
            ports=tuple(ports),
            endpoints=tuple(endpoints),
            split=tuple(split),
        )
        state.services_by_vip[svc.vip] = svc
        state.services_by_name[(svc.namespace, svc.name)] = svc
    return state


def _policies(doc: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    from meshnode.core.resources import (
        AuthorizationPolicy,
        ResourceError,
        resources_from_json,
    )

    default = doc.get("authorization_default", "ALLOW")
    if default not in ("ALLOW", "DENY"):
        raise StateError(f"authorization_default: {default!r} is not ALLOW or DENY")
    try:
        resources = resources_from_json(doc.get("policies", []) or [])
    except ResourceError as exc:
        raise StateError(f"policies: {exc}") from None
    return tuple(r for r in resources if isinstance(r, AuthorizationPolicy)), default


def load_snapshot_file(path: Path) -> ProxyState:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise StateError(f"cannot read snapshot {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"snapshot {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StateError(f"snapshot {path}: top level must be an object")
    return parse_snapshot(doc)
