"""The systemd-nspawn harness (tests/support/nspawn.py): two nodes with a real systemd boot
from the shared rootfs, reach each other on the test subnet, can load and attach
meshnode's BPF programs at their own cgroup root, run Type=notify services (also
under the agent unit's hardening), and leave nothing behind.

Needs root, systemd-nspawn and debootstrap; builds the rootfs on first use
(scripts/build-rootfs.sh, about 100 s, cached in /var/cache/meshnode/rootfs)."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bpf import MESH_PROGRAMS
from tests.support.nspawn import REPO, Cluster, Node, NspawnError, ensure_rootfs, missing

pytestmark = [pytest.mark.root]

PY = str(REPO / ".venv" / "bin" / "python")
SUBNET = "198.18.1.0/24"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    why = missing()
    if why is not None:
        print(f"nspawn harness skipped: {why}")
        pytest.skip(why)
    t0 = time.monotonic()
    try:
        rootfs = ensure_rootfs()
    except (NspawnError, OSError) as exc:
        print(f"nspawn harness skipped: {exc}")
        pytest.skip(f"the nspawn rootfs cannot be built: {exc}")
    t_rootfs = time.monotonic() - t0
    c = Cluster(SUBNET, rootfs)
    try:
        t1 = time.monotonic()
        nodes = [c.boot("n1"), c.boot("n2")]
        t_started = time.monotonic() - t1
        states = [n.wait_for_system() for n in nodes]
        t_booted = time.monotonic() - t1
        print(
            f"\n[nspawn] rootfs ready in {t_rootfs:.1f}s; 2 nodes: init up in "
            f"{t_started:.2f}s, systems {states} in {t_booted:.2f}s"
        )
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def n1(cluster: Cluster) -> Node:
    return cluster.nodes["n1"]


@pytest.fixture(scope="module")
def n2(cluster: Cluster) -> Node:
    return cluster.nodes["n2"]


def test_nodes_boot(n1: Node, n2: Node) -> None:
    for node in (n1, n2):
        state = node.run(["systemctl", "is-system-running"]).stdout.strip()
        assert state in ("running", "degraded"), node.console_tail()
        assert node.run(["hostname"]).stdout.strip() == node.name
        # A pure cgroup v2 tree, its root being the node's own subtree on the host.
        assert "cgroup2" in node.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout


def test_nodes_reach_each_other(n1: Node, n2: Node) -> None:
    server = textwrap.dedent(f"""
        import socket
        s = socket.create_server(("{n2.ip}", 7777))
        c, peer = s.accept()
        c.sendall(f"{{peer[0]}} {{c.recv(100).decode()}}".encode())
        c.close()
    """)
    n2.run(
        [
            "systemd-run",
            "--unit=mnspawn-echo",
            "--collect",
            "--quiet",
            "--",
            "python3",
            "-c",
            server,
        ],
        check=True,
    )
    client = textwrap.dedent(f"""
        import socket, time
        for _ in range(100):
            try:
                s = socket.create_connection(("{n2.ip}", 7777), timeout=5)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        s.sendall(b"hello")
        print(s.getsockname()[0], s.recv(100).decode())
    """)
    out = n1.run(["python3", "-c", client], check=True, timeout=30).stdout.split()
    # n1's own address on eth0, and n2 saw the connection come from it: no loopback.
    assert out == [n1.ip, n1.ip, "hello"]


BPF_PROBE = textwrap.dedent("""
    import json, os
    from pathlib import Path
    from meshnode.bpf.cgroups import cgroup2_mount
    from meshnode.bpf.loader import MeshBpf
    root = cgroup2_mount()
    with MeshBpf(Path("/sys/fs/bpf/meshnode")) as mesh:
        mesh.load()
        mesh.attach(root)
        progs = [p["attach_type"] for p in MeshBpf.attached_programs(root)]
        pins = sorted(p.name for p in Path("/sys/fs/bpf/meshnode").iterdir())
    result = {"root": str(root), "ino": os.stat(root).st_ino, "progs": progs, "pins": pins,
              "after": MeshBpf.attached_programs(root)}
    print(json.dumps(result), flush=True)
""")


def _probe_result(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bcc_attaches_at_the_node_cgroup_root(n1: Node) -> None:
    # As a service of the node: the node's capabilities and seccomp filter apply.
    proc = n1.run([PY, "-c", BPF_PROBE], service=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = _probe_result(proc.stdout)
    assert res["root"] == "/sys/fs/cgroup"
    assert sorted(res["progs"]) == sorted(t for _, t in MESH_PROGRAMS)
    assert res["pins"] == ["mn_dests", "mn_orig_dst", "mn_strict", "mn_workloads"]
    assert res["after"] == []
    # The node's cgroup root is its own subtree on the host, not the host's root.
    assert res["ino"] == n1.root_cgroup.stat().st_ino


def _install_unit(node: Node, name: str, text: str) -> None:
    node.run(["sh", "-c", f"cat > /etc/systemd/system/{name}"], input=text, check=True)
    node.run(["systemctl", "daemon-reload"], check=True)


HELLO = textwrap.dedent("""
    import time
    from meshnode.core.sdnotify import notify
    time.sleep(0.5)
    assert notify("READY=1", "STATUS=hello from meshnode"), "no NOTIFY_SOCKET"
    time.sleep(3600)
""")


def test_notify_unit_becomes_active(n2: Node) -> None:
    n2.run(["sh", "-c", "cat > /usr/local/bin/mnspawn-hello.py"], input=HELLO, check=True)
    _install_unit(
        n2,
        "mnspawn-hello.service",
        textwrap.dedent(f"""\
        [Service]
        Type=notify
        NotifyAccess=main
        ExecStart={PY} /usr/local/bin/mnspawn-hello.py
        TimeoutStartSec=30
    """),
    )
    t0 = time.monotonic()
    n2.run(["systemctl", "start", "mnspawn-hello.service"], check=True, timeout=60)
    assert time.monotonic() - t0 >= 0.5  # start waited for READY=1
    assert n2.run(["systemctl", "is-active", "mnspawn-hello.service"]).stdout.strip() == "active"
    status = n2.run(["systemctl", "show", "-p", "StatusText", "mnspawn-hello.service"]).stdout
    assert "hello from meshnode" in status
    n2.run(["systemctl", "stop", "mnspawn-hello.service"], check=True)


HOLD_PROBE = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from meshnode.bpf.cgroups import cgroup2_mount
    from meshnode.bpf.loader import MeshBpf
    from meshnode.core.sdnotify import notify
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # detach on stop
    root = cgroup2_mount()
    with MeshBpf(Path("/sys/fs/bpf/meshnode")) as mesh:
        mesh.load()
        mesh.attach(root)
        result = {"root": str(root), "ino": os.stat(root).st_ino,
                  "progs": [p["attach_type"] for p in MeshBpf.attached_programs(root)]}
        Path("/var/lib/meshnode/probe.json").write_text(json.dumps(result))
        notify("READY=1")
        time.sleep(3600)
""")


ZTUNNEL_READER = textwrap.dedent("""
    import os
    from meshnode.bpf.pinned import OrigDstTable
    table = OrigDstTable.open("/sys/fs/bpf/meshnode")
    print("popped", table.pop("127.0.0.1", 1, "127.0.0.1", 2))
    print("ro" if not os.access("/sys/fs/bpf/meshnode", os.W_OK) or
          os.statvfs("/sys/fs/bpf").f_flag & os.ST_RDONLY else "rw")
""")


def test_agent_unit_hardening_allows_bpf(n2: Node) -> None:
    """The agent unit exactly as nodeagent/units.py renders it, only ExecStart swapped
    for a probe: inside that sandbox bcc compiles (/lib/modules, /usr/src, private
    /tmp), loads, attaches at the node's cgroup root and pins; the pins are visible
    outside the unit, where ztunnel reads them (the meshnode-bpffs.service the unit requires
    mounted bpffs in the node's own mount namespace)."""
    from meshnode.bpf.loader import MeshBpf
    from meshnode.nodeagent.units import (
        AGENT_UNIT,
        BPFFS_UNIT,
        ZTUNNEL_UNIT,
        UnitPaths,
        package_source,
        render_units,
    )

    units = render_units(
        UnitPaths(
            Path(PY).parent / "meshnode",
            Path("/etc/meshnode"),
            Path("/var/lib/meshnode"),
            package_source(),
        )
    )
    unit = units[AGENT_UNIT]
    _install_unit(n2, BPFFS_UNIT, units[BPFFS_UNIT])
    assert n2.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0  # nothing yet
    n2.run(["mkdir", "-p", "/etc/meshnode", "/var/lib/meshnode"], check=True)
    n2.run(["sh", "-c", "cat > /var/lib/meshnode/probe.py"], input=HOLD_PROBE, check=True)
    lines = []
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={PY} /var/lib/meshnode/probe.py"
        elif line.startswith("Restart="):
            line = "Restart=no"
        lines.append(line)
    _install_unit(n2, "mnspawn-agentprobe.service", "\n".join(lines) + "\n")
    proc = n2.run(["systemctl", "start", "mnspawn-agentprobe.service"], timeout=180)
    journal = n2.run(
        ["journalctl", "-u", "mnspawn-agentprobe.service", "--no-pager", "-o", "cat"]
    ).stdout
    assert proc.returncode == 0, proc.stderr + journal
    try:
        res = _probe_result(n2.run(["cat", "/var/lib/meshnode/probe.json"]).stdout)
        assert sorted(res["progs"]) == sorted(t for _, t in MESH_PROGRAMS)
        assert res["ino"] == n2.root_cgroup.stat().st_ino
        assert n2.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode == 0
        pins = n2.run(["ls", "/sys/fs/bpf/meshnode"]).stdout.split()
        assert sorted(pins) == ["mn_dests", "mn_orig_dst", "mn_strict", "mn_workloads"]
        attached = MeshBpf.attached_programs(n2.root_cgroup)  # seen from the host
        assert sorted(p["attach_type"] for p in attached) == sorted(res["progs"])
        # ztunnel's sandbox (/sys/fs/bpf read-only there) can still open and use the map.
        zt = [
            ln
            for ln in units[ZTUNNEL_UNIT].split("[Service]", 1)[1].splitlines()
            if "=" in ln
            and not ln.startswith(
                ("#", "ExecStart=", "Type=", "Restart", "NotifyAccess", "WantedBy")
            )
        ]
        args = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
        for prop in zt:
            args += ["-p", prop]
        reader = n2.run([*args, PY, "-c", ZTUNNEL_READER], timeout=60)
        assert reader.returncode == 0, reader.stdout + reader.stderr
        assert reader.stdout.split() == ["popped", "None", "ro"], reader.stdout
    finally:
        n2.run(["systemctl", "stop", "mnspawn-agentprobe.service"], timeout=60)
    assert MeshBpf.attached_programs(n2.root_cgroup) == []
    assert n2.run(["ls", "/sys/fs/bpf/meshnode"]).returncode != 0  # unpinned


def test_shutdown_leaves_nothing(cluster: Cluster) -> None:
    t0 = time.monotonic()
    cluster.close()
    print(f"\n[nspawn] 2 nodes powered off and cleaned up in {time.monotonic() - t0:.2f}s")
    assert cluster.leftovers() == []
