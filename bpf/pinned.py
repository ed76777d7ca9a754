"""The proxy's view of the maps the node agent pins: no bcc, just bpf(2).

After accept(), the proxy asks where the connection was going::

    table = OrigDstTable.open(pin_dir)
    orig = table.pop(peer_ip, peer_port, local_ip, local_port)
"""

from __future__ import annotations

import ctypes as ct
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import syscall
from .errors import BpfError
from .layout import PIN_ORIG_DST, PIN_WORKLOADS, OrigDstRecord, TupleKey, WorkloadInfo


def open_pinned(path: str | os.PathLike[str]) -> int:
    """A new fd for the BPF object pinned at path (BPF_OBJ_GET); the caller closes it."""
    try:
        return syscall.obj_get(os.fspath(path))
    except FileNotFoundError as exc:
        raise BpfError(
            f"no pinned BPF object at {path}: is the node agent running with the "
            f"same pin directory? (`bpftool map show pinned {path}` to check)"
        ) from exc
    except PermissionError as exc:
        raise BpfError(
            f"cannot open pinned BPF object {path}: permission denied (needs root or CAP_BPF)"
        ) from exc
    except OSError as exc:
        raise BpfError(f"cannot open pinned BPF object {path}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class OrigDst:
    """Where a redirected connection was originally going, and which workload made it."""

    ip: str
    port: int
    workload_id: int


# A redirected connection is accepted right after its connect(); a record older than
# this belongs to a socket that lingered or is gone, and is refused (docs/security.md).
DEFAULT_MAX_AGE = 10.0


class OrigDstTable:
    """The 4-tuple -> original destination map, as the proxy uses it."""

    def __init__(self, fd: int, max_age: float = DEFAULT_MAX_AGE) -> None:
        self._fd = fd
        self.max_age_ns = int(max_age * 1e9)
        self.stale = 0  # records refused for their age

    @classmethod
    def open(
        cls, pin_dir: str | os.PathLike[str], max_age: float = DEFAULT_MAX_AGE
    ) -> OrigDstTable:
        return cls(open_pinned(Path(pin_dir) / PIN_ORIG_DST), max_age)

    def pop(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> OrigDst | None:
        """Takes the record of an accepted connection: src = the peer (client), dst =
        the local (proxy) address. IPv4-mapped IPv6 strings are accepted. None if the
        connection was not redirected, its record is already taken, or it is older
        than max_age (then it is deleted and counted in `stale`)."""
        if self._fd < 0:
            raise BpfError("OrigDstTable is closed")
        key = TupleKey.of(src_ip, src_port, dst_ip, dst_port)
        rec = OrigDstRecord()
        try:
            found = syscall.map_lookup_and_delete(self._fd, key, rec)
        except OSError as exc:
            raise BpfError(
                f"lookup in the original-destination map failed: {exc.strerror}"
            ) from exc
        if not found:
            return None
        if time.monotonic_ns() - rec.created_ns > self.max_age_ns:
            self.stale += 1
            return None
        ip, port = rec.address()
        return OrigDst(ip=ip, port=port, workload_id=rec.workload_id)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OrigDstTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MembershipTable:
    """The membership map (cgroup id -> workload id), read-only, as the proxy
    uses it to tell which workload a local process belongs to."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls, pin_dir: str | os.PathLike[str]) -> MembershipTable:
        return cls(open_pinned(Path(pin_dir) / PIN_WORKLOADS))

    def workload_of(self, cgroup_ids: Iterable[int]) -> int | None:
        """The workload of the first of `cgroup_ids` (a cgroup, then its
        ancestors: capture covers sub-cgroups) that is a member, or None."""
        if self._fd < 0:
            raise BpfError("MembershipTable is closed")
        for cgroup in cgroup_ids:
            info = WorkloadInfo()
            try:
                found = syscall.map_lookup(self._fd, ct.c_uint64(cgroup), info)
            except OSError as exc:
                raise BpfError(f"lookup in the membership map failed: {exc.strerror}") from exc
            if found:
                return int(info.workload_id)
        return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
