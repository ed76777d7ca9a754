"""Why a system test cannot run on this machine. Tests that need root, network
namespaces, cgroup v2 and eBPF skip with the reason printed where one is
missing (CI is root and has them all, so there they run)."""

from __future__ import annotations

import os
import shutil

import pytest


def lab_missing() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, BPF)"
    for tool in ("ip", "nsenter", "curl", "tcpdump", "ss"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/setup.sh --test installs it)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (python3-bpfcc; scripts/setup.sh links it into .venv)"
    try:
        from meshnode.bpf.cgroups import cgroup2_mount

        cgroup2_mount()
    except Exception as exc:
        return f"no cgroup v2: {exc}"
    return None


requires_lab = pytest.mark.skipif(lab_missing() is not None, reason=str(lab_missing()))
