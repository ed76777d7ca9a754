"""Well-known ports and addresses, defined once (docs/protocol.md)."""

from __future__ import annotations

# ztunnel, on every node
OUTBOUND_PORT = 15001  # captured outbound connections (127.0.0.1)
HBONE_PORT = 15008  # HBONE: HTTP/2 CONNECT over mutual TLS, from other nodes
ADMIN_PORT = 15000  # config dump, /peer (127.0.0.1)
METRICS_PORT = 15020  # Prometheus (127.0.0.1)
READY_PORT = 15021  # readiness (127.0.0.1)
DNS_PROXY_PORT = 15053  # mesh DNS, UDP and TCP (127.0.0.1); workloads' port 53 is sent here
# The zone ingress (multi-zone; `ztunnel run --ingress-listen`), where a node runs one.
# Guarded on every node like the other proxy ports: a local user who bound it first
# would keep the ingress from starting.
INGRESS_PORT = 15443

# ztunnel delivers plaintext to local workloads from this address (Istio's choice);
# STRICT lets only it through.
DELIVERY_ADDRESS = "127.0.0.6"
OUTBOUND_ADDRESS = "127.0.0.1"

# the control plane
CONTROLPLANE_PORT = 15012
CONTROLPLANE_METRICS_PORT = 15091  # its Prometheus listener, plain HTTP (off by default)

# service VIPs come from this range, as Kuma's do
VIP_NETWORK = "240.0.0.0/4"

# where the agent pins its BPF maps for ztunnel (bpffs)
BPF_PIN_DIR = "/sys/fs/bpf/meshnode"
