"""The whole thing on nodes with a real systemd (systemd-nspawn, tests/support/nspawn.py):
a control plane, two nodes that install the Debian package (scripts/build-deb.sh) and
enroll with `meshnode enroll` (agent and ztunnel as the package's systemd units), demo
workloads as systemd units registered with `meshnode
workload add --systemd-unit`, and then:

- traffic flows between the nodes' workloads, with mTLS identities;
- `meshnode status` tells the truth;
- the control plane goes away: a live connection keeps going, new connections
  work, an agent restarted meanwhile comes back from its snapshot, and a policy
  changed meanwhile (through another control-plane process on the same
  database) reaches the nodes when the control plane returns;
- certificates (120 s TTL here) rotate under a live connection without dropping it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import TOOLS
from tests.support.bpf import MESH_PROGRAM_NAMES
from tests.support.nspawn import REPO, Cluster, Node
from tests.system.nspawn.meshkit import (
    NODE_MESHNODE,
    admin,
    apt,
    in_unit,
    journal,
    node_status,
    rootfs_or_skip,
    start_cp,
    wait_for,
)

pytestmark = [pytest.mark.root]

MESHNODE = NODE_MESHNODE  # the package's, in the nodes
PY = str(REPO / ".venv" / "bin" / "python")  # the workloads' (demo servers, test tools)
SUBNET = "198.18.3.0/24"
PORT = 15012
CERT_TTL = "120s"  # short enough to rotate in a test, long enough to outlive the outage test


@dataclass
class Mesh:
    cluster: Cluster
    n1: Node
    n2: Node
    data: Path
    ns: list[str]
    cp: subprocess.Popen[bytes] | None

    @property
    def url(self) -> str:
        return f"https://{self.cluster.gateway}:{PORT}"

    def start_cp(self, listen: str | None = None) -> subprocess.Popen[bytes]:
        host, port = (listen or f"0.0.0.0:{PORT}").rsplit(":", 1)
        return start_cp(
            self.ns, self.data, self.cluster.gateway, int(port), ("--cert-ttl", CERT_TTL), host
        )

    def admin(self, *args: str, input: str | None = None) -> str:
        return admin(self.ns, self.data, *args, input=input)


@pytest.fixture(scope="module")
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    rootfs = rootfs_or_skip("systemd mesh test")
    deb: Path = request.getfixturevalue("meshnode_deb")
    data = tmp_path_factory.mktemp("cp")
    c = Cluster(SUBNET, rootfs)
    m = None
    try:
        ns = ["nsenter", f"--net=/run/netns/{c.host_side()}", "--"]
        bind = [f"--bind-ro={deb.parent}:/srv/pkg"]
        m = Mesh(c, c.boot("n1", bind), c.boot("n2", bind), data, ns, None)
        m.cp = m.start_cp()
        # Each token grants the identities its node will host (day 0, no other step).
        grants = {"n1": ["default/web"], "n2": ["default/api", "default/echo"]}
        for node in (m.n1, m.n2):
            node.wait_for_system()
            r = apt(node, "install", f"/srv/pkg/{deb.name}")
            assert r.returncode == 0, r.stdout + r.stderr
            flags = [f for ident in grants[node.name] for f in ("--identity", ident)]
            out = m.admin(
                "token",
                "create",
                "--node",
                node.name,
                *flags,
                "--cp",
                f"https://127.0.0.1:{PORT}",
            )
            token = next(w for w in out.split() if w.startswith("mn1."))
            proc = node.run([MESHNODE, "enroll", "--cp", m.url, "--token", token], timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr + journal(node)
        # Workloads: systemd units of their nodes.
        demo = [PY, "-m", "meshnode.lab.demo"]
        m.n2.run(
            [
                "systemd-run",
                "--unit",
                "demo-api",
                "--",
                *demo,
                "server",
                "--port",
                "8080",
                "--name",
                "api",
            ],
            check=True,
        )
        m.n2.run(
            [
                "systemd-run",
                "--unit",
                "demo-echo",
                "--",
                *demo,
                "echo-server",
                "--port",
                "7000",
                "--name",
                "echo",
            ],
            check=True,
        )
        m.n1.run(["systemd-run", "--unit", "demo-web", "--", *demo, "idle"], check=True)
        for node, name, svc, port, unit in (
            (m.n2, "api", "api", "8080", "demo-api.service"),
            (m.n2, "echo", "echo", "7000", "demo-echo.service"),
            (m.n1, "web", "web", "9090", "demo-web.service"),
        ):
            proc = node.run(
                [
                    MESHNODE,
                    "workload",
                    "add",
                    name,
                    "--service",
                    svc,
                    "--port",
                    port,
                    "--systemd-unit",
                    unit,
                ],
                timeout=60,
            )
            assert proc.returncode == 0 and "applied" in proc.stdout, (
                proc.stdout + proc.stderr + journal(node)
            )
        yield m
    finally:
        if m is not None and m.cp is not None and m.cp.poll() is None:
            m.cp.terminate()
            m.cp.wait(10)
        c.close()


def vip_of(m: Mesh, service: str) -> str:
    def find() -> str | None:
        svcs = node_status(m.n1).get("services", [])
        return next((s["vip"] for s in svcs if s["name"] == service), None)

    return str(wait_for(f"service {service} on n1", find, timeout=30))


def curl_api(m: Mesh) -> subprocess.CompletedProcess[str]:
    r = in_unit(
        m.n1,
        "demo-web.service",
        ["curl", "-s", "--max-time", "5", f"http://{vip_of(m, 'api')}:8080/"],
    )
    assert isinstance(r, subprocess.CompletedProcess)
    return r


def test_enrolled_nodes_carry_traffic_with_identities(mesh: Mesh) -> None:
    out = wait_for(
        "api through the mesh",
        lambda: "this is api" in (r := curl_api(mesh)).stdout and r.stdout,
        60,
    )
    print(f"\nn1 web -> n2 api: {out.strip()}")
    assert "hello spiffe://cluster.local/ns/default/sa/web, this is api" in out
    assert "connection from 127.0.0.6:" in out  # delivered by n2's ztunnel


def test_status_shows_the_node(mesh: Mesh) -> None:
    st = node_status(mesh.n1)
    text = mesh.n1.run([MESHNODE, "status"]).stdout
    print("\n" + text)
    assert st["node"]["name"] == "n1"
    assert st["control_plane_reachable"] is True
    assert st["agent"]["running"] and st["ztunnel"].startswith("ready")
    assert sorted(p["name"] for p in st["bpf_programs"]) == MESH_PROGRAM_NAMES
    assert st["bind_guard"]["on"], st["bind_guard"]
    # The units' ztunnel runs the mesh DNS, and the agent captures workloads' DNS.
    assert st["dns"] == {
        "server": "127.0.0.1:15053",
        "state": "answering",
        "domain": "mesh",
        "capture": True,
    }, st["dns"]
    assert [w["name"] for w in st["workloads"]] == ["web"]
    assert st["workloads"][0]["certificate"].startswith("expires")
    assert {s["name"] for s in st["services"]} >= {"api", "echo", "web"}


def test_a_node_cannot_host_an_identity_it_was_not_granted(mesh: Mesh) -> None:
    """Issue 10, attack 1: n1, enrolled with a token granting default/web, asks
    to host prod/payments through the real CLI. The control plane refuses it and
    says which grant is missing; nothing becomes an endpoint. Then the operator
    grants it and the same command works (the control case)."""
    argv = [
        MESHNODE, "workload", "add", "pay", "--namespace", "prod", "--service", "payments",
        "--port", "8443", "--systemd-unit", "demo-web.service",
    ]  # fmt: skip
    proc = mesh.n1.run(argv, timeout=60)
    print(f"\n{proc.stdout}{proc.stderr}")
    assert proc.returncode != 0
    assert "not granted identity prod/payments" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    services = json.loads(mesh.admin("get", "services", "-o", "json"))["items"]
    assert not [s for s in services if s["name"] == "payments"]
    grant = "kind: IdentityGrant\nmetadata: {name: n1-payments}\n"
    grant += "spec: {nodes: [n1], identities: [prod/payments]}\n"
    mesh.admin("apply", "-f", "-", input=grant)
    try:
        proc = mesh.n1.run(argv, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        services = json.loads(mesh.admin("get", "services", "-o", "json"))["items"]
        pay = [s for s in services if s["name"] == "payments"]
        assert [e["node"] for e in pay[0]["endpoints"]] == ["n1"]
    finally:
        mesh.n1.run([MESHNODE, "workload", "rm", "pay"], timeout=60)
        mesh.admin("delete", "identitygrant", "n1-payments")


def test_a_local_process_cannot_pose_as_the_proxy(mesh: Mesh) -> None:
    """Issue 10, attack 2: on the server's node, a local process (a transient
    unit, outside ztunnel's slice) binds the delivery address to reach a
    workload as if delivered by the proxy, or takes a proxy port on another
    address -- among them the mesh DNS port, joining ztunnel's SO_REUSEPORT group
    to answer a share of the workloads' DNS itself. The agent's bind guard refuses
    them all with EPERM."""
    n2 = mesh.n2
    ip = node_status(n2)["node"]["ip"]
    probe = (
        "import socket, sys\n"
        "U, T = socket.SOCK_DGRAM, socket.SOCK_STREAM\n"
        "for fam, kind, addr in ((socket.AF_INET, T, ('127.0.0.6', 0)),"
        " (socket.AF_INET, T, ('127.0.0.1', 15001)), (socket.AF_INET6, T, ('::1', 15001)),"
        " (socket.AF_INET, U, ('127.0.0.1', 15053)), (socket.AF_INET, U, ('0.0.0.0', 15053)),"
        " (socket.AF_INET, T, ('127.0.0.1', 15053))):\n"
        "    s = socket.socket(fam, kind)\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "    try:\n"
        "        s.bind(addr); print('bound', addr)\n"
        "    except OSError as e:\n"
        "        print('refused' if e.errno == 1 else 'other', addr, e.errno)\n"
    )
    r = n2.run(["systemd-run", "--wait", "--pipe", "--quiet", "--", PY, "-c", probe])
    print("\n" + r.stdout + r.stderr)
    lines = r.stdout.splitlines()
    assert any(ln.startswith("refused ('127.0.0.6'") for ln in lines), lines
    assert sum(ln.startswith("refused") and "15053" in ln for ln in lines) == 3, lines
    # 127.0.0.1:15001 is ztunnel's own listener: EADDRINUSE or EPERM, never bound.
    assert not any(ln.startswith("bound") for ln in lines), lines
    curl = n2.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            "--",
            "curl",
            "-s",
            "--max-time",
            "5",
            "--interface",
            "127.0.0.6",
            f"http://{ip}:8080/",
        ]
    )
    assert curl.returncode != 0 and "this is api" not in curl.stdout, curl.stdout
    # The mesh itself still delivers (ztunnel, in its slice, binds 127.0.0.6).
    assert "this is api" in curl_api(mesh).stdout


def long_connection(m: Mesh, seconds: float) -> subprocess.Popen[str]:
    proc = in_unit(
        m.n1,
        "demo-web.service",
        [PY, str(TOOLS / "longconn.py"), vip_of(m, "echo"), "7000", "--seconds", str(seconds)],
        background=True,
    )
    assert isinstance(proc, subprocess.Popen) and proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish(proc: subprocess.Popen[str]) -> dict:  # type: ignore[type-arg]
    out, _ = proc.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def test_control_plane_outage(mesh: Mesh) -> None:
    live = long_connection(mesh, seconds=25)
    assert mesh.cp is not None
    mesh.cp.terminate()
    mesh.cp.wait(10)
    wait_for(
        "n1 to notice the control plane is gone",
        lambda: node_status(mesh.n1).get("control_plane_reachable") is False,
        60,
    )
    assert "this is api" in curl_api(mesh).stdout  # new connections still work
    # An agent restarted while the control plane is down comes back from its snapshot.
    mesh.n1.run(["systemctl", "restart", "meshnode-agent"], check=True)
    wait_for("the restarted agent", lambda: node_status(mesh.n1)["agent"]["running"], 30)
    assert "this is api" in curl_api(mesh).stdout
    # A policy changed meanwhile: another control-plane process on the same
    # database, reachable only from the host side, takes the change.
    side = mesh.start_cp(listen="127.0.0.1:15013")
    mesh.admin(
        "apply",
        "-f",
        "-",
        "--cp",
        "https://127.0.0.1:15013",
        input="""
kind: AuthorizationPolicy
metadata: {name: api-nobody}
spec:
  action: DENY
  selector: {services: [api]}
  rules:
    - from: {principals: ["spiffe://cluster.local/ns/default/sa/web"]}
""",
    )
    side.terminate()
    side.wait(10)
    assert "this is api" in curl_api(mesh).stdout  # not yet: the nodes can't know
    result = finish(live)
    print(f"\nlive connection across the outage and the agent restart: {result}")
    assert result["error"] == "" and result["answered"] == result["sent"] > 50
    mesh.cp = mesh.start_cp()
    wait_for("the policy to reach n2", lambda: curl_api(mesh).returncode != 0, 60, every=1)
    mesh.admin("delete", "AuthorizationPolicy", "api-nobody", "--cp", f"https://127.0.0.1:{PORT}")
    wait_for(
        "the policy removal to reach n2",
        lambda: "this is api" in curl_api(mesh).stdout,
        60,
        every=1,
    )


def test_certificates_rotate_under_live_traffic(mesh: Mesh) -> None:
    cert = "/var/lib/meshnode/certs/default.web.pem"

    def fingerprint() -> str:
        return mesh.n1.run(["sha256sum", cert], check=True).stdout.split()[0]

    before = fingerprint()
    live = long_connection(mesh, seconds=75)  # past the 60 s half-life of a 120 s certificate
    wait_for("the web certificate to rotate", lambda: fingerprint() != before, 70, every=1)
    after = fingerprint()
    result = finish(live)
    print(f"\nlive connection across certificate rotation: {result}")
    assert result["error"] == "" and result["answered"] == result["sent"] > 100
    assert after != before
    assert "this is api" in curl_api(mesh).stdout  # new connections, new certificates


def test_restarted_workload_unit_stays_meshed(mesh: Mesh) -> None:
    """A unit restart re-creates its cgroup under a new id: the agent must
    follow it, or the workload silently stops being meshed."""

    def cgroup_ino() -> str:
        return mesh.n1.run(
            ["stat", "-c", "%i", "/sys/fs/cgroup/system.slice/demo-web.service"], check=True
        ).stdout.strip()

    before = cgroup_ino()
    mesh.n1.run(["systemctl", "restart", "demo-web.service"], check=True)
    assert cgroup_ino() != before  # a new cgroup: what the BPF map had is stale
    out = wait_for(
        "web to be meshed again",
        lambda: "this is api" in (r := curl_api(mesh)).stdout and r.stdout,
        20,
    )
    assert "hello spiffe://cluster.local/ns/default/sa/web" in out


def test_second_enroll_changes_nothing(mesh: Mesh) -> None:
    before = mesh.n1.run(["sha256sum", "/etc/meshnode/node.json"], check=True).stdout
    out = mesh.n1.run(
        [
            MESHNODE,
            "enroll",
            "--cp",
            mesh.url,
            "--token",
            "mn1.00000000.00000000000000000000000000000000." + "0" * 64,
        ]
    )
    assert out.returncode == 0 and out.stdout.startswith("already enrolled as n1")
    assert mesh.n1.run(["sha256sum", "/etc/meshnode/node.json"], check=True).stdout == before


def test_cleanup_leaves_nothing(mesh: Mesh) -> None:
    mesh.cluster.close()
    assert mesh.cluster.leftovers() == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
