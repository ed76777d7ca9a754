"""Finding cgroup v2 and naming cgroups the way BPF does."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BpfError


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def cgroup2_mount(mounts: Path = Path("/proc/mounts")) -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on a unified layout,
    /sys/fs/cgroup/unified on a hybrid one)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError as exc:
        raise BpfError(f"cannot read {mounts}: {exc.strerror}") from exc
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(_unescape_mount_field(fields[1]))
    raise BpfError(
        "no cgroup v2 hierarchy is mounted (none in /proc/mounts); mount one with "
        "`mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with "
        "systemd.unified_cgroup_hierarchy=1"
    )


def cgroup_of(pid: int | str = "self") -> str:
    """The cgroup v2 path of a process (the ``0::/path`` line of
    /proc/<pid>/cgroup), relative to the cgroup2 mount, without a leading slash."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as exc:
        raise BpfError(f"cannot read the cgroup of process {pid}: {exc.strerror}") from exc
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip().lstrip("/")
    raise BpfError(f"process {pid} is not in a cgroup v2 hierarchy")


def cgroup_id(path: str | os.PathLike[str]) -> int:
    """The kernel's id of a cgroup v2 directory: what bpf_get_current_cgroup_id()
    returns for tasks in it. On cgroup v2 it is the directory's inode number."""
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise BpfError(f"cannot stat cgroup {path}: {exc.strerror}") from exc
