"""meshnode.bpf: the eBPF redirect of mesh workloads' connects to the node proxy,
and the STRICT-mode guard of their inbound ports.

- meshnode.h, connect.c, sockops.c, ingress.c: the programs and maps (compiled by bcc).
- layout: ctypes mirrors of the shared structs, pin names.
- loader: MeshBpf, which compiles, attaches, pins and fills the maps (agent; bcc).
- pinned: OrigDstTable, the proxy's lookup of original destinations (no bcc).
- cgroups: the cgroup v2 mount and cgroup ids.

Importing this package or meshnode.bpf.pinned never imports bcc.
"""

from .errors import BpfError

__all__ = ["BpfError"]
