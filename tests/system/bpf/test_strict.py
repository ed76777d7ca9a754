"""STRICT mode in the kernel: mn_ingress lets only the node proxy's source address
(127.0.0.6, over loopback) reach a workload's STRICT ports. Needs root, cgroup v2
and eBPF; all traffic stays inside network namespaces made for the test.

Layout: netns A holds the workload (a server in cgroup <parent>/workload listening
on 0.0.0.0:STRICT_PORT, 0.0.0.0:OPEN_PORT and the dual-stack [::]:DUAL_PORT) and a
node address; netns B, joined to A by a veth pair, holds a server
of cgroup <parent>/other on the same STRICT_PORT. The programs are attached at
<parent>.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshnode.bpf import syscall
from meshnode.bpf.cgroups import cgroup2_mount, cgroup_id
from meshnode.bpf.errors import BpfError, MapFullError
from meshnode.bpf.layout import PIN_STRICT, PROXY_INBOUND_SOURCE, StrictKey
from meshnode.bpf.loader import MeshBpf
from meshnode.bpf.pinned import open_pinned
from tests.support.bpf import (
    MESH_PROGRAM_NAMES,
    MESH_PROGRAMS,
    bpftool_cgroup_names,
    ebpf_missing,
    in_netns,
    prog_gone,
    remove_cgroup,
    unique,
)

pytestmark = pytest.mark.root

PROXY_PORT = 15001
STRICT_PORT = 8080
OPEN_PORT = 8081  # the same workload's port that is never STRICT
SUB_PORT = 8083  # a server in a sub-cgroup of the workload
DUAL_PORT = 8082  # an AF_INET6 dual-stack listener: v4 peers arrive as ::ffff:a.b.c.d
NODE_IP = "192.0.2.1"  # the node's own address (a second address of A's veth end)
VETH_A, VETH_B = "198.51.100.1", "198.51.100.2"  # the "wire" between A and B
REFUSED_WAIT = 1.0  # how long a dropped connect is given (the SYN retry is at 1 s)


@pytest.fixture(scope="module", autouse=True)
def _require_ebpf() -> None:
    reason = ebpf_missing(ipv6=True)
    if reason:
        print(f"skipping STRICT-mode tests: {reason}")
        pytest.skip(reason)


# -- helpers -------------------------------------------------------------------------


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


def sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "sysctl", "-qw", f"{key}={value}"], check=True
    )


SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    name, specs = sys.argv[1], sys.argv[2:]
    def serve(s):
        while True:
            conn, peer = s.accept()
            conn.sendall(f"{name} {s.getsockname()[1]} {peer[0]}".encode())
            conn.close()
    for spec in specs:
        host, port = spec.rsplit(":", 1)
        if host.startswith("["):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            host = host[1:-1]
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen(64)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    """
)


def start_server(netns: str, cgroup: Path, name: str, *specs: str) -> subprocess.Popen[str]:
    """A TCP server in netns and cgroup (its sockets belong to that cgroup) that
    answers each connection with "<name> <local port> <peer ip>"."""
    procs = cgroup / "cgroup.procs"

    def join_cgroup() -> None:
        procs.write_text("0")

    # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup fs.
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", SERVER, name, *specs],
        preexec_fn=join_cgroup,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        stop_server(proc)
        raise AssertionError(f"server {name} did not start: {line!r}")
    return proc


def stop_server(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def talk(netns: str, dst: str, port: int, src: str | None = None) -> str | None:
    """Connects from netns (optionally bound to src) and returns the server's
    answer, or None if no answer came within REFUSED_WAIT."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(REFUSED_WAIT)
        if src is not None:
            sock.bind((src, 0))
        sock.connect((dst, port))
        answer = sock.recv(200).decode()
        return answer or None
    except OSError:  # includes TimeoutError
        return None
    finally:
        sock.close()


# -- the environment ---------------------------------------------------------------


@dataclass
class Env:
    ns_a: str
    ns_b: str
    parent: Path
    workload: Path
    other: Path
    pin_dir: Path
    mesh: MeshBpf

    @property
    def wl_id(self) -> int:
        return cgroup_id(self.workload)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    ns_a, ns_b = unique("mn-test-a"), unique("mn-test-b")
    parent = cgroup2_mount() / unique("mn-test")
    pin_dir = Path("/sys/fs/bpf") / unique("mn-test")
    workload, other = parent / "workload", parent / "other"
    servers: list[subprocess.Popen[str]] = []
    mesh = MeshBpf(pin_dir, proxy_port=PROXY_PORT)
    prog_ids: list[int] = []
    made_ns: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made_ns.append(ns)
            ip(ns, "link", "set", "lo", "up")
        # (No dummy link: not every kernel has the module; the veth does both jobs.)
        ip(ns_a, "link", "add", "mn-wire", "type", "veth", "peer", "name", "mn-wire", "netns", ns_b)
        ip(ns_a, "addr", "add", f"{VETH_A}/24", "dev", "mn-wire")
        ip(ns_a, "addr", "add", f"{NODE_IP}/32", "dev", "mn-wire")
        ip(ns_b, "addr", "add", f"{VETH_B}/24", "dev", "mn-wire")
        ip(ns_a, "link", "set", "mn-wire", "up")
        ip(ns_b, "link", "set", "mn-wire", "up")
        for path in (parent, workload, other):
            path.mkdir()
        mesh.load()
        mesh.attach(parent)
        prog_ids = [p["id"] for p in MeshBpf.attached_programs(parent)]
        servers.append(
            start_server(
                ns_a,
                workload,
                "workload",
                f"0.0.0.0:{STRICT_PORT}",
                f"0.0.0.0:{OPEN_PORT}",
                f"[::]:{DUAL_PORT}",
            )
        )
        servers.append(start_server(ns_b, other, "other", f"0.0.0.0:{STRICT_PORT}"))
        yield Env(ns_a, ns_b, parent, workload, other, pin_dir, mesh)
    finally:
        for proc in servers:
            stop_server(proc)
        mesh.close()
        leftover = MeshBpf.attached_programs(parent) if parent.exists() else []
        bpftool_left = bpftool_cgroup_names(parent) if parent.exists() else []
        for path in (workload, other, parent):
            remove_cgroup(path)
        for ns in made_ns:  # deleting a netns removes its links (the veth pair too)
            subprocess.run(["ip", "netns", "del", ns], check=True)
    # Nothing of ours may be left.
    assert leftover == []
    assert not any(name.startswith("mn_") for name in bpftool_left), bpftool_left
    assert not pin_dir.exists()
    assert not parent.exists()
    assert not any(Path(f"/run/netns/{ns}").exists() for ns in (ns_a, ns_b))
    assert all(prog_gone(i) for i in prog_ids), "programs still loaded after close()"


@pytest.fixture
def permissive_after(env: Env) -> Iterator[None]:
    """Whatever a test made STRICT is PERMISSIVE again afterwards."""
    yield
    env.mesh.sync_strict(set())


def strict_entries(env: Env) -> set[tuple[int, int]]:
    """The STRICT map's contents, read through its pin as another process would."""
    fd = open_pinned(env.pin_dir / PIN_STRICT)
    try:
        keys = syscall.map_keys(fd, StrictKey)
    finally:
        os.close(fd)
    return {k.entry() for k in keys if isinstance(k, StrictKey)}


def answered(answer: str | None, server: str, port: int, peer: str) -> bool:
    return answer == f"{server} {port} {peer}"


# -- tests ---------------------------------------------------------------------------


def test_ingress_is_attached_and_strict_map_pinned(env: Env) -> None:
    attached = sorted((p["name"], p["attach_type"]) for p in MeshBpf.attached_programs(env.parent))
    assert attached == MESH_PROGRAMS
    names = bpftool_cgroup_names(env.parent)
    if names:  # bpftool installed: it agrees
        assert sorted(names) == MESH_PROGRAM_NAMES
    assert strict_entries(env) == set()


def test_permissive_lets_everyone_in(env: Env) -> None:
    a = env.ns_a
    assert answered(talk(a, "127.0.0.1", STRICT_PORT), "workload", STRICT_PORT, "127.0.0.1")
    assert answered(talk(a, NODE_IP, STRICT_PORT, src=NODE_IP), "workload", STRICT_PORT, NODE_IP)
    assert answered(
        talk(a, "127.0.0.1", STRICT_PORT, src=PROXY_INBOUND_SOURCE),
        "workload",
        STRICT_PORT,
        PROXY_INBOUND_SOURCE,
    )
    # Over the wire from netns B too.
    assert answered(talk(env.ns_b, VETH_A, STRICT_PORT), "workload", STRICT_PORT, VETH_B)
    assert answered(talk(a, "127.0.0.1", DUAL_PORT), "workload", DUAL_PORT, "::ffff:127.0.0.1")
    assert answered(talk(a, "::1", DUAL_PORT), "workload", DUAL_PORT, "::1")


@pytest.mark.usefixtures("permissive_after")
def test_strict_admits_only_the_proxy_source(env: Env) -> None:
    a, wl = env.ns_a, env.wl_id
    env.mesh.sync_strict({(wl, STRICT_PORT), (wl, DUAL_PORT)})
    assert strict_entries(env) == {(wl, STRICT_PORT), (wl, DUAL_PORT)}

    # Plaintext from the node itself, from its address, and from the wire: dropped.
    assert talk(a, "127.0.0.1", STRICT_PORT) is None
    assert talk(a, NODE_IP, STRICT_PORT, src=NODE_IP) is None
    assert talk(a, NODE_IP, STRICT_PORT) is None
    assert talk(env.ns_b, VETH_A, STRICT_PORT) is None
    # The proxy's source gets through, to loopback and to the node address.
    assert answered(
        talk(a, "127.0.0.1", STRICT_PORT, src=PROXY_INBOUND_SOURCE),
        "workload",
        STRICT_PORT,
        PROXY_INBOUND_SOURCE,
    )
    assert answered(
        talk(a, NODE_IP, STRICT_PORT, src=PROXY_INBOUND_SOURCE),
        "workload",
        STRICT_PORT,
        PROXY_INBOUND_SOURCE,
    )
    # Another address on loopback is not the proxy.
    assert talk(a, "127.0.0.1", STRICT_PORT, src="127.0.0.7") is None

    # The dual-stack listener: IPv4 peers are checked the same way; native IPv6
    # cannot be the proxy, so it is dropped (fail closed).
    assert talk(a, "127.0.0.1", DUAL_PORT) is None
    assert answered(
        talk(a, "127.0.0.1", DUAL_PORT, src=PROXY_INBOUND_SOURCE),
        "workload",
        DUAL_PORT,
        f"::ffff:{PROXY_INBOUND_SOURCE}",
    )
    assert talk(a, "::1", DUAL_PORT) is None

    # The same workload's other port, and another cgroup's server on the same
    # port number (netns B), are untouched.
    assert answered(talk(a, "127.0.0.1", OPEN_PORT), "workload", OPEN_PORT, "127.0.0.1")
    assert answered(talk(env.ns_b, "127.0.0.1", STRICT_PORT), "other", STRICT_PORT, "127.0.0.1")

    # Back to PERMISSIVE: everyone is let in again.
    env.mesh.sync_strict(set())
    assert strict_entries(env) == set()
    assert answered(talk(a, "127.0.0.1", STRICT_PORT), "workload", STRICT_PORT, "127.0.0.1")
    assert answered(talk(a, "::1", DUAL_PORT), "workload", DUAL_PORT, "::1")
    assert answered(talk(env.ns_b, VETH_A, STRICT_PORT), "workload", STRICT_PORT, VETH_B)


@pytest.mark.usefixtures("permissive_after")
@pytest.mark.usefixtures("permissive_after")
def test_a_full_strict_map_keeps_the_old_set_and_says_so(env: Env) -> None:
    """Issue 10, attack 10: more STRICT entries than the map holds. Nothing of
    the new set is written (a half-written set would leave some ports open
    without a word), the error names the map and its limit, and the STRICT
    already in force keeps refusing plaintext."""
    a, wl = env.ns_a, env.wl_id
    env.mesh.sync_strict({(wl, STRICT_PORT)})  # the control case: a set that fits
    assert strict_entries(env) == {(wl, STRICT_PORT)}
    limit = env.mesh.map_capacity()["mn_strict"]
    too_many = {(wl + 1 + i // 60000, 1 + i % 60000) for i in range(limit + 1)}
    with pytest.raises(MapFullError, match=rf"mn_strict\) holds at most {limit} entries"):
        env.mesh.sync_strict(too_many)
    assert strict_entries(env) == {(wl, STRICT_PORT)}
    assert talk(a, "127.0.0.1", STRICT_PORT) is None


@pytest.mark.usefixtures("permissive_after")
def test_strict_covers_a_workloads_sub_cgroups(env: Env) -> None:
    """A server in a sub-cgroup of a STRICT workload is refused plaintext too, and
    still admits the proxy's source (the control case)."""
    sub = env.workload / "sub"
    sub.mkdir()
    proc = start_server(env.ns_a, sub, "sub", f"0.0.0.0:{SUB_PORT}")
    try:
        assert answered(talk(env.ns_a, NODE_IP, SUB_PORT, src=NODE_IP), "sub", SUB_PORT, NODE_IP)
        env.mesh.sync_strict({(env.wl_id, SUB_PORT)})
        assert talk(env.ns_a, NODE_IP, SUB_PORT, src=NODE_IP) is None
        assert talk(env.ns_b, VETH_A, SUB_PORT) is None
        assert answered(
            talk(env.ns_a, "127.0.0.1", SUB_PORT, src=PROXY_INBOUND_SOURCE),
            "sub",
            SUB_PORT,
            PROXY_INBOUND_SOURCE,
        )
    finally:
        stop_server(proc)
        remove_cgroup(sub)


def test_strict_entries_are_per_cgroup(env: Env) -> None:
    # STRICT for the *other* cgroup's port 8080: only its listener is guarded.
    env.mesh.sync_strict([(cgroup_id(env.other), STRICT_PORT)])
    assert talk(env.ns_b, "127.0.0.1", STRICT_PORT) is None
    assert answered(
        talk(env.ns_b, "127.0.0.1", STRICT_PORT, src=PROXY_INBOUND_SOURCE),
        "other",
        STRICT_PORT,
        PROXY_INBOUND_SOURCE,
    )
    assert answered(talk(env.ns_a, "127.0.0.1", STRICT_PORT), "workload", STRICT_PORT, "127.0.0.1")
    # sync replaces: now only the workload's port.
    env.mesh.sync_strict([(env.wl_id, STRICT_PORT)])
    assert strict_entries(env) == {(env.wl_id, STRICT_PORT)}
    assert answered(talk(env.ns_b, "127.0.0.1", STRICT_PORT), "other", STRICT_PORT, "127.0.0.1")
    assert talk(env.ns_a, "127.0.0.1", STRICT_PORT) is None
    # An entry covers the cgroup's descendants: the parent's covers both children.
    env.mesh.sync_strict([(cgroup_id(env.parent), STRICT_PORT)])
    assert talk(env.ns_a, "127.0.0.1", STRICT_PORT) is None
    assert talk(env.ns_b, "127.0.0.1", STRICT_PORT) is None
    env.mesh.sync_strict(set())
    assert answered(talk(env.ns_a, "127.0.0.1", STRICT_PORT), "workload", STRICT_PORT, "127.0.0.1")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _spoofed_syn(src: str, sport: int, dst: str, dport: int) -> bytes:
    """An IPv4 header and TCP SYN; the kernel fills in the IP checksum and length."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    iph = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    return iph + tcp


def _syn_ack_seen(env: Env, sport: int) -> bool:
    """Sends a SYN from netns B that claims 127.0.0.6, and reports whether the
    workload's listener answered it: its SYN-ACK to 127.0.0.6 is routed to
    netns A's own loopback, where a packet socket sees it."""
    with in_netns(env.ns_a):
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    with in_netns(env.ns_b):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sniffer.bind(("lo", 0))
        raw.sendto(_spoofed_syn(PROXY_INBOUND_SOURCE, sport, VETH_A, STRICT_PORT), (VETH_A, 0))
        deadline = time.monotonic() + REFUSED_WAIT
        while (left := deadline - time.monotonic()) > 0:
            sniffer.settimeout(left)
            try:
                pkt = sniffer.recv(2048)
            except TimeoutError:
                break
            ihl = (pkt[0] & 0x0F) * 4
            if len(pkt) < ihl + 14 or pkt[9] != socket.IPPROTO_TCP:
                continue
            src_port, dst_port = struct.unpack("!HH", pkt[ihl : ihl + 4])
            flags = pkt[ihl + 13]
            if (src_port, dst_port) == (STRICT_PORT, sport) and flags & 0x12 == 0x12:
                return True
        return False
    finally:
        sniffer.close()
        raw.close()


@pytest.mark.usefixtures("permissive_after")
def test_proxy_source_spoofed_from_the_wire_is_dropped(env: Env) -> None:
    # route_localnet lets 127.0.0.0/8 sources in from a wire; without it the
    # kernel drops them as martians before any program sees them.
    for key in ("all", "mn-wire"):
        sysctl(env.ns_a, f"net.ipv4.conf.{key}.route_localnet", "1")
        sysctl(env.ns_a, f"net.ipv4.conf.{key}.rp_filter", "0")
    # Control: PERMISSIVE, the spoofed SYN reaches the listener, which answers.
    assert _syn_ack_seen(env, 40001), "spoofed SYN not answered even in PERMISSIVE mode"
    env.mesh.sync_strict({(env.wl_id, STRICT_PORT)})
    # STRICT: right source address, wrong way in (not loopback).
    assert not _syn_ack_seen(env, 40002), "a SYN from the wire claiming 127.0.0.6 got in"


def test_cgroup_id_helpers_in_cgroup_skb_ingress(env: Env) -> None:
    """Which helper names the receiving socket's cgroup in cgroup_skb ingress:
    bpf_skb_cgroup_id(skb) and bpf_sk_cgroup_id(skb->sk) do;
    bpf_get_current_cgroup_id() gives whatever task the softirq interrupted."""
    from bcc import BPF

    probe = BPF(
        text=f"""
        struct seen_t {{ u64 skb_cg; u64 sk_cg; u64 current_cg; }};
        BPF_HASH(seen, struct seen_t, u64, 64);
        int probe_cgid(struct __sk_buff *skb) {{
            struct bpf_sock *sk = skb->sk;
            struct seen_t key = {{}};
            u64 one = 1, *n;
            if (!sk)
                return 1;
            sk = bpf_sk_fullsock(sk);
            if (!sk || sk->src_port != {STRICT_PORT})
                return 1;
            key.skb_cg = bpf_skb_cgroup_id(skb);
            key.sk_cg = bpf_sk_cgroup_id(sk);
            key.current_cg = bpf_get_current_cgroup_id();
            n = seen.lookup(&key);
            if (n)
                __sync_fetch_and_add(n, 1);
            else
                seen.update(&key, &one);
            return 1;
        }}
        """.encode()
    )
    try:
        fn = probe.load_func(b"probe_cgid", BPF.CGROUP_SKB, attach_type=0)
        cg_fd = os.open(env.workload, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syscall.prog_attach(
                cg_fd, fn.fd, syscall.BPF_CGROUP_INET_INGRESS, syscall.BPF_F_ALLOW_MULTI
            )
            try:
                answer = talk(env.ns_a, "127.0.0.1", STRICT_PORT)
                assert answered(answer, "workload", STRICT_PORT, "127.0.0.1")
            finally:
                syscall.prog_detach(cg_fd, fn.fd, syscall.BPF_CGROUP_INET_INGRESS)
        finally:
            os.close(cg_fd)
        seen = [(k.skb_cg, k.sk_cg, k.current_cg) for k in probe[b"seen"]]
    finally:
        probe.cleanup()
    print(f"workload cgroup {env.wl_id}; seen (skb, sk, current): {seen}")
    assert seen, "the probe saw no packet for the workload's port"
    assert all(skb == env.wl_id and sk == env.wl_id for skb, sk, _ in seen), seen
    # The client (this test process) sent, and the softirq ran in its context.
    assert any(current != env.wl_id for *_, current in seen), seen


def test_sync_strict_rejects_bad_entries(env: Env) -> None:
    for bad in [(env.wl_id, 0), (env.wl_id, 70000), (-1, 80), (2**64, 80), (1,)]:
        with pytest.raises(BpfError, match="bad STRICT entry"):
            env.mesh.sync_strict([bad])  # type: ignore[list-item]
    assert strict_entries(env) == set()
