"""Turns the node's description into what ztunnel and the BPF maps need.
Pure functions: no files, no syscalls."""

from __future__ import annotations

from typing import Any

from meshnode.nodeagent.certs import CertFiles
from meshnode.nodeagent.config import NodeConfig
from meshnode.ztunnel.state import SCHEMA


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


def ztunnel_snapshot(
    cfg: NodeConfig,
    ids: dict[str, int],
    certs: dict[str, CertFiles],
    trust_bundle: str,
) -> dict[str, Any]:
    workloads = []
    for w in cfg.workloads:
        files = certs.get(w.name)
        workloads.append({
            "id": ids[w.name], "name": w.name, "namespace": w.namespace,
            "service_account": w.service_account, "node": cfg.name, "address": cfg.ip,
            "port": w.port, "service": w.service,
            "cert": str(files.cert) if files else None,
            "key": str(files.key) if files else None,
        })
    return {
        "schema": SCHEMA,
        "version": cfg.version,
        "node": {"name": cfg.name, "ip": cfg.ip, "zone": cfg.zone},
        "trust_domain": cfg.trust_domain,
        "trust_bundle": trust_bundle,
        "bpf_pin_dir": cfg.bpf_pin_dir,
        "workloads": workloads,
        "services": cfg.services,
    }


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
