"""The node agent's local description of its node: which workloads run here
(and in which cgroup), and the mesh's services. Written by `meshnode lab` (or,
later, kept in sync from the control plane). JSON; validated on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import SpiffeId

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
    workloads: list[LocalWorkload] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)  # policies (JSON form)
    revoked: list[dict[str, Any]] = field(default_factory=list)  # deleted nodes (Revocation)
    # The proxy's cgroup relative to the cgroup2 mount (see bind guard in agent.py);
    # None: the agent's own cgroup.
    proxy_cgroup: str | None = None
    # Mesh workloads' DNS (UDP and TCP to port 53) goes to the node proxy's mesh
    # DNS proxy (127.0.0.1:15053; docs/dns.md).
    dns_capture: bool = True
