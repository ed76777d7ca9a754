"""What the node proxy knows: workloads, services and their endpoints, indexed
for the lookups on the data path. Built from the snapshot the node agent hands
over (its contract, :class:`meshnode.core.contracts.Snapshot`, validates it);
no I/O here but :func:`load_snapshot_file`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.core.constants import HBONE_PORT
from meshnode.core.contracts import SNAPSHOT_SCHEMA as SCHEMA
from meshnode.core.contracts import ContractError, Revocation, ServicePort, Snapshot
from meshnode.core.contracts import NodeDoc as NodeInfo
from meshnode.core.identity import SpiffeId, ZoneSni
from meshnode.core.resources import AuthorizationPolicy

__all__ = [
    "HBONE_PORT",
    "SCHEMA",
    "NodeInfo",
    "ServicePort",
    "StateError",
    "index_snapshot",
    "parse_snapshot",
]


class StateError(ContractError):
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
    # Another zone's endpoints, reached through its ingress (node_ip:hop_port)
    # with this zone SNI (core/identity.ZoneSni); "" for endpoints of this zone.
    # `address` is then the SNI too: it keys the balancer's stats per remote zone.
    sni: str = ""
    hop_port: int = HBONE_PORT

    @property
    def remote(self) -> bool:
        return bool(self.sni)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    # Traffic split: (version, weight) pairs; empty = no split, all endpoints.
    split: tuple[tuple[str, int], ...] = ()
    # Traffic split by zone: (zone, weight) pairs; empty = no split. An endpoint
    # belongs to its `zone` (a remote entry to its zone); a zone not named weighs 0.
    zone_split: tuple[tuple[str, int], ...] = ()

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.mesh"

    def target_port(self, port: int) -> int | None:
        for p in self.ports:
            if p.port == port:
                return p.target_port
        return None


@dataclass(slots=True)
class ProxyState:
    """Indexed stores; rebuilt whole from each snapshot (cheap at node scale)."""

    version: int
    node: NodeInfo
    trust_domain: str
    trust_bundle: str
    bpf_pin_dir: str | None
    policies: tuple[AuthorizationPolicy, ...] = ()
    authz_default: str = "ALLOW"  # decision when no ALLOW policy applies
    revoked: tuple[Revocation, ...] = ()  # deleted nodes: their certificates are refused
    dns_domain: str = "mesh"  # mesh DNS names: <service>.<namespace>.<dns_domain>
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
                    "zone_split": dict(s.zone_split),
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


def parse_snapshot(doc: object) -> ProxyState:
    """Validate a snapshot document and index it. Raises StateError naming the
    offending field; the caller keeps its previous state in that case."""
    try:
        snapshot = Snapshot.from_json(doc)
    except ContractError as exc:
        raise StateError(str(exc)) from None
    return index_snapshot(snapshot)


def index_snapshot(snap: Snapshot) -> ProxyState:
    """The indexed stores of a (validated) snapshot; only this node's workloads
    are local. Raises StateError on a duplicate local workload id."""
    td = snap.trust_domain
    state = ProxyState(
        version=snap.version,
        node=snap.node,
        trust_domain=td,
        trust_bundle=snap.trust_bundle,
        bpf_pin_dir=snap.bpf_pin_dir,
        policies=snap.policies,
        authz_default=snap.authorization_default,
        revoked=snap.revoked,
        dns_domain=snap.dns_domain,
    )
    for i, w in enumerate(snap.workloads):
        if w.node != snap.node.name:
            continue
        if w.id in state.workloads_by_id:
            raise StateError(f"snapshot.workloads[{i}].id: duplicate workload id {w.id}")
        wl = Workload(
            id=w.id,
            name=w.name,
            identity=w.identity(td),
            node=w.node,
            address=w.address,
            port=w.port,
            service=w.service,
            cert_path=w.cert,
            key_path=w.key,
        )
        state.workloads_by_id[wl.id] = wl
        state.local_by_addr[(wl.address, wl.port)] = wl
    for s in snap.services:
        endpoints = []
        for e in s.endpoints:
            ep = Endpoint(
                workload=e.workload,
                identity=e.identity(td),
                node=e.node,
                node_ip=e.node_ip,
                address=e.address,
                port=e.port,
                zone=e.zone,
                version=e.version,
                service_port=e.service_port,
            )
            endpoints.append(ep)
            state.endpoints_by_addr[(ep.address, ep.port)] = ep
        for r in s.remote:
            if r.zone == snap.node.zone:
                continue  # this zone's endpoints are listed as such, never via an ingress
            sni = ZoneSni(s.name, s.namespace, r.port, r.zone, td).name
            endpoints.append(
                Endpoint(
                    workload=f"zone/{r.zone}",
                    identity=r.identity(td),
                    node=f"ingress/{r.zone}",
                    node_ip=r.ingress_ip,
                    address=sni,
                    port=r.port,
                    zone=r.zone,
                    version=r.version,
                    service_port=r.port,
                    sni=sni,
                    hop_port=r.ingress_port,
                )
            )
        svc = Service(
            name=s.name,
            namespace=s.namespace,
            vip=s.vip,
            ports=s.ports,
            endpoints=tuple(endpoints),
            split=s.split,
            zone_split=s.zone_split,
        )
        state.services_by_vip[svc.vip] = svc
        state.services_by_name[(svc.namespace, svc.name)] = svc
    return state


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
