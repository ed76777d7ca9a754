"""What the BPF tests share: the check that eBPF can run here, unique names,
entering a test network namespace from this thread, and waiting for cgroups and
programs to go away."""

from __future__ import annotations

import contextlib
import ctypes as ct
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from meshnode.bpf import syscall
from meshnode.bpf.cgroups import cgroup2_mount
from meshnode.bpf.errors import BpfError

CLONE_NEWNET = 0x40000000

# Every program the agent attaches at its cgroup, as (name, attach type), sorted:
# written out here, not taken from the loader, so a program added or lost fails.
MESH_PROGRAMS = [
    ("mn_bind4", "bind4"),
    ("mn_bind6", "bind6"),
    ("mn_connect4", "connect4"),
    ("mn_connect6", "connect6"),
    ("mn_ingress", "ingress"),
    ("mn_recvmsg4", "recvmsg4"),
    ("mn_recvmsg6", "recvmsg6"),
    ("mn_sendmsg4", "sendmsg4"),
    ("mn_sendmsg6", "sendmsg6"),
    ("mn_sockops", "sock_ops"),
]
MESH_PROGRAM_NAMES = [name for name, _ in MESH_PROGRAMS]


def ebpf_missing(tools: Sequence[str] = ("ip", "nsenter"), ipv6: bool = False) -> str | None:
    """Why these tests cannot run here (printed as the skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, eBPF)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (install python3-bpfcc; run scripts/setup.sh)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        cgroup2_mount()
    except BpfError as exc:
        return str(exc)
    if not (Path("/lib/modules") / os.uname().release / "build" / "include").is_dir():
        return "no kernel headers for bcc at /lib/modules/$(uname -r)/build (run scripts/setup.sh)"
    if ipv6 and not Path("/proc/sys/net/ipv6").is_dir():
        return "IPv6 is disabled in this kernel (the dual-stack checks need ::1)"
    return None


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Runs the block in the namespace (this thread only); sockets made there stay."""
    libc = ct.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ct.get_errno(), "setns into test netns")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ct.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def remove_cgroup(path: Path) -> None:
    for _ in range(100):  # a just-exited task can keep the cgroup busy for a moment
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    path.rmdir()


def prog_gone(prog_id: int, wait: float = 3.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = syscall.prog_get_fd_by_id(prog_id)
        except FileNotFoundError:
            return True
        os.close(fd)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def bpftool_cgroup_names(path: Path) -> list[str]:
    if shutil.which("bpftool") is None:
        return []
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(path)], capture_output=True, text=True
    )
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return [entry.get("name", "") for entry in json.loads(out.stdout)]
