"""detach_stale(): programs a dead agent left attached are found by name and
detached; this run's programs and other software's programs stay. Needs root."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.bpf import syscall
from meshnode.bpf.cgroups import cgroup2_mount
from meshnode.bpf.layout import PIN_ORIG_DST, PIN_STRICT
from meshnode.bpf.loader import MeshBpf
from tests.support.bpf import (
    MESH_PROGRAM_NAMES,
    MESH_PROGRAMS,
    ebpf_missing,
    prog_gone,
    unique,
)

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _require_ebpf() -> None:
    reason = ebpf_missing(tools=())
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cgroup() -> Iterator[Path]:
    path = cgroup2_mount() / unique("mn-test")
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path("/sys/fs/bpf") / unique("mn-test")
    yield path
    for pin in path.glob("*"):
        pin.unlink()
    if path.exists():
        path.rmdir()


def crashed_agent(cgroup: Path, pin_dir: Path) -> None:
    """Loads and attaches in a child process that dies without detaching."""
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from meshnode.bpf.loader import MeshBpf
        mesh = MeshBpf(Path({str(pin_dir)!r}))
        mesh.load()
        mesh.attach({str(cgroup)!r})
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def names(cgroup: Path) -> list[str]:
    return sorted(p["name"] for p in MeshBpf.attached_programs(cgroup))


def test_detach_stale_removes_only_a_dead_runs_programs(cgroup: Path, pin_dir: Path) -> None:
    from bcc import BPF

    # Somebody else's connect4 program at the same cgroup (systemd, a CNI, ...).
    foreign = BPF(text=b"int other_connect4(struct bpf_sock_addr *ctx) { return 1; }")
    fn = foreign.load_func(b"other_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=10)
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    syscall.prog_attach(cg_fd, fn.fd, syscall.BPF_CGROUP_INET4_CONNECT, syscall.BPF_F_ALLOW_MULTI)
    try:
        crashed_agent(cgroup, pin_dir)
        # Attachments outlive the process that made them; so do its pins.
        assert names(cgroup) == [*MESH_PROGRAM_NAMES, "other_connect4"]
        assert (pin_dir / PIN_ORIG_DST).exists()
        assert (pin_dir / PIN_STRICT).exists()
        stale_ids = {
            p["id"] for p in MeshBpf.attached_programs(cgroup) if p["name"] != "other_connect4"
        }

        with MeshBpf(pin_dir) as mesh:
            mesh.load()
            mesh.attach(cgroup)  # replaces the stale pins
            assert len(names(cgroup)) == 2 * len(MESH_PROGRAMS) + 1
            detached = mesh.detach_stale(cgroup)
            assert {p["id"] for p in detached} == stale_ids
            assert sorted((p["name"], p["attach_type"]) for p in detached) == MESH_PROGRAMS
            # Ours (this run) and the foreign program are still there.
            assert names(cgroup) == [*MESH_PROGRAM_NAMES, "other_connect4"]
            assert mesh.detach_stale(cgroup) == []
        assert all(prog_gone(i) for i in stale_ids)
        assert names(cgroup) == ["other_connect4"]
        assert not pin_dir.exists()

        # Without load() (no bcc needed), at agent start-up before anything else.
        crashed_agent(cgroup, pin_dir)
        assert len(MeshBpf(pin_dir).detach_stale(cgroup)) == len(MESH_PROGRAMS)
        assert names(cgroup) == ["other_connect4"]
    finally:
        for prog in MeshBpf.attached_programs(cgroup):  # whatever a failure left
            if prog["name"].startswith("mn_"):
                MeshBpf(pin_dir).detach_stale(cgroup)
                break
        syscall.prog_detach(cg_fd, fn.fd, syscall.BPF_CGROUP_INET4_CONNECT)
        os.close(cg_fd)
        foreign.cleanup()
    assert MeshBpf.attached_programs(cgroup) == []
