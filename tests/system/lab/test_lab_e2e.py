"""The spine, end to end, in a real lab: network namespaces as nodes, real BPF
programs in the kernel, real TLS, unmodified curl in a workload's cgroup.

One lab for the module (named `mnci`, so it never touches a developer's lab);
its removal is itself tested at the end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.lab.lab import CP_PORT
from tests.support import TOOLS
from tests.support.bpf import MESH_PROGRAM_NAMES
from tests.support.labcli import LabCli
from tests.support.skips import requires_lab

pytestmark = [pytest.mark.root, requires_lab]

LAB = os.environ.get("MESHNODE_TEST_LAB", "mnci")  # another name for parallel runs
ENV = {**os.environ, "MESHNODE_LAB": LAB}
PY = sys.executable
MARKER = b"MESHNODE-PLAINTEXT-MARKER-7f3a9c"


meshnode = LabCli(LAB).run


def lab_exec(
    node: str, *cmd: str, workload: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    wl = ["--workload", workload] if workload else []
    return meshnode("lab", "exec", node, *wl, "--", *cmd, check=check)


# A resolver the test runs inside the lab (on the fabric, beside the control plane):
# the nodes' mesh DNS forwards every other name to it.
UPSTREAM = ("198.18.0.1", 10053)
EXTERNAL = ("ext.meshnode-test.example.", "192.0.2.7")


class Upstream:
    """A tiny authoritative server for EXTERNAL (dnspython builds every answer),
    UDP, bound inside the fabric's network namespace."""

    def __init__(self, netns: str) -> None:
        import socket
        import threading

        from tests.support.bpf import in_netns

        with in_netns(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(UPSTREAM)
        self.sock.settimeout(0.2)
        self.asked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rrset

        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - a timeout, or bytes that are not DNS
                continue
            self.asked += 1
            reply = dns.message.make_response(query)
            q = query.question[0]
            if q.name.to_text().lower() == EXTERNAL[0] and q.rdtype == 1:
                reply.answer.append(dns.rrset.from_text(EXTERNAL[0], 60, "IN", "A", EXTERNAL[1]))
            elif q.name.to_text().lower() != EXTERNAL[0]:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from meshnode.lab.lab import Lab

    meshnode("lab", "down", check=False)  # a leftover from an aborted run
    www = tmp_path_factory.mktemp("www")
    big = www / "big.bin"
    big.write_bytes(os.urandom(50 * 1024 * 1024))
    (www / "marker.txt").write_bytes(MARKER * 100)
    upstream: Upstream | None = None
    try:
        meshnode("lab", "up", "--nodes", "2", "--dns-upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}")
        upstream = Upstream(Lab(LAB).fabric)
        demo = [PY, "-m", "meshnode.lab.demo"]
        peer_sock = str(Lab(LAB).node_dir("node2") / "state" / "peer.sock")
        meshnode(
            "lab",
            "workload",
            "add",
            "node2",
            "api",
            "--service",
            "api",
            "--port",
            "8080",
            "--",
            *demo,
            "server",
            "--port",
            "8080",
            "--name",
            "api",
            "--peer-socket",
            peer_sock,
        )
        meshnode(
            "lab",
            "workload",
            "add",
            "node2",
            "files",
            "--service",
            "files",
            "--port",
            "8081",
            "--",
            PY,
            "-m",
            "http.server",
            "8081",
            "--directory",
            str(www),
        )
        meshnode(
            "lab",
            "workload",
            "add",
            "node1",
            "client",
            "--service",
            "client",
            "--port",
            "9090",
            "--",
            *demo,
            "idle",
        )
        status = json.loads(meshnode("lab", "status", "-o", "json").stdout)
        yield {"status": status, "big": big, "lab": Lab(LAB), "www": www, "upstream": upstream}
    finally:
        if upstream is not None:
            upstream.close()
        meshnode("lab", "down", check=False)


def vip(lab: dict, service: str) -> str:
    return next(s["vip"] for s in lab["status"]["services"] if s["name"] == service)


def test_status_shows_nodes_services_and_bpf_programs(lab: dict) -> None:
    st = lab["status"]
    assert [n["name"] for n in st["nodes"]] == ["node1", "node2"]
    for node in st["nodes"]:
        assert node["ready"] and node["agent_alive"]
        names = sorted(p["name"] for p in node["bpf_programs"])
        assert names == MESH_PROGRAM_NAMES
    for s in st["services"]:
        assert s["vip"].startswith("240.")
    assert {w["name"] for w in st["workloads"]} == {"api", "files", "client"}


def test_nodes_enrolled_with_the_real_control_plane(lab: dict) -> None:
    """The lab runs `meshnode controlplane run`; every node enrolled with a join
    token, and every certificate comes from that control plane's CA. No CA key
    exists outside the control plane's data dir."""
    st = lab["status"]
    cp = st["controlplane"]
    assert cp["alive"] and cp["url"] == "https://198.18.0.1:15012"
    lab_obj = lab["lab"]
    listed = lab_obj.admin().call("GET", "/v1/admin/nodes")["items"]
    assert {n["name"]: n["ip"] for n in listed} == {"node1": "198.18.0.11", "node2": "198.18.0.12"}
    for node in st["nodes"]:
        enrolled = node["enrollment"]
        assert enrolled["registered"] and enrolled["address"] == node["ip"]
        assert enrolled["spiffe_id"] == f"spiffe://cluster.local/node/{node['name']}"
    # Workload certificates chain to the control plane's root (its trust bundle).
    from cryptography import x509

    roots = x509.load_pem_x509_certificates((lab_obj.cp_dir / "trust-bundle.pem").read_bytes())
    leaf, inter = x509.load_pem_x509_certificates(
        (lab_obj.node_dir("node1") / "state" / "certs" / "default.client.pem").read_bytes()
    )
    inter.verify_directly_issued_by(roots[0])
    leaf.verify_directly_issued_by(inter)
    # Grants: one per identity, made by the lab as an operator would.
    grants = lab_obj.admin().call("GET", "/v1/admin/resources?kind=IdentityGrant")["items"]
    assert {g["metadata"]["name"] for g in grants} >= {"lab-node1-default-client"}
    # No CA private key anywhere in the lab but in the control plane's store: each
    # private key outside it belongs to a node or workload certificate, not a CA.
    from cryptography.hazmat.primitives import serialization

    ca_keys = {c.public_key().public_numbers() for c in (*roots, inter)}
    found = 0
    for path in lab_obj.dir.rglob("*.pem"):
        if path.is_relative_to(lab_obj.cp_dir) or b"PRIVATE KEY" not in path.read_bytes():
            continue
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert key.public_key().public_numbers() not in ca_keys, path
        found += 1
    assert found >= 4  # two node keys, at least two workload keys


def test_curl_through_vip_carries_the_client_identity(lab: dict) -> None:
    out = lab_exec(
        "node1",
        "curl",
        "-s",
        "--max-time",
        "10",
        f"http://{vip(lab, 'api')}:8080/",
        workload="client",
    ).stdout
    # The server learnt the client's proven identity from its own node's ztunnel,
    # and the connection reached it from node2's ztunnel (its inbound source address).
    assert "hello spiffe://cluster.local/ns/default/sa/client, this is api" in out
    assert "connection from 127.0.0.6:" in out


def test_50mb_transfer_is_byte_identical(lab: dict, tmp_path: Path) -> None:
    dest = tmp_path / "got.bin"
    lab_exec(
        "node1",
        "curl",
        "-sf",
        "--max-time",
        "120",
        "-o",
        str(dest),
        f"http://{vip(lab, 'files')}:8081/big.bin",
        workload="client",
    )
    want = hashlib.sha256(lab["big"].read_bytes()).hexdigest()
    got = hashlib.sha256(dest.read_bytes()).hexdigest()
    assert dest.stat().st_size == 50 * 1024 * 1024
    assert got == want


def _capture(lab: dict, tmp_path: Path, action) -> bytes:  # type: ignore[no-untyped-def]
    """Capture on the bridge between the nodes while `action` runs; returns the
    TCP payload bytes seen, and checks what the handshake looked like."""
    pcap = tmp_path / "wire.pcap"
    fabric = f"{LAB}-fabric"
    # On the bridge's port for node1: a capture on the bridge device itself
    # would only see frames addressed to the bridge.
    cap = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{fabric}",
            "--",
            "tcpdump",
            "-i",
            "veth-node1",
            "-Z",
            "root",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-w",
            str(pcap),
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not pcap.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        action()
        time.sleep(0.5)
    finally:
        cap.terminate()
        cap.wait(10)
    return pcap.read_bytes()


def _payloads(pcap_bytes: bytes, tmp_path: Path) -> list[tuple[int, int, bytes]]:
    from scapy.all import TCP, rdpcap

    path = tmp_path / "read.pcap"
    path.write_bytes(pcap_bytes)
    out = []
    for pkt in rdpcap(str(path)):
        if TCP in pkt and bytes(pkt[TCP].payload):
            out.append((pkt[TCP].sport, pkt[TCP].dport, bytes(pkt[TCP].payload)))
    return out


def _restart_ztunnel(lab: dict, node: str) -> None:
    """Kill the node's ztunnel; it is started again (as systemd restarts the
    unit) and gets its config from the agent. Pooled HBONE connections are gone,
    so the next request shows a full TLS handshake on the wire."""
    lab["lab"].restart_ztunnel(node)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = lab_exec(
            node,
            "curl",
            "-s",
            "--max-time",
            "2",
            "http://127.0.0.1:15021/healthz/ready",
            check=False,
        ).stdout
        if '"ready": true' in out:
            return
        time.sleep(0.2)
    raise AssertionError(f"ztunnel on {node} did not come back after being killed")


def test_wire_shows_tls_and_no_plaintext(lab: dict, tmp_path: Path) -> None:
    _restart_ztunnel(lab, "node1")
    url = f"http://{vip(lab, 'files')}:8081/marker.txt?q={MARKER.decode()}"

    def meshed() -> None:
        out = lab_exec("node1", "curl", "-sf", "--max-time", "10", url, workload="client").stdout
        assert MARKER.decode() in out  # the client did get the marker, through the mesh

    payloads = _payloads(_capture(lab, tmp_path, meshed), tmp_path)
    # The node's own calls to the control plane (its watch, its health reports
    # every 2 s in the lab; TLS as well) are not meshed traffic.
    payloads = [p for p in payloads if CP_PORT not in (p[0], p[1])]
    hbone = [p for p in payloads if 15008 in (p[0], p[1])]
    assert hbone, "no HBONE traffic crossed the link"
    assert all(15008 in (p[0], p[1]) for p in payloads), "meshed traffic used another port"
    # TLS records only: every payload starts a record or continues one; the
    # handshake (content type 22, TLS 1.3 via legacy version 0x0303) is there.
    wire = b"".join(p[2] for p in payloads)
    assert any(p[2][0] == 0x16 and p[2][1:3] == b"\x03\x01" for p in hbone), "no ClientHello"
    assert MARKER not in wire

    def control() -> None:  # the same fetch, unmeshed: the capture must see it
        lab_exec("node1", "curl", "-sf", "--max-time", "10", "http://198.18.0.12:8081/marker.txt")

    plain = b"".join(p[2] for p in _payloads(_capture(lab, tmp_path, control), tmp_path))
    assert MARKER in plain, "the capture cannot see plaintext; the check above proves nothing"


def test_non_workload_process_is_not_redirected(lab: dict) -> None:
    # Same destination as a workload would use, but from the node's system
    # cgroup: the BPF programs leave it alone, so it arrives from node1 directly.
    out = lab_exec("node1", "curl", "-s", "--max-time", "10", "http://198.18.0.12:8080/").stdout
    assert "not meshed" in out
    assert "connection from 198.18.0.11:" in out
    # A VIP means nothing outside the mesh: unroutable, so it fails.
    proc = lab_exec(
        "node1", "curl", "-s", "--max-time", "3", f"http://{vip(lab, 'api')}:8080/", check=False
    )
    assert proc.returncode != 0


def test_destination_outside_the_mesh_is_not_redirected(lab: dict) -> None:
    from meshnode.lab import host

    lab_obj = lab["lab"]
    st = lab_obj.load()
    outside = host.spawn(
        st.nodes["node2"].netns,
        Path(st.nodes["node2"].cgroup) / "system",
        [PY, "-m", "meshnode.lab.demo", "server", "--port", "9999", "--name", "outside"],
    )
    try:
        deadline = time.monotonic() + 10
        while not host.listening(st.nodes["node2"].netns, 9999) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = lab_exec(
            "node1", "curl", "-s", "--max-time", "10", "http://198.18.0.12:9999/", workload="client"
        ).stdout
        assert "this is outside" in out
        assert "not meshed" in out and "connection from 198.18.0.11:" in out
    finally:
        outside.terminate()
        outside.wait(5)


@pytest.mark.parametrize("case", ["other-ca", "no-cert", "good"])
def test_hbone_listener_checks_client_certificates(lab: dict, tmp_path: Path, case: str) -> None:
    from meshnode.controlplane.ca import CertificateAuthority
    from meshnode.core.fsutil import write_file_atomic
    from meshnode.core.identity import SpiffeId
    from meshnode.core.pki import generate_private_key, make_csr, write_private_key

    lab_obj = lab["lab"]
    ident = SpiffeId("cluster.local", "default", "client")
    node1 = lab_obj.node_dir("node1")
    bundle = node1 / "etc" / "bundle.pem"  # the mesh's roots, as node1 got them
    args = ["198.18.0.12", "15008", SpiffeId("cluster.local", "default", "api").sni, str(bundle)]
    if case == "good":  # the certificate the control plane issued to node1's client
        certs = node1 / "state" / "certs"
        args += [str(certs / "default.client.pem"), str(certs / "default.client-key.pem")]
    elif case == "other-ca":  # the same identity, from a CA the mesh does not trust
        key = generate_private_key()
        write_private_key(tmp_path / "k.pem", key)
        write_file_atomic(
            tmp_path / "c.pem",
            CertificateAuthority.create("cluster.local").issue_workload_certificate(
                make_csr(key, ident), ident
            ),
            0o644,
        )
        args += [str(tmp_path / "c.pem"), str(tmp_path / "k.pem")]
    out = lab_exec("node1", PY, str(TOOLS / "hbone_probe.py"), *args).stdout.strip()
    if case == "good":
        assert out == "ACCEPTED"
    else:
        assert out.startswith("REFUSED"), out


# -- mesh DNS (docs/dns.md) -----------------------------------------------------------


def getent(node: str, name: str, workload: str | None = "client") -> list[str]:
    """`getent hosts NAME` as the workload runs it (unmodified: its glibc, the node's
    resolv.conf); the addresses, [] when it does not resolve."""
    proc = lab_exec(node, "getent", "hosts", name, workload=workload, check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def dns_queries(node: str) -> float:
    """The node's mesh DNS proxy's meshnode_dns_queries_total, summed."""
    from meshnode.ztunnel.metrics import parse_exposition

    text = lab_exec(node, "curl", "-s", "--max-time", "5", "http://127.0.0.1:15020/metrics").stdout
    return sum(s.value for s in parse_exposition(text) if s.name == "meshnode_dns_queries_total")


def test_mesh_names_resolve_in_an_unmodified_workload_and_calls_by_name_are_meshed(
    lab: dict,
) -> None:
    assert getent("node1", "api.default.mesh") == [vip(lab, "api")]
    assert getent("node1", "API.mesh") == [vip(lab, "api")]  # default namespace, any case
    assert getent("node1", "nothing.default.mesh") == []
    out = lab_exec(
        "node1", "curl", "-s", "--max-time", "10", "http://api.default.mesh:8080/",
        workload="client",
    ).stdout  # fmt: skip
    assert "hello spiffe://cluster.local/ns/default/sa/client, this is api" in out
    # The operator's view: `meshnode dns lookup` asks the node's proxy directly.
    looked = lab_exec(
        "node1", PY, "-m", "meshnode.cli.main", "dns", "lookup", "api.default.mesh", "-o", "json"
    )
    got = json.loads(looked.stdout)
    assert got["rcode"] == "NOERROR" and got["authoritative"]
    assert got["answers"] == [f"api.default.mesh. 5 A {vip(lab, 'api')}"]


def test_other_names_are_forwarded_to_the_nodes_resolver(lab: dict) -> None:
    asked = lab["upstream"].asked
    assert getent("node1", EXTERNAL[0].rstrip(".")) == [EXTERNAL[1]]
    assert lab["upstream"].asked > asked


def test_a_non_workload_process_never_reaches_the_mesh_dns(lab: dict) -> None:
    before = dns_queries("node1")
    # From the node's system cgroup: the host's resolver is asked, which knows no
    # mesh names (and, in the lab's network namespace, is not even reachable).
    assert getent("node1", "api.default.mesh", workload=None) == []
    assert dns_queries("node1") == before
    assert getent("node1", "api.default.mesh") == [vip(lab, "api")]
    assert dns_queries("node1") > before  # the counter does move for a workload


POLLER = """
import socket, sys, time
name, want = sys.argv[1], sys.argv[2] == "present"
deadline = time.time() + 60
while time.time() < deadline:
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET)
        ok = True
    except socket.gaierror:
        ok = False
    if ok == want:
        print(time.time(), flush=True)
        sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
"""


def _watch_name(name: str, want: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "meshnode.cli.main", "lab", "exec", "node1", "--workload", "client",
         "--", PY, "-c", POLLER, name, want],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _when_registered(lab: dict, name: str, present: bool, limit: float = 60) -> float:
    """When the control plane first lists (or no longer lists) workload `name`."""
    admin = lab["lab"].admin()
    deadline = time.time() + limit
    while time.time() < deadline:
        names = {w["name"] for w in admin.call("GET", "/v1/admin/workloads")["items"]}
        if (name in names) == present:
            return time.time()
        time.sleep(0.02)
    raise AssertionError(f"workload {name} never {'appeared' if present else 'went'}")


def test_a_new_service_resolves_and_a_deleted_one_stops_within_2_seconds(lab: dict) -> None:
    import threading

    name = "fresh.default.mesh"
    watcher = _watch_name(name, "present")
    time.sleep(1.0)  # the poller is running (and not resolving) before the service exists
    seen: dict[str, float] = {}
    t = threading.Thread(target=lambda: seen.update(at=_when_registered(lab, "fresh", True)))
    t.start()
    meshnode("lab", "workload", "add", "node2", "fresh", "--service", "fresh", "--port", "8085",
             "--", PY, "-m", "http.server", "8085")  # fmt: skip
    t.join(70)
    out, err = watcher.communicate(timeout=70)
    assert watcher.returncode == 0, err
    resolved = float(out.split()[0])
    assert resolved - seen["at"] < 2.0, f"resolved {resolved - seen['at']:.2f} s after registration"

    watcher = _watch_name(name, "absent")
    time.sleep(1.0)
    t = threading.Thread(target=lambda: seen.update(gone=_when_registered(lab, "fresh", False)))
    t.start()
    meshnode("lab", "workload", "rm", "fresh")
    t.join(70)
    out, err = watcher.communicate(timeout=70)
    assert watcher.returncode == 0, err
    gone = float(out.split()[0])
    assert gone - seen["gone"] < 2.0, f"still resolved {gone - seen['gone']:.2f} s after delete"


def test_names_resolve_and_calls_by_name_work_while_the_control_plane_is_down(
    lab: dict,
) -> None:
    lab_obj = lab["lab"]
    lab_obj.stop_controlplane()
    try:
        assert getent("node1", "api.default.mesh") == [vip(lab, "api")]
        out = lab_exec(
            "node1", "curl", "-s", "--max-time", "10", "http://api.default.mesh:8080/",
            workload="client",
        ).stdout  # fmt: skip
        assert "this is api" in out
    finally:
        lab_obj.start_controlplane()


def test_lab_down_leaves_nothing(lab: dict) -> None:
    """Runs last in this module (pytest keeps file order): take the lab down
    and look for anything it left."""
    lab_obj = lab["lab"]
    prog_ids = {p["id"] for n in lab["status"]["nodes"] for p in n["bpf_programs"]}
    cgroup_root = lab_obj.cgroup_root()
    meshnode("lab", "down")
    left = (
        [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{LAB}-")]
        if os.path.isdir("/run/netns")
        else []
    )
    assert left == []
    assert not cgroup_root.exists()
    assert not lab_obj.pin_root().exists()
    assert not lab_obj.dir.exists()
    progs = json.loads(
        subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
        or "[]"
    )
    assert prog_ids and not prog_ids & {p["id"] for p in progs}
    ps = subprocess.run(["pgrep", "-f", f"lab-{LAB}/"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
