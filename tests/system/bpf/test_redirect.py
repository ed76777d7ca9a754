"""End to end: the cgroup programs redirect a member's connect() to the proxy, and
the proxy finds the original destination by 4-tuple. Needs root, cgroup v2 and
eBPF; all traffic stays on loopback inside a network namespace made for the test.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnode.bpf import syscall
from meshnode.bpf.cgroups import cgroup2_mount, cgroup_id
from meshnode.bpf.layout import (
    PIN_DESTINATIONS,
    PIN_ORIG_DST,
    PIN_STRICT,
    PIN_WORKLOADS,
    DestKey,
)
from meshnode.bpf.loader import MeshBpf
from meshnode.bpf.pinned import OrigDst, OrigDstTable, open_pinned
from meshnode.core.constants import INGRESS_PORT
from meshnode.nodeagent.agent import PROXY_PORTS
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

PROXY_PORT = 15001  # the netns is fresh, so the default port is free
TARGET_PORT = 8080
MESH_DST = "240.0.0.10"  # reserved space, never routed; only ever a connect() argument
WILDCARD_DST = "240.0.0.11"
MEMBER_WORKLOAD_ID = 42


@pytest.fixture(scope="module", autouse=True)
def _require_ebpf() -> None:
    reason = ebpf_missing()
    if reason:
        pytest.skip(reason)


# -- helpers -------------------------------------------------------------------------


def listener(netns: str, port: int) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    return sock


CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    for _ in range(int(sys.argv[3])):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((sys.argv[1], int(sys.argv[2])))
        except OSError as exc:
            print(json.dumps({"error": exc.strerror or str(exc)}))
        else:
            local, peer = s.getsockname()[:2], s.getpeername()[:2]
            print(json.dumps({"local": list(local), "peer": list(peer)}))
        s.close()
    """
)


def run_clients(netns: str, cgroup: Path, host: str, port: int, count: int) -> list[dict[str, Any]]:
    """count connect()s from a process inside netns and cgroup: each one's local and
    peer address, or its error."""
    procs = cgroup / "cgroup.procs"

    def join_cgroup() -> None:
        procs.write_text("0")

    # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup fs.
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", CLIENT]
        + [host, str(port), str(count)],
        preexec_fn=join_cgroup,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def run_client(netns: str, cgroup: Path, host: str, port: int) -> dict[str, Any]:
    (result,) = run_clients(netns, cgroup, host, port, 1)
    return result


def accept_now(sock: socket.socket, timeout: float = 3.0) -> tuple[socket.socket, Any] | None:
    sock.settimeout(timeout)
    try:
        return sock.accept()
    except TimeoutError:
        return None


def pending(sock: socket.socket) -> bool:
    """Whether a connection waits in sock's accept queue."""
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


# -- the environment ---------------------------------------------------------------


@dataclass
class Env:
    netns: str
    parent: Path
    member: Path
    other: Path
    pin_dir: Path
    mesh: MeshBpf
    proxy: socket.socket
    target: socket.socket
    table: OrigDstTable


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    netns = unique("mn-test")
    parent = cgroup2_mount() / unique("mn-test")
    pin_dir = Path("/sys/fs/bpf") / unique("mn-test")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    sockets: list[socket.socket] = []
    mesh = MeshBpf(pin_dir, proxy_port=PROXY_PORT)
    table: OrigDstTable | None = None
    prog_ids: list[int] = []
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        member, other = parent / "member", parent / "other"
        for path in (parent, member, other):
            path.mkdir()
        sockets += [listener(netns, PROXY_PORT), listener(netns, TARGET_PORT)]
        mesh.load()
        mesh.attach(parent)
        prog_ids = [p["id"] for p in MeshBpf.attached_programs(parent)]
        mesh.sync_workloads({cgroup_id(member): MEMBER_WORKLOAD_ID})
        mesh.sync_destinations({(MESH_DST, 80), (WILDCARD_DST, 0)})
        table = OrigDstTable.open(pin_dir)
        yield Env(netns, parent, member, other, pin_dir, mesh, sockets[0], sockets[1], table)
    finally:
        if table is not None:
            table.close()
        for sock in sockets:
            sock.close()
        mesh.close()
        leftover = MeshBpf.attached_programs(parent) if parent.exists() else []
        bpftool_left = bpftool_cgroup_names(parent) if parent.exists() else []
        for path in (parent / "member", parent / "other", parent):
            remove_cgroup(path)
        subprocess.run(["ip", "netns", "del", netns], check=True)
    # Nothing of ours may be left.
    assert leftover == []
    assert not any(name.startswith("mn_") for name in bpftool_left), bpftool_left
    assert not pin_dir.exists()
    assert not parent.exists()
    assert not Path(f"/run/netns/{netns}").exists()
    assert all(prog_gone(i) for i in prog_ids), "programs still loaded after close()"


# -- tests ---------------------------------------------------------------------------


def test_attach_pins_maps_and_lists_programs(env: Env) -> None:
    for pin in (PIN_ORIG_DST, PIN_WORKLOADS, PIN_DESTINATIONS, PIN_STRICT):
        os.close(open_pinned(env.pin_dir / pin))
    attached = MeshBpf.attached_programs(env.parent)
    assert sorted((p["name"], p["attach_type"]) for p in attached) == MESH_PROGRAMS
    names = bpftool_cgroup_names(env.parent)
    if names:  # bpftool installed: it agrees
        assert sorted(names) == MESH_PROGRAM_NAMES


def test_member_connect4_lands_at_proxy_with_orig_dst(env: Env) -> None:
    client = run_client(env.netns, env.member, MESH_DST, 80)
    assert "error" not in client, client
    assert client["peer"] == ["127.0.0.1", PROXY_PORT]  # the rewrite is visible to the app
    accepted = accept_now(env.proxy)
    assert accepted is not None, "redirected connection did not reach the proxy"
    conn, (peer_ip, peer_port) = accepted
    assert [peer_ip, peer_port] == client["local"]
    local_ip, local_port = env.proxy.getsockname()
    assert env.table.pop(peer_ip, peer_port, local_ip, local_port) == OrigDst(
        MESH_DST, 80, MEMBER_WORKLOAD_ID
    )
    conn.close()  # after the pop: the proxy takes the record at accept()
    assert env.table.pop(peer_ip, peer_port, local_ip, local_port) is None


def test_member_connect6_v4mapped_lands_at_proxy_with_orig_dst(env: Env) -> None:
    client = run_client(env.netns, env.member, f"::ffff:{MESH_DST}", 80)
    assert "error" not in client, client
    assert client["peer"] == ["::ffff:127.0.0.1", PROXY_PORT]
    accepted = accept_now(env.proxy)
    assert accepted is not None, "redirected v6 connection did not reach the proxy"
    conn, (peer_ip, peer_port) = accepted
    assert client["local"] == [f"::ffff:{peer_ip}", peer_port]
    # A dual-stack proxy would see ::ffff: strings; pop accepts them too.
    orig = env.table.pop(f"::ffff:{peer_ip}", peer_port, "::ffff:127.0.0.1", PROXY_PORT)
    conn.close()  # after the pop: the proxy takes the record at accept()
    assert orig == OrigDst(MESH_DST, 80, MEMBER_WORKLOAD_ID)
    assert env.table.pop(peer_ip, peer_port, "127.0.0.1", PROXY_PORT) is None


def test_many_connections_each_find_their_record(env: Env) -> None:
    clients = run_clients(env.netns, env.member, MESH_DST, 80, 20)
    assert all("error" not in c for c in clients), clients
    for _ in clients:
        accepted = accept_now(env.proxy)
        assert accepted is not None
        conn, (peer_ip, peer_port) = accepted
        orig = env.table.pop(peer_ip, peer_port, "127.0.0.1", PROXY_PORT)
        conn.close()  # after the pop: the proxy takes the record at accept()
        assert orig == OrigDst(MESH_DST, 80, MEMBER_WORKLOAD_ID)
    assert not pending(env.proxy)


def test_port_wildcard_destination(env: Env) -> None:
    client = run_client(env.netns, env.member, WILDCARD_DST, 443)
    assert "error" not in client, client
    accepted = accept_now(env.proxy)
    assert accepted is not None
    conn, (peer_ip, peer_port) = accepted
    assert env.table.pop(peer_ip, peer_port, "127.0.0.1", PROXY_PORT) == OrigDst(
        WILDCARD_DST, 443, MEMBER_WORKLOAD_ID
    )
    conn.close()  # after the pop: the proxy takes the record at accept()


def test_member_sub_cgroup_is_captured_too(env: Env) -> None:
    """A process in a sub-cgroup of a workload (Delegate=yes, a container inside a
    unit) is that workload: redirected with its id, never sent out in plaintext. A
    sub-cgroup of a non-member stays untouched (the control case)."""
    deeper = env.member / "sub" / "deeper"
    stranger = env.other / "sub"
    deeper.mkdir(parents=True)
    stranger.mkdir()
    try:
        client = run_client(env.netns, deeper, MESH_DST, 80)
        assert client.get("peer") == ["127.0.0.1", PROXY_PORT], client
        accepted = accept_now(env.proxy)
        assert accepted is not None, "a workload's sub-cgroup was not redirected"
        conn, (peer_ip, peer_port) = accepted
        local_ip, local_port = env.proxy.getsockname()
        assert env.table.pop(peer_ip, peer_port, local_ip, local_port) == OrigDst(
            MESH_DST, 80, MEMBER_WORKLOAD_ID
        )
        conn.close()  # after the pop: the proxy takes the record at accept()
        outsider = run_client(env.netns, stranger, MESH_DST, 80)
        assert "error" in outsider, outsider
        assert not pending(env.proxy), "a non-member's sub-cgroup reached the proxy"
    finally:
        for path in (deeper, deeper.parent, stranger):
            remove_cgroup(path)


def _raw_connect(netns: str, cgroup: Path, src_port: int, dst_port: int) -> str:
    """From a process in netns and cgroup: bind 127.0.0.1:src_port, connect to
    127.0.0.1:dst_port; "ok" or the error. The socket is left to close normally."""
    code = (
        "import socket, sys\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.settimeout(3)\n"
        "try:\n"
        f"    s.bind(('127.0.0.1', {src_port}))\n"
        f"    s.connect(('127.0.0.1', {dst_port}))\n"
        "    print('ok')\n"
        "except OSError as exc:\n"
        "    print(exc.strerror or exc)\n"
    )
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code],
        preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout.strip() or out.stderr.strip()


def _aborted_redirect(env: Env) -> int:
    """A workload's redirected connect() that the proxy never accepts, aborted with
    a reset (as a proxy restart or a full backlog leaves it): its record stays
    behind and its local port is free at once. Returns that port."""
    code = (
        "import socket, struct\n"
        "s = socket.socket()\n"
        "s.settimeout(3)\n"
        f"s.connect(('{MESH_DST}', 80))\n"
        "print(s.getsockname()[1])\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n"
        "s.close()\n"
    )
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{env.netns}", sys.executable, "-c", code],
        preexec_fn=lambda: (env.member / "cgroup.procs").write_text("0"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def _drain(sock: socket.socket) -> None:
    while (accepted := accept_now(sock)) is not None:
        accepted[0].close()


def test_a_left_behind_record_is_not_borrowed(env: Env) -> None:
    """Attack: a redirected connection's record is left behind; a local process that
    is not a workload dials the proxy directly from the same source port, hoping to
    be tunnelled as the workload. Its own connect() deletes the record before its
    SYN leaves, so the proxy finds none. Control: without the attacker the record
    is still there (so the test can fail)."""
    port = _aborted_redirect(env)
    assert env.table.pop("127.0.0.1", port, "127.0.0.1", PROXY_PORT) == OrigDst(
        MESH_DST, 80, MEMBER_WORKLOAD_ID
    )
    _drain(env.proxy)

    port = _aborted_redirect(env)
    assert _raw_connect(env.netns, env.other, port, PROXY_PORT) == "ok"
    assert env.table.pop("127.0.0.1", port, "127.0.0.1", PROXY_PORT) is None
    _drain(env.proxy)


def test_a_stale_record_is_refused(env: Env) -> None:
    """A record older than the table's limit is refused (and removed)."""
    table = OrigDstTable.open(env.pin_dir, max_age=0.2)
    try:
        client = run_client(env.netns, env.member, MESH_DST, 80)
        assert "error" not in client, client
        accepted = accept_now(env.proxy)
        assert accepted is not None
        conn, (peer_ip, peer_port) = accepted
        time.sleep(0.5)
        assert table.pop(peer_ip, peer_port, "127.0.0.1", PROXY_PORT) is None
        assert table.stale == 1
        assert table.pop(peer_ip, peer_port, "127.0.0.1", PROXY_PORT) is None  # removed
        conn.close()
        # Control: a fresh one is taken.
        run_client(env.netns, env.member, MESH_DST, 80)
        accepted = accept_now(env.proxy)
        assert accepted is not None
        conn, (peer_ip, peer_port) = accepted
        assert table.pop(peer_ip, peer_port, "127.0.0.1", PROXY_PORT) is not None
        conn.close()
    finally:
        table.close()


def test_only_the_proxy_binds_its_address_and_ports(env: Env) -> None:
    """Attack: a local process binds the proxy's delivery address (to pass STRICT)
    or a proxy port (the zone ingress's among them: bound first, it would keep the
    ingress from starting). With the guard on, only the proxy's cgroup may."""
    proxy_cg = env.parent / "proxy"
    proxy_cg.mkdir()
    code = (
        "import socket, sys\n"
        "for spec in sys.argv[1:]:\n"
        "    ip, port = spec.rsplit(':', 1)\n"
        "    fam = socket.AF_INET6 if ':' in ip else socket.AF_INET\n"
        "    s = socket.socket(fam)\n"
        "    try:\n"
        "        s.bind((ip.strip('[]'), int(port)))\n"
        "        print('ok')\n"
        "    except OSError as exc:\n"
        "        print(exc.strerror)\n"
        "    s.close()\n"
    )
    specs = [
        "127.0.0.6:0",
        "127.0.0.1:15008",
        "[::ffff:127.0.0.6]:0",
        "[::]:15008",
        f"0.0.0.0:{INGRESS_PORT}",
        "127.0.0.1:0",
        "127.0.0.7:0",
    ]

    def bind_from(cgroup: Path) -> list[str]:
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{env.netns}", sys.executable, "-c", code, *specs],
            preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"),
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.split()

    try:
        # Guard off (the agent has not set it): anyone may.
        assert bind_from(env.other) == ["ok"] * 7
        env.mesh.guard_proxy({cgroup_id(proxy_cg)}, PROXY_PORTS)  # what the agent guards
        denied = ["Operation", "not", "permitted"]
        got = bind_from(env.other)
        assert got[: 5 * len(denied)] == denied * 5, got
        assert got[5 * len(denied) :] == ["ok", "ok"], got
        assert bind_from(env.member)[: len(denied)] == denied  # a workload is no proxy
        assert bind_from(proxy_cg) == ["ok"] * 7
    finally:
        env.mesh.unguard()
        remove_cgroup(proxy_cg)


def test_non_member_is_not_redirected(env: Env) -> None:
    assert not pending(env.proxy)
    client = run_client(env.netns, env.other, MESH_DST, 80)
    # Untouched, the connect goes to 240.0.0.10, which has no route in the netns.
    assert "error" in client, client
    assert not pending(env.proxy), "a non-member's connection reached the proxy"


def test_member_connect_outside_mesh_goes_direct(env: Env) -> None:
    client = run_client(env.netns, env.member, "127.0.0.1", TARGET_PORT)
    assert client.get("peer") == ["127.0.0.1", TARGET_PORT], client
    accepted = accept_now(env.target)
    assert accepted is not None, "direct connection did not reach the target"
    conn, (peer_ip, peer_port) = accepted
    assert not pending(env.proxy)
    assert env.table.pop(peer_ip, peer_port, "127.0.0.1", TARGET_PORT) is None
    conn.close()  # after the pop: the proxy takes the record at accept()


def test_sync_replaces_map_contents(env: Env) -> None:
    fd = open_pinned(env.pin_dir / PIN_DESTINATIONS)
    try:
        env.mesh.sync_destinations({("10.0.0.1", 8443)})
        assert [k.address() for k in syscall.map_keys(fd, DestKey)] == [("10.0.0.1", 8443)]
        # With the mesh destination gone, even a member goes direct (and fails here).
        client = run_client(env.netns, env.member, MESH_DST, 80)
        assert "error" in client, client
        assert not pending(env.proxy)
        env.mesh.sync_destinations({(MESH_DST, 80), (WILDCARD_DST, 0)})
        keys = {k.address() for k in syscall.map_keys(fd, DestKey)}
        assert keys == {(MESH_DST, 80), (WILDCARD_DST, 0)}
    finally:
        env.mesh.sync_destinations({(MESH_DST, 80), (WILDCARD_DST, 0)})
        os.close(fd)

    wl_fd = open_pinned(env.pin_dir / PIN_WORKLOADS)
    try:
        env.mesh.sync_workloads({cgroup_id(env.other): 9, cgroup_id(env.member): 43})
        env.mesh.sync_workloads({cgroup_id(env.member): MEMBER_WORKLOAD_ID})
        keys_wl = [k.value for k in syscall.map_keys(wl_fd, ct.c_uint64)]
        assert keys_wl == [cgroup_id(env.member)]
    finally:
        os.close(wl_fd)


def test_cgroup_id_is_what_bpf_sees(env: Env) -> None:
    from bcc import BPF

    probe = BPF(
        text=b"""
        BPF_ARRAY(seen, u64, 1);
        int probe_cgid(struct bpf_sock_addr *ctx) {
            int zero = 0;
            u64 id = bpf_get_current_cgroup_id();
            seen.update(&zero, &id);
            return 1;
        }
        """
    )
    try:
        fn = probe.load_func(b"probe_cgid", BPF.CGROUP_SOCK_ADDR, attach_type=10)
        cg_fd = os.open(env.member, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syscall.prog_attach(cg_fd, fn.fd, syscall.BPF_CGROUP_INET4_CONNECT, 2)
            try:
                client = run_client(env.netns, env.member, "127.0.0.1", TARGET_PORT)
                assert "error" not in client, client
                accepted = accept_now(env.target)
                assert accepted is not None
                accepted[0].close()
            finally:
                syscall.prog_detach(cg_fd, fn.fd, syscall.BPF_CGROUP_INET4_CONNECT)
        finally:
            os.close(cg_fd)
        assert probe[b"seen"][ct.c_int(0)].value == cgroup_id(env.member)
    finally:
        probe.cleanup()


def test_close_leaves_nothing_behind(tmp_path: Path) -> None:
    parent = cgroup2_mount() / unique("mn-test")
    parent.mkdir()
    pin_dir = Path("/sys/fs/bpf") / unique("mn-test")
    try:
        with MeshBpf(pin_dir, proxy_port=PROXY_PORT) as mesh:
            mesh.load()
            mesh.attach(parent)
            ids = [p["id"] for p in MeshBpf.attached_programs(parent)]
            assert len(ids) == len(MESH_PROGRAMS)
            assert (pin_dir / PIN_ORIG_DST).exists()
        assert MeshBpf.attached_programs(parent) == []
        assert not pin_dir.exists()
        assert all(prog_gone(i) for i in ids)
    finally:
        remove_cgroup(parent)
