"""The node agent's local description of its node: which workloads run here
(and in which cgroup), and the mesh's services. Written by `meshnode lab` (or,
later, kept in sync from the control plane). JSON; validated on load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import IdentityError, SpiffeId

# The slice the meshnode-ztunnel unit runs in, and its cgroup under the cgroup2
# mount (a dash in a slice name is a level of the tree). A slice outlives the
# unit's restarts, so the bind guard's cgroup id stays valid across them.
PROXY_SLICE = "meshnode-proxy.slice"
PROXY_SLICE_CGROUP = "meshnode.slice/meshnode-proxy.slice"


class NodeConfigError(MeshnodeError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LocalWorkload:
    name: str
    namespace: str
    service_account: str
    service: str
    port: int
    cgroup: str  # absolute path of the workload's cgroup v2 directory

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)


@dataclass(slots=True)
class NodeConfig:
    version: int
    name: str
    ip: str
    zone: str
    trust_domain: str
    cgroup_parent: str  # where the BPF programs attach (the node's subtree, or the root)
    state_dir: Path  # certificates, keys, the ztunnel snapshot
    bpf_pin_dir: str  # bpffs directory for maps ztunnel reads
    ca_dir: str | None  # lab only: the CA this agent asks for certificates
    workloads: list[LocalWorkload] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)  # policies (JSON form)
    ztunnel_args: list[str] = field(default_factory=list)
    # The proxy's cgroup relative to the cgroup2 mount (see bind guard in agent.py);
    # None: the agent's own cgroup (a ztunnel the agent runs as its child).
    proxy_cgroup: str | None = None


def load_node_config(path: Path) -> NodeConfig:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise NodeConfigError(f"cannot read node config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise NodeConfigError(f"node config {path} is not valid JSON: {exc}") from None
    try:
        node = doc["node"]
        workloads = [
            LocalWorkload(
                name=w["name"],
                namespace=w.get("namespace", "default"),
                service_account=w.get("service_account", w["service"]),
                service=w["service"],
                port=int(w["port"]),
                cgroup=w["cgroup"],
            )
            for w in doc.get("workloads", [])
        ]
        cfg = NodeConfig(
            version=int(doc.get("version", 0)),
            name=node["name"],
            ip=node["ip"],
            zone=node.get("zone", ""),
            trust_domain=doc["trust_domain"],
            cgroup_parent=doc["cgroup_parent"],
            state_dir=Path(doc["state_dir"]),
            bpf_pin_dir=doc["bpf_pin_dir"],
            ca_dir=doc.get("ca_dir"),
            workloads=workloads,
            services=list(doc.get("services", [])),
            resources=list(doc.get("resources", [])),
            ztunnel_args=list(doc.get("ztunnel_args", [])),
            proxy_cgroup=doc.get("proxy_cgroup"),
        )
    except KeyError as exc:
        raise NodeConfigError(f"node config {path}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise NodeConfigError(f"node config {path}: {exc}") from None
    for w in cfg.workloads:
        try:
            w.identity(cfg.trust_domain)
        except IdentityError as exc:
            raise NodeConfigError(f"node config {path}: workload {w.name}: {exc}") from None
    from meshnode.core.resources import ResourceError, resources_from_json

    try:
        resources_from_json(cfg.resources, source=str(path))
    except ResourceError as exc:
        raise NodeConfigError(f"node config {path}: resources: {exc}") from None
    return cfg
