"""Compiles, loads and attaches meshnode's eBPF programs (node agent side, bcc).

    with MeshBpf(Path("/sys/fs/bpf/meshnode")) as mesh:
        mesh.detach_stale(cgroup)       # what a crashed run left attached
        mesh.load()
        mesh.attach(cgroup)             # also pins the maps the proxy reads
        mesh.sync_workloads({cgroup_id(member): 7})
        mesh.sync_destinations({("240.0.0.10", 80)})
        mesh.sync_strict({(cgroup_id(member), 8080)})  # STRICT: only the proxy gets in
        mesh.guard_proxy({cgroup_id(proxy)}, {15001, 15008})  # only it binds 127.0.0.6
        ...

bcc is imported only by load(), so importing this module needs no bcc, and
attached_programs()/detach_stale() work without it (they use bpf(2) directly).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from meshnode.core.constants import DNS_PROXY_PORT

from . import syscall
from .cgroups import cgroup2_mount
from .errors import BpfError, MapFullError
from .layout import (
    PIN_DESTINATIONS,
    PIN_ORIG_DST,
    PIN_STRICT,
    PIN_WORKLOADS,
    PROGRAM_NAME_PREFIX,
    DestInfo,
    DestKey,
    ProxyInfo,
    Settings,
    StrictInfo,
    StrictKey,
    WorkloadInfo,
)

__all__ = ["BpfError", "MeshBpf"]

_BPF_DIR = Path(__file__).resolve().parent
# members.c first: the helpers the others share; then one file per attach point.
_SOURCES = ("members.c", "connect.c", "dns.c", "sockops.c", "ingress.c", "bind.c")
_BPFFS_DEFAULT = Path("/sys/fs/bpf")

# bpf_prog_type values
_PROG_CGROUP_SKB = 8
_PROG_CGROUP_SOCK_ADDR = 18
_PROG_SOCK_OPS = 13


@dataclass(frozen=True)
class _Program:
    name: str  # C function name = kernel program name (<= 15 bytes)
    prog_type: int
    attach_type: int
    label: str  # bpftool's name for the attach type


_PROGRAMS = (
    _Program("mn_connect4", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_INET4_CONNECT, "connect4"),
    _Program("mn_connect6", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_INET6_CONNECT, "connect6"),
    _Program("mn_sockops", _PROG_SOCK_OPS, syscall.BPF_CGROUP_SOCK_OPS, "sock_ops"),
    _Program("mn_ingress", _PROG_CGROUP_SKB, syscall.BPF_CGROUP_INET_INGRESS, "ingress"),
    _Program("mn_bind4", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_INET4_BIND, "bind4"),
    _Program("mn_bind6", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_INET6_BIND, "bind6"),
    _Program("mn_sendmsg4", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
    _Program("mn_sendmsg6", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"),
    _Program("mn_recvmsg4", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_UDP4_RECVMSG, "recvmsg4"),
    _Program("mn_recvmsg6", _PROG_CGROUP_SOCK_ADDR, syscall.BPF_CGROUP_UDP6_RECVMSG, "recvmsg6"),
)
# Maps only the agent writes (not pinned): map name in meshnode.h.
_PRIVATE_MAPS = ("mn_proxy_cgroups", "mn_guarded_ports", "mn_settings", "mn_dns_asked")
_ATTACH_LABELS = {p.attach_type: p.label for p in _PROGRAMS}

# Maps pinned by attach(): pin name -> map name in meshnode.h.
_PINNED_MAPS = {
    PIN_ORIG_DST: "mn_orig_dst",
    PIN_WORKLOADS: "mn_workloads",
    PIN_DESTINATIONS: "mn_dests",
    PIN_STRICT: "mn_strict",
}


def _open_cgroup(cgroup_path: str | os.PathLike[str]) -> int:
    try:
        return os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as exc:
        raise BpfError(
            f"cgroup {cgroup_path} does not exist (cgroup v2 is mounted at {_cgroup2_hint()})"
        ) from exc
    except OSError as exc:
        raise BpfError(f"cannot open cgroup {cgroup_path}: {exc.strerror}") from exc


def _cgroup2_hint() -> str:
    try:
        return str(cgroup2_mount())
    except BpfError:
        return "nowhere: no cgroup2 mount in /proc/mounts"


def _mount_point_of(path: Path) -> tuple[Path, str] | None:
    """(mount point, fs type) of the mount holding path, from /proc/mounts."""
    best: tuple[Path, str] | None = None
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = Path(fields[1].replace("\\040", " "))
            if (path == point or point in path.parents) and (
                best is None or len(point.parts) >= len(best[0].parts)
            ):
                best = (point, fields[2])
    return best


def _ensure_bpffs(pin_dir: Path) -> None:
    """Mounts bpffs at /sys/fs/bpf if pin_dir is there and nothing is mounted, and
    refuses a pin_dir that is not on a bpffs."""
    pin_dir = pin_dir.absolute()
    found = _mount_point_of(pin_dir)
    if (found is None or found[1] != "bpf") and (
        pin_dir == _BPFFS_DEFAULT or _BPFFS_DEFAULT in pin_dir.parents
    ):
        libc = ct.CDLL(None, use_errno=True)
        target = os.fsencode(_BPFFS_DEFAULT)
        if libc.mount(b"bpf", target, b"bpf", 0, None) != 0:
            err = ct.get_errno()
            raise BpfError(
                f"bpffs is not mounted at {_BPFFS_DEFAULT} and mounting it failed: "
                f"{os.strerror(err)}; run `mount -t bpf bpf {_BPFFS_DEFAULT}` as root"
            )
        found = _mount_point_of(pin_dir)
    if found is None or found[1] != "bpf":
        raise BpfError(
            f"pin directory {pin_dir} is not on a bpf filesystem; use a directory under "
            f"{_BPFFS_DEFAULT} (mount it with `mount -t bpf bpf {_BPFFS_DEFAULT}`)"
        )


def _kernel_build_dir() -> Path:
    return Path("/lib/modules") / os.uname().release / "build"


class MeshBpf:
    """meshnode's cgroup programs (connect4, connect6, sockops, ingress, bind4,
    bind6) and their maps."""

    def __init__(
        self,
        pin_dir: Path,
        proxy_ip: str = "127.0.0.1",
        proxy_port: int = 15001,
        dns_ip: str = "127.0.0.1",
        dns_port: int = DNS_PROXY_PORT,
    ) -> None:
        try:
            ip = ipaddress.ip_address(proxy_ip)
        except ValueError as exc:
            raise BpfError(f"proxy address {proxy_ip!r} is not an IP address") from exc
        if not isinstance(ip, ipaddress.IPv4Address):
            raise BpfError(f"proxy address {proxy_ip} must be IPv4 (connect6 uses ::ffff:{ip})")
        if not 0 < proxy_port < 65536:
            raise BpfError(f"proxy port {proxy_port} is out of range 1-65535")
        try:
            dns = ipaddress.IPv4Address(dns_ip)
        except ValueError as exc:
            raise BpfError(f"DNS proxy address {dns_ip!r} is not an IPv4 address") from exc
        if not 0 < dns_port < 65536 or dns_port == 53:
            raise BpfError(f"DNS proxy port {dns_port} must be in 1-65535 and not 53")
        self.pin_dir = Path(pin_dir)
        self.proxy_ip = str(ip)
        self.proxy_port = proxy_port
        self.dns_ip = str(dns)
        self.dns_port = dns_port
        self._settings = Settings(guard_bind=0, capture_dns=0)
        self._bpf: Any = None  # bcc.BPF once loaded
        self._prog_fds: dict[str, int] = {}  # program name -> fd (owned by bcc)
        self._map_fds: dict[str, int] = {}  # map name -> fd (owned by bcc)
        self._max_entries: dict[str, int] = {}  # map name -> max entries
        self._cgroup_fd = -1
        self._cgroup_path: Path | None = None
        self._attached: list[_Program] = []
        self._pins: list[Path] = []

    # -- lifecycle ---------------------------------------------------------------

    def load(self) -> None:
        """Compiles the programs with bcc and loads them into the kernel."""
        if self._bpf is not None:
            return
        try:
            from bcc import BPF
        except ImportError as exc:
            raise BpfError(
                "cannot load BPF programs: the bcc Python module is not importable "
                "(Debian package python3-bpfcc); run scripts/setup.sh"
            ) from exc
        build = _kernel_build_dir()
        if not (build / "include").is_dir():
            raise BpfError(
                f"cannot compile BPF programs: kernel headers missing at {build}; "
                "run scripts/setup.sh"
            )
        text = "\n".join((_BPF_DIR / src).read_text() for src in _SOURCES)
        cflags = [
            f"-I{_BPF_DIR}",
            f"-DMN_PROXY_IP4={int(ipaddress.IPv4Address(self.proxy_ip)):#010x}u",
            f"-DMN_PROXY_PORT={self.proxy_port}",
            f"-DMN_DNS_IP4={int(ipaddress.IPv4Address(self.dns_ip)):#010x}u",
            f"-DMN_DNS_PORT={self.dns_port}",
        ]
        try:
            bpf = BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception
            raise BpfError(
                f"cannot compile BPF programs ({exc}); the compiler's messages are above. "
                f"Kernel headers in use: {build} -> {build.resolve()}; if they are "
                "missing or broken, run scripts/setup.sh"
            ) from exc
        try:
            for prog in _PROGRAMS:
                try:
                    fn = bpf.load_func(
                        prog.name.encode(), prog.prog_type, attach_type=prog.attach_type
                    )
                except Exception as exc:
                    raise BpfError(
                        f"the kernel refused BPF program {prog.name} ({exc}); the verifier "
                        'log, if any, is above ("Permission denied" then means the verifier '
                        "rejected it). Loading needs root (CAP_BPF and CAP_NET_ADMIN)"
                    ) from exc
                self._prog_fds[prog.name] = fn.fd
            for name in (*_PINNED_MAPS.values(), *_PRIVATE_MAPS):
                table = bpf.get_table(name.encode())
                self._map_fds[name] = table.map_fd
                self._max_entries[name] = int(table.max_entries)
        except BaseException:
            bpf.cleanup()
            self._prog_fds.clear()
            self._map_fds.clear()
            raise
        self._bpf = bpf

    def attach(self, cgroup_path: str | os.PathLike[str]) -> None:
        """Pins the maps under pin_dir, then attaches the programs at the
        cgroup with BPF_F_ALLOW_MULTI (so others' programs there keep running)."""
        if self._bpf is None:
            raise BpfError("attach() before load(): call load() first")
        if self._cgroup_fd >= 0:
            raise BpfError(f"already attached at {self._cgroup_path}; detach() first")
        cgroup_fd = _open_cgroup(cgroup_path)
        self._cgroup_fd = cgroup_fd
        self._cgroup_path = Path(cgroup_path)
        try:
            self._pin_maps()
            for prog in _PROGRAMS:
                try:
                    syscall.prog_attach(
                        cgroup_fd,
                        self._prog_fds[prog.name],
                        prog.attach_type,
                        syscall.BPF_F_ALLOW_MULTI,
                    )
                except OSError as exc:
                    raise BpfError(
                        f"cannot attach {prog.name} at cgroup {cgroup_path}: {exc.strerror}"
                        + (
                            "; is it a cgroup v2 directory? (cgroup v2 is mounted at "
                            f"{_cgroup2_hint()})"
                            if exc.errno in (errno.EBADF, errno.EINVAL)
                            else ""
                        )
                    ) from exc
                self._attached.append(prog)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Detaches what attach() attached and removes the pins. Idempotent."""
        problems: list[str] = []
        for prog in reversed(self._attached):
            try:
                syscall.prog_detach(self._cgroup_fd, self._prog_fds[prog.name], prog.attach_type)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # someone else detached it already
                    problems.append(f"{prog.name}: {exc.strerror}")
        self._attached.clear()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        self._unpin_maps()
        if problems:
            raise BpfError(
                f"could not detach from {self._cgroup_path}: {'; '.join(problems)}; "
                f"check with `bpftool cgroup show {self._cgroup_path}`"
            )
        self._cgroup_path = None

    def close(self) -> None:
        """detach(), then unloads the programs and frees the maps."""
        try:
            self.detach()
        finally:
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None
            self._prog_fds.clear()
            self._map_fds.clear()

    def __enter__(self) -> MeshBpf:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- pins ----------------------------------------------------------------------

    def _pin_maps(self) -> None:
        _ensure_bpffs(self.pin_dir)
        if not self.pin_dir.exists():
            try:
                self.pin_dir.mkdir(parents=True)
            except OSError as exc:
                raise BpfError(f"cannot create pin directory {self.pin_dir}: {exc}") from exc
        for pin_name, map_name in _PINNED_MAPS.items():
            path = self.pin_dir / pin_name
            # A pin left by a previous run of ours would make BPF_OBJ_PIN fail with
            # EEXIST; the proxy should see this run's map, so replace it.
            path.unlink(missing_ok=True)
            try:
                syscall.obj_pin(self._map_fds[map_name], str(path))
            except OSError as exc:
                raise BpfError(f"cannot pin map {map_name} at {path}: {exc.strerror}") from exc
            self._pins.append(path)

    def _unpin_maps(self) -> None:
        for path in self._pins:
            path.unlink(missing_ok=True)
        if self._pins:
            self._pins.clear()
            # The pin directory is meshnode's; remove it once empty (whether this run
            # or a crashed one created it). Anything else in it keeps it.
            with contextlib.suppress(OSError):
                self.pin_dir.rmdir()

    # -- maps ----------------------------------------------------------------------

    def _map_fd(self, name: str) -> int:
        if self._bpf is None:
            raise BpfError("the BPF maps exist only after load(): call load() first")
        return self._map_fds[name]

    def _check_room(self, name: str, wanted: int, what: str) -> None:
        """Refuses, before writing anything, a set larger than the map: a sync
        that failed half way would leave the map neither old nor new."""
        limit = self._max_entries.get(name, 0)
        if limit and wanted > limit:
            raise MapFullError(
                f"the {what} map ({name}) holds at most {limit} entries and this node "
                f"needs {wanted}: the new set was NOT applied, the previous one stays. "
                f"Run fewer {what} entries on this node, or raise the limit in "
                "bpf/meshnode.h and rebuild"
            )

    def map_capacity(self) -> dict[str, int]:
        """Map name -> max entries, for status and checks."""
        return dict(self._max_entries)

    def sync_workloads(self, mapping: Mapping[int, int]) -> None:
        """Makes the membership map equal mapping: cgroup id -> workload id."""
        fd = self._map_fd("mn_workloads")
        self._check_room("mn_workloads", len(mapping), "workload")
        for cgroup, workload in mapping.items():
            if not 0 <= cgroup < 2**64 or not 0 <= workload < 2**32:
                raise BpfError(f"bad workload entry {cgroup} -> {workload}: out of range")
        try:
            for key in syscall.map_keys(fd, ct.c_uint64):
                if key.value not in mapping:
                    syscall.map_delete(fd, key)
            for cgroup, workload in mapping.items():
                syscall.map_update(fd, ct.c_uint64(cgroup), WorkloadInfo.of(workload))
        except OSError as exc:
            raise BpfError(f"cannot update the workload map: {exc.strerror}") from exc

    def sync_destinations(self, dests: Iterable[tuple[str, int]]) -> None:
        """Makes the destinations map equal dests: (IPv4, port), port 0 = any port."""
        fd = self._map_fd("mn_dests")
        try:
            wanted = {(k.ip4, k.port): k for k in (DestKey.of(ip, port) for ip, port in dests)}
        except ValueError as exc:
            raise BpfError(f"bad destination: {exc}") from exc
        self._check_room("mn_dests", len(wanted), "capture destination")
        try:
            for key in syscall.map_keys(fd, DestKey):
                assert isinstance(key, DestKey)
                if (key.ip4, key.port) not in wanted:
                    syscall.map_delete(fd, key)
            for key in wanted.values():
                syscall.map_update(fd, key, DestInfo(flags=0))
        except OSError as exc:
            raise BpfError(f"cannot update the destinations map: {exc.strerror}") from exc

    def sync_strict(self, entries: Iterable[tuple[int, int]]) -> None:
        """Makes the STRICT map equal entries: (cgroup id, port) pairs whose TCP
        listeners only the node proxy may reach (from 127.0.0.6 over loopback).
        Every other pair is PERMISSIVE."""
        fd = self._map_fd("mn_strict")
        wanted: dict[tuple[int, int], StrictKey] = {}
        for entry in entries:
            try:
                cgroup, port = entry
                if not 0 <= cgroup < 2**64:
                    raise ValueError(f"cgroup id out of range: {cgroup}")
                if not 0 < port <= 0xFFFF:
                    raise ValueError(f"port out of range: {port}")
                key = StrictKey.of(cgroup, port)
            except (TypeError, ValueError) as exc:
                raise BpfError(f"bad STRICT entry {entry!r}: {exc}") from exc
            wanted[(key.cgroup_id, key.port)] = key
        self._check_room("mn_strict", len(wanted), "STRICT")
        try:
            for old in syscall.map_keys(fd, StrictKey):
                assert isinstance(old, StrictKey)
                if (old.cgroup_id, old.port) not in wanted:
                    syscall.map_delete(fd, old)
            for new in wanted.values():
                syscall.map_update(fd, new, StrictInfo(flags=0))
        except OSError as exc:
            raise BpfError(f"cannot update the STRICT map: {exc.strerror}") from exc

    def guard_proxy(self, proxy_cgroups: Iterable[int], ports: Iterable[int]) -> None:
        """From now on only processes in `proxy_cgroups` (cgroup ids; their
        sub-cgroups too) may bind the delivery address 127.0.0.6 or any of
        `ports` (the proxy's listeners), on any address. Everyone else's bind()
        fails with EPERM. Call again to change the sets; the guard stays on."""
        cgroups = set(proxy_cgroups)
        wanted_ports = set(ports)
        for cgroup in cgroups:
            if not 0 < cgroup < 2**64:
                raise BpfError(f"bad proxy cgroup id {cgroup}: out of range")
        for port in wanted_ports:
            if not 0 < port <= 0xFFFF:
                raise BpfError(f"bad guarded port {port}: out of range 1-65535")
        if not cgroups:
            raise BpfError(
                "guard_proxy() needs the proxy's cgroup: with none, nothing could "
                "bind the proxy's address and ports"
            )
        cg_fd = self._map_fd("mn_proxy_cgroups")
        port_fd = self._map_fd("mn_guarded_ports")
        try:
            for key in syscall.map_keys(cg_fd, ct.c_uint64):
                if key.value not in cgroups:
                    syscall.map_delete(cg_fd, key)
            for cgroup in cgroups:
                syscall.map_update(cg_fd, ct.c_uint64(cgroup), ProxyInfo(flags=0))
            wanted_be = {socket.htons(p) for p in wanted_ports}
            for key in syscall.map_keys(port_fd, ct.c_uint16):
                if key.value not in wanted_be:
                    syscall.map_delete(port_fd, key)
            for port_be in wanted_be:
                syscall.map_update(port_fd, ct.c_uint16(port_be), ct.c_uint32(1))
        except OSError as exc:
            raise BpfError(f"cannot update the proxy guard maps: {exc.strerror}") from exc
        self._set(guard_bind=1)

    def unguard(self) -> None:
        """Switches the bind guard off again (tests; a lab being torn down)."""
        self._set(guard_bind=0)

    def capture_dns(self, on: bool = True) -> None:
        """Mesh workloads' DNS (UDP and TCP to port 53) goes to the DNS proxy at
        dns_ip:dns_port while on; other processes' DNS is never touched. Guard the
        DNS proxy's port with guard_proxy() too, so nothing else can take it."""
        self._set(capture_dns=1 if on else 0)

    def _set(self, **switches: int) -> None:
        for name, value in switches.items():
            setattr(self._settings, name, value)
        try:
            syscall.map_update(self._map_fd("mn_settings"), ct.c_uint32(0), self._settings)
        except OSError as exc:
            raise BpfError(f"cannot update the settings map: {exc.strerror}") from exc

    # -- what is attached ------------------------------------------------------------

    @staticmethod
    def attached_programs(cgroup_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Programs attached directly at the cgroup for connect4, connect6, sockops and
        ingress (ours and others'): [{"name", "id", "attach_type"}]."""
        cgroup_fd = _open_cgroup(cgroup_path)
        try:
            return [
                {"name": name, "id": prog_id, "attach_type": _ATTACH_LABELS[attach_type]}
                for attach_type, prog_id, name in _query_cgroup(cgroup_fd)
            ]
        finally:
            os.close(cgroup_fd)

    def detach_stale(self, cgroup_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Detaches programs named mn_* that a previous run attached at the cgroup
        (cgroup attachments outlive the process that made them). Leaves this
        instance's own and everybody else's programs alone. Returns what it detached."""
        own_ids = set()
        for fd in self._prog_fds.values():
            own_ids.add(syscall.prog_info(fd)[0])
        cgroup_fd = _open_cgroup(cgroup_path)
        detached: list[dict[str, Any]] = []
        try:
            for attach_type, prog_id, name in _query_cgroup(cgroup_fd):
                if not name.startswith(PROGRAM_NAME_PREFIX) or prog_id in own_ids:
                    continue
                try:
                    prog_fd = syscall.prog_get_fd_by_id(prog_id)
                except FileNotFoundError:
                    continue  # went away meanwhile
                except OSError as exc:
                    raise BpfError(
                        f"cannot open stale program {name} (id {prog_id}): {exc.strerror}"
                    ) from exc
                try:
                    syscall.prog_detach(cgroup_fd, prog_fd, attach_type)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise BpfError(
                        f"cannot detach stale program {name} (id {prog_id}) from "
                        f"{cgroup_path}: {exc.strerror}; try `bpftool cgroup detach "
                        f"{cgroup_path} {_ATTACH_LABELS[attach_type]} id {prog_id}`"
                    ) from exc
                finally:
                    os.close(prog_fd)
                detached.append(
                    {"name": name, "id": prog_id, "attach_type": _ATTACH_LABELS[attach_type]}
                )
        finally:
            os.close(cgroup_fd)
        return detached


def _query_cgroup(cgroup_fd: int) -> list[tuple[int, int, str]]:
    """(attach type, program id, program name) attached directly at the cgroup."""
    found: list[tuple[int, int, str]] = []
    for prog in _PROGRAMS:
        try:
            ids = syscall.prog_query(cgroup_fd, prog.attach_type)
        except OSError as exc:
            raise BpfError(f"cannot list BPF programs of the cgroup: {exc.strerror}") from exc
        for prog_id in ids:
            try:
                fd = syscall.prog_get_fd_by_id(prog_id)
            except FileNotFoundError:
                continue  # detached and freed since the query
            except OSError as exc:
                raise BpfError(f"cannot open BPF program id {prog_id}: {exc.strerror}") from exc
            try:
                name = syscall.prog_info(fd)[1]
            finally:
                os.close(fd)
            found.append((prog.attach_type, prog_id, name))
    return found
