"""`meshnode enroll` for real: a control plane on the host side of the test subnet
(the fabric namespace), a node with a real systemd (tests/support/nspawn.py) enrolling with
a join token, then the same node enrolling again with --force and starting the units
it installed (meshnode-bpffs, meshnode-ztunnel, meshnode-agent)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nspawn import REPO, Cluster, Node, NspawnError, ensure_rootfs, missing

pytestmark = [pytest.mark.root]

MESHNODE = str(REPO / ".venv" / "bin" / "meshnode")
SUBNET = "198.18.2.0/24"
PORT = 15012


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Node, list[str]]]:
    why = missing()
    if why is not None:
        print(f"nspawn enroll test skipped: {why}")
        pytest.skip(why)
    try:
        import meshnode.controlplane.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no control plane server: {exc}")
    try:
        rootfs = ensure_rootfs()
    except (NspawnError, OSError) as exc:
        pytest.skip(f"the nspawn rootfs cannot be built: {exc}")
    data = tmp_path_factory.mktemp("cp")
    c = Cluster(SUBNET, rootfs)
    cp = None
    try:
        fabric = c.host_side()
        ns = ["nsenter", f"--net=/run/netns/{fabric}", "--"]
        cp = subprocess.Popen(
            [
                *ns,
                MESHNODE,
                "controlplane",
                "run",
                "--listen",
                f"0.0.0.0:{PORT}",
                "--data-dir",
                str(data),
                "--advertise",
                c.gateway,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(data / "cp.log", "wb"),  # noqa: SIM115
        )
        node = c.boot("e1")
        node.wait_for_system()
        deadline = time.monotonic() + 20
        while not (data / "trust-bundle.pem").exists():
            if time.monotonic() > deadline or cp.poll() is not None:
                pytest.fail(f"control plane did not start: {(data / 'cp.log').read_text()}")
            time.sleep(0.1)
        yield (
            c,
            node,
            [
                *ns,
                MESHNODE,
                "token",
                "create",
                "--cp",
                f"https://127.0.0.1:{PORT}",
                "--data-dir",
                str(data),
            ],
        )
    finally:
        if cp is not None:
            cp.terminate()
            cp.wait(10)
        c.close()


def _token(cmd: list[str], node: str) -> str:
    proc = subprocess.run([*cmd, "--node", node], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return next(w for w in proc.stdout.split() if w.startswith("mn1."))


def test_enroll_no_start(setup: tuple[Cluster, Node, list[str]]) -> None:
    c, node, token_cmd = setup
    url = f"https://{c.gateway}:{PORT}"
    proc = node.run(
        [MESHNODE, "enroll", "--cp", url, "--token", _token(token_cmd, "e1"), "--no-start"],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(node.run(["cat", "/etc/meshnode/node.json"], check=True).stdout)
    assert doc == {
        "name": "e1",
        "zone": "",
        "ip": node.ip,
        "trust_domain": "cluster.local",
        "control_planes": [url],
        "cgroup_parent": "/sys/fs/cgroup",
        "state_dir": "/var/lib/meshnode",
        "config_dir": "/etc/meshnode",
    }
    modes = node.run(
        ["stat", "-c", "%n %a", "/etc/meshnode", "/etc/meshnode/node-key.pem", "/var/lib/meshnode"],
        check=True,
    ).stdout.split()
    assert modes == [
        "/etc/meshnode",
        "755",
        "/etc/meshnode/node-key.pem",
        "600",
        "/var/lib/meshnode",
        "700",
    ]
    assert node.run(["ls", "/etc/systemd/system/meshnode-agent.service"]).returncode != 0
    again = node.run([MESHNODE, "enroll", "--cp", url, "--token", _token(token_cmd, "e1")])
    assert again.returncode == 0 and again.stdout.startswith("already enrolled as e1")


def test_enroll_force_starts_units(setup: tuple[Cluster, Node, list[str]]) -> None:
    c, node, token_cmd = setup
    url = f"https://{c.gateway}:{PORT}"
    proc = node.run(
        [MESHNODE, "enroll", "--cp", url, "--token", _token(token_cmd, "e1"), "--force"],
        timeout=300,
    )
    journal = node.run(
        [
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-u",
            "meshnode-agent",
            "-u",
            "meshnode-ztunnel",
            "-u",
            "meshnode-bpffs",
        ]
    ).stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr + journal
    for unit in ("meshnode-bpffs", "meshnode-ztunnel", "meshnode-agent"):
        state = node.run(["systemctl", "is-active", unit]).stdout.strip()
        assert state == "active", f"{unit}: {state}\n{journal}"
    assert node.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode == 0
    from meshnode.bpf.loader import MeshBpf
    from tests.support.bpf import MESH_PROGRAMS

    attached = MeshBpf.attached_programs(node.root_cgroup)  # the node's root, seen from the host
    assert sorted(p["attach_type"] for p in attached) == sorted(t for _, t in MESH_PROGRAMS), (
        journal
    )


def test_cleanup(setup: tuple[Cluster, Node, list[str]]) -> None:
    c, _, _ = setup
    c.close()
    assert c.leftovers() == []
    assert not Path(f"/run/netns/{c.fabric}").exists()
