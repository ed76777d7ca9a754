"""ctypes mirrors of the structs in meshnode.h, and the pin names.

meshnode.h is the definition; this module repeats it for Python and
tests/unit/bpf/test_layout.py checks, with gcc, that sizes, offsets and pin names agree.
Field names are the C field names. Addresses and ports are stored in network
order, as in the kernel; the constructors and accessors here take and return
plain strings and host-order ints.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import sys
from typing import ClassVar

from meshnode.core.constants import DELIVERY_ADDRESS

# Pin names (meshnode.h: MN_PIN_*), files under the agent's pin directory.
PIN_ORIG_DST = "mn_orig_dst"
PIN_WORKLOADS = "mn_workloads"
PIN_DESTINATIONS = "mn_dests"
PIN_STRICT = "mn_strict"

# Where the node proxy delivers inbound connections from (meshnode.h:
# MN_PROXY_INBOUND_SRC_IP4): the only source a STRICT port accepts.
PROXY_INBOUND_SOURCE = DELIVERY_ADDRESS

# Program names (the C entry functions); the kernel keeps the first 15 bytes.
PROGRAM_NAME_PREFIX = "mn_"


def ip4_to_be(ip: str) -> int:
    """A dotted IPv4 address (or an IPv4-mapped IPv6 one) as the u32 the kernel
    stores in network order, read in host order (what a ctypes c_uint32 holds)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is None:
            raise ValueError(f"not an IPv4 or IPv4-mapped IPv6 address: {ip}")
        addr = addr.ipv4_mapped
    return int.from_bytes(addr.packed, sys.byteorder)


def ip4_from_be(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, sys.byteorder))


def port_to_be(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return socket.htons(port)


def port_from_be(value: int) -> int:
    return socket.ntohs(value)


class CStruct(ct.Structure):
    """Base of the mirrors: C_NAME is the struct's tag in meshnode.h."""

    C_NAME: ClassVar[str] = ""


class DestKey(CStruct):
    """struct mn_dest_key: key of the destinations map; port 0 = any port."""

    C_NAME = "mn_dest_key"
    _fields_ = [("ip4", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]

    @classmethod
    def of(cls, ip: str, port: int) -> DestKey:
        return cls(ip4=ip4_to_be(ip), port=port_to_be(port), pad=0)

    def address(self) -> tuple[str, int]:
        return ip4_from_be(self.ip4), port_from_be(self.port)


class DestInfo(CStruct):
    """struct mn_dest_info: value of the destinations map (reserved flags)."""

    C_NAME = "mn_dest_info"
    _fields_ = [("flags", ct.c_uint32)]


class WorkloadInfo(CStruct):
    """struct mn_workload: value of the membership map (key: u64 cgroup id)."""

    C_NAME = "mn_workload"
    _fields_ = [("workload_id", ct.c_uint32)]

    @classmethod
    def of(cls, workload_id: int) -> WorkloadInfo:
        return cls(workload_id=workload_id)


class StrictKey(CStruct):
    """struct mn_strict_key: key of the STRICT map, a workload's (cgroup, port)."""

    C_NAME = "mn_strict_key"
    _fields_ = [
        ("cgroup_id", ct.c_uint64),
        ("port", ct.c_uint16),
        ("pad", ct.c_uint16 * 3),
    ]

    @classmethod
    def of(cls, cgroup_id: int, port: int) -> StrictKey:
        if not 0 <= cgroup_id < 2**64:
            raise ValueError(f"cgroup id out of range: {cgroup_id}")
        return cls(cgroup_id=cgroup_id, port=port_to_be(port))  # pad: zeroed

    def entry(self) -> tuple[int, int]:
        """(cgroup id, host-order port)."""
        return int(self.cgroup_id), port_from_be(self.port)


class StrictInfo(CStruct):
    """struct mn_strict_info: value of the STRICT map (reserved flags)."""

    C_NAME = "mn_strict_info"
    _fields_ = [("flags", ct.c_uint32)]


class OrigDstRecord(CStruct):
    """struct mn_orig_dst: where a redirected connect() was going, and who made it."""

    C_NAME = "mn_orig_dst"
    _fields_ = [
        ("ip4", ct.c_uint32),
        ("port", ct.c_uint16),
        ("pad", ct.c_uint16),
        ("workload_id", ct.c_uint32),
        ("pad2", ct.c_uint32),
        ("created_ns", ct.c_uint64),
    ]

    @classmethod
    def of(cls, ip: str, port: int, workload_id: int, created_ns: int = 0) -> OrigDstRecord:
        return cls(
            ip4=ip4_to_be(ip),
            port=port_to_be(port),
            pad=0,
            workload_id=workload_id,
            pad2=0,
            created_ns=created_ns,
        )

    def address(self) -> tuple[str, int]:
        return ip4_from_be(self.ip4), port_from_be(self.port)


class TupleKey(CStruct):
    """struct mn_tuple_key: a redirected connection as the proxy sees it."""

    C_NAME = "mn_tuple_key"
    _fields_ = [
        ("src_ip4", ct.c_uint32),
        ("dst_ip4", ct.c_uint32),
        ("src_port", ct.c_uint16),
        ("dst_port", ct.c_uint16),
    ]

    @classmethod
    def of(cls, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> TupleKey:
        """Accepts IPv4 or IPv4-mapped IPv6 strings (a dual-stack listener's view)."""
        return cls(
            src_ip4=ip4_to_be(src_ip),
            dst_ip4=ip4_to_be(dst_ip),
            src_port=port_to_be(src_port),
            dst_port=port_to_be(dst_port),
        )


# Every mirrored struct, for the layout test.
STRUCTS: tuple[type[CStruct], ...] = (
    DestKey,
    DestInfo,
    WorkloadInfo,
    StrictKey,
    StrictInfo,
    OrigDstRecord,
    TupleKey,
)


class ProxyInfo(CStruct):
    """struct mn_proxy_info: value of mn_proxy_cgroups."""

    C_NAME = "mn_proxy_info"
    _fields_ = [("flags", ct.c_uint32)]


class Settings(CStruct):
    """struct mn_settings: mn_settings[0], the switches."""

    C_NAME = "mn_settings"
    _fields_ = [("guard_bind", ct.c_uint32), ("capture_dns", ct.c_uint32)]
