"""The few bpf(2) commands meshnode needs, through ctypes; no bcc.

The proxy imports this (through meshnode.bpf.pinned), so it must stay light. Each
function raises OSError with the kernel's errno; callers add the context.
Attribute layouts follow `union bpf_attr` in include/uapi/linux/bpf.h; a smaller
attr than the kernel's is fine, the kernel zero-fills the rest.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
from typing import Any

# bpf(2) syscall numbers.
_NR_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21

# enum bpf_attach_type (the ones meshnode uses)
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20

BPF_F_ALLOW_MULTI = 2
BPF_ANY = 0

_ENOTSUPP = 524  # the kernel-internal "not supported", leaks to userspace from bpf(2)

# What a map key or value may be: a ctypes struct or scalar.
CValue = ct.Structure | ct.c_uint64 | ct.c_uint32 | ct.c_uint16

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class _MapElemAttr(ct.Structure):
    _fields_ = [
        ("map_fd", ct.c_uint32),
        ("pad0", ct.c_uint32),
        ("key", ct.c_uint64),
        ("value", ct.c_uint64),  # or next_key
        ("flags", ct.c_uint64),
    ]


class _ObjAttr(ct.Structure):
    _fields_ = [
        ("pathname", ct.c_uint64),
        ("bpf_fd", ct.c_uint32),
        ("file_flags", ct.c_uint32),
    ]


class _AttachAttr(ct.Structure):
    _fields_ = [
        ("target_fd", ct.c_uint32),
        ("attach_bpf_fd", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("attach_flags", ct.c_uint32),
    ]


class _GetIdAttr(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _QueryAttr(ct.Structure):
    _fields_ = [
        ("target_fd", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("query_flags", ct.c_uint32),
        ("attach_flags", ct.c_uint32),
        ("prog_ids", ct.c_uint64),
        ("prog_cnt", ct.c_uint32),
    ]


class _ProgInfo(ct.Structure):
    """The head of struct bpf_prog_info, up to and including name."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    ]


def _bpf(cmd: int, attr: Any) -> int:
    machine = platform.machine()
    nr = _NR_BPF.get(machine)
    if nr is None:
        raise OSError(f"bpf(2): unsupported architecture {machine}")
    ret = _libc.syscall(nr, cmd, ct.byref(attr), ct.sizeof(attr))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _addr(obj: CValue) -> int:
    return ct.addressof(obj)


def obj_get(path: str) -> int:
    """BPF_OBJ_GET: a new fd for the object pinned at path."""
    name = ct.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(name)))


def obj_pin(fd: int, path: str) -> None:
    """BPF_OBJ_PIN: pin fd's object at path (which must be in a bpffs)."""
    name = ct.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(name), bpf_fd=fd))


def map_lookup(fd: int, key: CValue, value: CValue) -> bool:
    """Fills value; False if key is absent."""
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))
    except FileNotFoundError:
        return False
    return True


def map_update(fd: int, key: CValue, value: CValue, flags: int = BPF_ANY) -> None:
    _bpf(
        BPF_MAP_UPDATE_ELEM,
        _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags),
    )


def map_delete(fd: int, key: CValue) -> bool:
    """False if key was absent."""
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key)))
    except FileNotFoundError:
        return False
    return True


def map_lookup_and_delete(fd: int, key: CValue, value: CValue) -> bool:
    """Atomically fills value and deletes key (hash maps: kernel 5.14+); False if
    absent. Falls back to lookup, then delete, on kernels without it."""
    try:
        _bpf(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)),
        )
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
            raise
        # Only one consumer deletes a given tuple, so the gap is harmless.
        return map_lookup(fd, key, value) and map_delete(fd, key)
    return True


def map_keys(fd: int, key_type: type[CValue]) -> list[CValue]:
    """All keys of a hash map (a snapshot; concurrent changes may be missed)."""
    keys: list[CValue] = []
    cur: CValue | None = None
    while True:
        nxt = key_type()
        attr = _MapElemAttr(map_fd=fd, key=0 if cur is None else _addr(cur), value=_addr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except FileNotFoundError:
            return keys
        keys.append(nxt)
        cur = nxt


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    _bpf(
        BPF_PROG_ATTACH,
        _AttachAttr(
            target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags
        ),
    )


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(
        BPF_PROG_DETACH,
        _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type),
    )


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to target_fd (a cgroup) for attach_type."""
    cap = 64
    while True:
        ids = (ct.c_uint32 * cap)()
        attr = _QueryAttr(
            target_fd=target_fd, attach_type=attach_type, prog_ids=ct.addressof(ids), prog_cnt=cap
        )
        try:
            _bpf(BPF_PROG_QUERY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and attr.prog_cnt > cap:  # more than cap
                cap = attr.prog_cnt
                continue
            raise
        return list(ids[: attr.prog_cnt])


def prog_get_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id))


def prog_info(prog_fd: int) -> tuple[int, str]:
    """(id, name) of a program; the kernel keeps at most 15 bytes of the name."""
    info = _ProgInfo()
    _bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=prog_fd, info_len=ct.sizeof(info), info=ct.addressof(info)),
    )
    return int(info.id), info.name.decode(errors="replace")
