"""meshnode.bpf without root or a kernel: argument checks, errors, imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.bpf import BpfError
from meshnode.bpf.cgroups import cgroup2_mount, cgroup_id
from meshnode.bpf.loader import MeshBpf

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
V1_ONLY = "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"


@pytest.mark.parametrize(
    ("mounts", "expected"),
    [(HYBRID, "/sys/fs/cgroup/unified"), (UNIFIED, "/sys/fs/cgroup")],
)
def test_cgroup2_mount_from_proc_mounts(tmp_path: Path, mounts: str, expected: str) -> None:
    table = tmp_path / "mounts"
    table.write_text(mounts)
    assert cgroup2_mount(table) == Path(expected)


def test_cgroup2_mount_missing_says_so(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text(V1_ONLY)
    with pytest.raises(BpfError, match="no cgroup v2"):
        cgroup2_mount(table)


def test_cgroup_id_of_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(BpfError, match="cannot stat cgroup"):
        cgroup_id(tmp_path / "nope")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proxy_ip": "::1"}, "must be IPv4"),
        ({"proxy_ip": "proxy"}, "not an IP address"),
        ({"proxy_port": 0}, "out of range"),
    ],
)
def test_meshbpf_rejects_bad_proxy(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BpfError, match=match):
        MeshBpf(Path("/sys/fs/bpf/x"), **kwargs)


def test_meshbpf_needs_load_first(tmp_path: Path) -> None:
    mesh = MeshBpf(tmp_path)
    with pytest.raises(BpfError, match="load"):
        mesh.attach(tmp_path)
    with pytest.raises(BpfError, match="load"):
        mesh.sync_workloads({1: 2})
    with pytest.raises(BpfError, match="load"):
        mesh.sync_destinations({("10.0.0.1", 80)})
    with pytest.raises(BpfError, match="load"):
        mesh.sync_strict({(1, 80)})
    mesh.close()  # nothing to do, no error


def test_importing_needs_no_bcc() -> None:
    code = (
        "import sys; import meshnode.bpf.pinned, meshnode.bpf.loader, meshnode.bpf.cgroups; "
        "sys.exit(1 if 'bcc' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
