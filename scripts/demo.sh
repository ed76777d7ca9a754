#!/usr/bin/env bash
# Installs meshnode and runs the lab demo: two nodes (network namespaces), an
# HTTP server workload on node2 and a client workload on node1 whose plain curl
# is caught by eBPF and carried over mutual TLS (HBONE). The lab stays up for
# you to explore; `sudo .venv/bin/meshnode lab down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/meshnode lab down >/dev/null 2>&1 || true
exec .venv/bin/meshnode lab up --nodes 2 --demo
