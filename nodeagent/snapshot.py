"""Turns the node's description into what ztunnel and the BPF maps need.
Pure functions: no files, no syscalls."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from meshnode.core.contracts import NodeDoc, Revocation, ServiceDoc, Snapshot, SnapshotWorkload
from meshnode.core.resources import (
    DEFAULT_DNS_DOMAIN,
    AuthorizationPolicy,
    MeshConfig,
    PeerAuthentication,
    Resource,
    TrafficSplit,
    resources_from_json,
)
from meshnode.nodeagent.certs import CertFiles
from meshnode.nodeagent.config import NodeConfig


def assign_workload_ids(known: dict[str, int], names: list[str]) -> dict[str, int]:
    """Stable small ids per workload name: existing names keep theirs (a BPF
    record made before a config change must still resolve), new names get the
    next free one, gone names are dropped."""
    ids = {n: known[n] for n in names if n in known}
    next_id = max([0, *known.values(), *ids.values()]) + 1
    for name in names:
        if name not in ids:
            ids[name] = next_id
            next_id += 1
    return ids


def node_resources(cfg: NodeConfig) -> list[Resource]:
    return resources_from_json(cfg.resources, source="node config")


def services_with_splits(services: list[ServiceDoc], resources: list[Resource]) -> list[ServiceDoc]:
    """Attach each TrafficSplit to its service (same namespace): version weights as
    the document's ``split``, zone weights as its ``zone_split``. A service no split
    names is passed on as it came (its JSON is unchanged)."""
    versions: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {}
    zones: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {}
    for r in resources:
        if isinstance(r, TrafficSplit):
            if r.zones:
                zones[(r.namespace, r.service)] = tuple(r.zones)
            else:
                versions[(r.namespace, r.service)] = tuple(r.weights)
    out = []
    for svc in services:
        key = (svc.namespace, svc.name)
        changes: dict[str, Any] = {}
        if key in versions:
            changes["split"] = versions[key]
        if key in zones:
            changes["zone_split"] = zones[key]
        out.append(replace(svc, **changes) if changes else svc)
    return out


def strict_ports(cfg: NodeConfig, resources: list[Resource]) -> list[tuple[str, int]]:
    """(workload name, port) of the local workloads in STRICT mode. A
    PeerAuthentication selects workloads of its namespace (all, or by service);
    a selector-less one is the namespace default and a selecting one wins over
    it. No policy: PERMISSIVE, as in Istio."""
    peer_auth = [r for r in resources if isinstance(r, PeerAuthentication)]
    out = []
    for w in cfg.workloads:
        mode = "PERMISSIVE"
        ns_default = [p for p in peer_auth if p.namespace == w.namespace and p.selector is None]
        specific = [
            p
            for p in peer_auth
            if p.namespace == w.namespace
            and p.selector is not None
            and w.service in p.selector.services
        ]
        for p in (*ns_default, *specific):
            mode = p.mode
        if mode == "STRICT":
            out.append((w.name, w.port))
    return out


def build_snapshot(
    cfg: NodeConfig,
    ids: dict[str, int],
    certs: dict[str, CertFiles],
    trust_bundle: str,
) -> Snapshot:
    """ztunnel's snapshot for `cfg`: every local workload needs an id in `ids`
    (KeyError otherwise); `certs` holds the ones whose certificate is ready.
    Raises ContractError when cfg's services do not follow the service contract."""
    workloads = []
    for w in cfg.workloads:
        files = certs.get(w.name)
        workloads.append(
            SnapshotWorkload(
                id=ids[w.name],
                name=w.name,
                namespace=w.namespace,
                service_account=w.service_account,
                node=cfg.name,
                address=cfg.ip,
                port=w.port,
                service=w.service,
                cert=str(files.cert) if files else None,
                key=str(files.key) if files else None,
            )
        )
    resources = node_resources(cfg)
    mesh = [r for r in resources if isinstance(r, MeshConfig)]
    services = [
        ServiceDoc.from_json(s, f"node config services[{i}]") for i, s in enumerate(cfg.services)
    ]
    return Snapshot(
        version=cfg.version,
        node=NodeDoc(name=cfg.name, ip=cfg.ip, zone=cfg.zone),
        trust_domain=cfg.trust_domain,
        trust_bundle=trust_bundle,
        bpf_pin_dir=cfg.bpf_pin_dir,
        workloads=tuple(workloads),
        services=tuple(services_with_splits(services, resources)),
        policies=tuple(r for r in resources if isinstance(r, AuthorizationPolicy)),
        authorization_default="DENY" if mesh and mesh[0].default_action == "DENY" else "ALLOW",
        revoked=tuple(
            Revocation.from_json(r, f"node config revoked[{i}]") for i, r in enumerate(cfg.revoked)
        ),
        dns_domain=mesh[0].dns_domain if mesh else DEFAULT_DNS_DOMAIN,
    )


def ztunnel_snapshot(
    cfg: NodeConfig,
    ids: dict[str, int],
    certs: dict[str, CertFiles],
    trust_bundle: str,
) -> dict[str, Any]:
    """:func:`build_snapshot` as the JSON document the agent writes and sends."""
    return build_snapshot(cfg, ids, certs, trust_bundle).to_json()


def capture_destinations(cfg: NodeConfig) -> set[tuple[str, int]]:
    """Every (ip, port) whose connections the BPF programs hand to ztunnel:
    service VIP ports and workload addresses. Nothing else is touched."""
    dests: set[tuple[str, int]] = set()
    for svc in cfg.services:
        for p in svc.get("ports", []):
            dests.add((svc["vip"], int(p["port"])))
        for ep in svc.get("endpoints", []):
            dests.add((ep["address"], int(ep["port"])))
    return dests
