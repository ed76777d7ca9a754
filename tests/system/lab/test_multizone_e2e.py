"""Multi-zone, end to end (docs/multizone.md, issue 12): `meshnode lab up --zones 2
--nodes 2` builds a global control plane on a WAN, and two zones, each with its
own network, control plane and ingress on its last node:

    zone-a 198.18.1.0/24: node1 .11, node2 .12 (ingress :15443)
    zone-b 198.18.2.0/24: node3 .13, node4 .14 (ingress :15443)
    WAN 198.18.200.0/24: the global control plane .1, zone-a's router .11, zone-b's .12

Real processes, eBPF, TLS. A call crosses zones through the ingress with the
caller's proven identity and nothing but TLS on the WAN; another zone's nodes are
neither reachable nor known; traffic fails over to the other zone and comes back;
the mesh keeps working with the global or a zone control plane down, and a policy
applied after the global's restart reaches both zones. Each test prints what it
measured.

One lab for the module (`mnmz` unless $MESHNODE_TEST_LAB_MZ says otherwise). The
tests run in file order; each leaves the lab as it found it (what it stops, it
starts again; what it adds stays, for the tests after it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.lab.lab import CP_PORT
from tests.support import TOOLS
from tests.support.labcli import DEMO, LabCli
from tests.support.skips import requires_lab

pytestmark = [
    pytest.mark.root,
    requires_lab,
    pytest.mark.skipif(
        shutil.which("iptables") is None, reason="`iptables` is not installed (zone routers)"
    ),
]

LAB = os.environ.get("MESHNODE_TEST_LAB_MZ", "mnmz")
PY = sys.executable
LABCLI = LabCli(LAB)
meshnode = LABCLI.run
MARKER = "MESHNODE-MZ-PLAINTEXT-5d1e7b"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
API_ID = "spiffe://cluster.local/ns/default/sa/api"
ZONE_A_INGRESS, ZONE_B_INGRESS = "198.18.1.12", "198.18.2.14"
NODE3 = "198.18.2.13"  # zone-b, not its ingress
ZONE_B_NODES = ("node3", "node4")
INGRESS_PORT = 15443
TLS_TYPES = (20, 21, 22, 23)  # change_cipher_spec, alert, handshake, application_data
TLS_VERSIONS = (b"\x03\x01", b"\x03\x03")  # a record's legacy version (TLS 1.3 included)


def _peer_sock(node: str) -> str:
    from meshnode.lab.lab import Lab

    return str(Lab(LAB).node_dir(node) / "state" / "peer.sock")


def _server(node: str, name: str, service: str, port: int) -> None:
    """A demo HTTP server workload that greets callers by their proven identity."""
    LABCLI.add(
        node, name, service, port,
        *DEMO, "server", "--port", str(port), "--name", name, "--peer-socket", _peer_sock(node),
    )  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    from meshnode.lab.lab import Lab

    meshnode("lab", "down", check=False)  # a leftover from an aborted run
    started = time.monotonic()
    try:
        meshnode("lab", "up", "--zones", "2", "--nodes", "2")
        up = time.monotonic() - started
        # api runs only in zone-b, on node3 (not the ingress: node4 must forward it).
        _server("node3", "api", "api", 8080)
        # client, on node1 in zone-a, calls; it is also a server, zone-a's service.
        _server("node1", "client", "client", 9090)
        _server("node2", "web", "web", 8081)  # zone-a's, on its ingress node

        print(
            f"\nlab up --zones 2 --nodes 2 in {up:.1f}s; with 3 workloads "
            f"{time.monotonic() - started:.1f}s"
        )
        yield {"lab": Lab(LAB), "status": LABCLI.status()}
    finally:
        meshnode("lab", "down", check=False)


def curl(node: str, workload: str, url: str, *args: str, max_time: float = 5) -> str:
    """curl from a workload (meshed); its output, or FAILED <exit code>."""
    proc = LABCLI.exec(
        node, "curl", "-s", "--max-time", str(max_time), *args, url,
        workload=workload, check=False,
    )  # fmt: skip
    return proc.stdout if proc.returncode == 0 else f"FAILED {proc.returncode}"


def test_status_shows_the_global_the_zones_and_remote_services(lab: dict[str, Any]) -> None:
    st = lab["status"]
    cp = st["controlplane"]
    assert cp["alive"] and cp["url"] == "https://198.18.200.1:15012"
    zones = {z["name"]: z for z in st["zones"]}
    assert set(zones) == {"zone-a", "zone-b"}
    assert zones["zone-a"]["ingress"] == f"{ZONE_A_INGRESS}:{INGRESS_PORT}"
    assert zones["zone-b"]["ingress_node"] == "node4"
    for z in zones.values():
        assert z["alive"] and z["connected"], z
        assert z["global_revision"] >= 1
    assert {n["name"]: (n["zone"], n["ip"]) for n in st["nodes"]} == {
        "node1": ("zone-a", "198.18.1.11"),
        "node2": ("zone-a", ZONE_A_INGRESS),
        "node3": ("zone-b", NODE3),
        "node4": ("zone-b", ZONE_B_INGRESS),
    }
    assert all(n["ready"] and n["enrollment"]["registered"] for n in st["nodes"])
    api_a = next(s for s in st["services"] if s["name"] == "api" and s["zone"] == "zone-a")
    assert api_a["endpoints"] == []
    assert api_a["remote"] == [
        {"zone": "zone-b", "ingress": f"{ZONE_B_INGRESS}:{INGRESS_PORT}", "endpoints": 1}
    ]
    text = meshnode("lab", "status").stdout
    print("\n" + "\n".join(line for line in text.splitlines() if "bpf:" not in line))
    assert "GLOBAL CONTROL PLANE https://198.18.200.1:15012" in text
    assert "zone-b (1 via 198.18.2.14:15443)" in text


# -- 1. a call across zones, and what the WAN sees ------------------------------------


def _capture(tmp_path: Path, iface: str, action: Any) -> list[tuple[str, int, str, int, bytes]]:
    """The TCP payloads on the WAN port `iface` (in the WAN namespace) while
    `action` runs: (src, sport, dst, dport, payload). Bounded: 5000 packets, and
    stopped right after the action."""
    from scapy.all import IP, TCP, rdpcap

    pcap = tmp_path / f"wan-{time.monotonic_ns()}.pcap"
    cap = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{LAB}-wan", "--", "tcpdump", "-i", iface, "-Z", "root",
         "-U", "--immediate-mode", "-s", "0", "-c", "5000", "-w", str(pcap), "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
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
    out = []
    for pkt in rdpcap(str(pcap)):
        if IP in pkt and TCP in pkt and bytes(pkt[TCP].payload):
            ip, tcp = pkt[IP], pkt[TCP]
            out.append((ip.src, tcp.sport, ip.dst, tcp.dport, bytes(tcp.payload)))
    return out


def _tls_records(stream: bytes) -> int | None:
    """How many TLS records `stream` is, exactly; None if it is anything else."""
    i = count = 0
    while i < len(stream):
        head = stream[i : i + 5]
        if len(head) < 5 or head[0] not in TLS_TYPES or head[1:3] not in TLS_VERSIONS:
            return None
        i += 5 + int.from_bytes(head[3:5], "big")
        count += 1
    return count if i == len(stream) else None


def _ingress_forwarded(node: str, service: str) -> float:
    from meshnode.ztunnel.metrics import parse_exposition

    text = LABCLI.exec(
        node, "curl", "-sf", "--max-time", "5", "http://127.0.0.1:15020/metrics"
    ).stdout
    return sum(
        s.value
        for s in parse_exposition(text)
        if s.name == "meshnode_ingress_connections_total"
        and s.labels.get("service") == service
        and s.labels.get("result") == "forwarded"
    )


def test_a_call_to_a_service_only_zone_b_runs_crosses_as_tls_with_the_callers_identity(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    vip = LABCLI.vip("api", "zone-a", lab["status"])
    sni = b"api.default.8080.zone-b.mz.cluster.local"
    forwarded = _ingress_forwarded("node4", "api")
    got: dict[str, str] = {}

    def call() -> None:  # the first call of api: a fresh TLS connection to the ingress
        got["out"] = curl("node1", "client", f"http://{vip}:8080/{MARKER}", "-H", f"X-M: {MARKER}")

    wan = _capture(tmp_path, "veth-zone-a", call)
    out = got["out"]
    assert f"hello {CLIENT_ID}, this is api" in out, out
    assert "connection from 127.0.0.6:" in out  # from node3's proxy, inbound
    mesh = [p for p in wan if CP_PORT not in (p[1], p[3])]  # the zones' sync is TLS too
    to_ingress = [
        p
        for p in mesh
        if (p[2], p[3]) == (ZONE_B_INGRESS, INGRESS_PORT)
        or (p[0], p[1]) == (ZONE_B_INGRESS, INGRESS_PORT)
    ]
    hellos = [p for p in to_ingress if p[4][:3] == b"\x16\x03\x01" and sni in p[4]]
    wire = b"".join(p[4] for p in wan)
    after = _ingress_forwarded("node4", "api")
    print(
        f"\ncross-zone call node1 -> {vip}:8080 (api, only on node3 in zone-b): {out.strip()}\n"
        f"WAN (zone-a's router port): {len(wan)} TCP payload packets, {len(wire)} bytes; "
        f"{len(to_ingress)} to/from {ZONE_B_INGRESS}:{INGRESS_PORT}, "
        f"{len(wan) - len(mesh)} control-plane sync (:{CP_PORT}), other: "
        f"{len(mesh) - len(to_ingress)}; ClientHello with SNI {sni.decode()}: {len(hellos)}; "
        f"marker on the wire: {MARKER.encode() in wire}; node4's ingress forwarded "
        f"+{after - forwarded:.0f} api connection(s)"
    )
    assert to_ingress and mesh == to_ingress, "meshed traffic crossed the WAN elsewhere"
    assert hellos, "no ClientHello naming the zone SNI crossed the WAN"
    # TLS records only, from the first byte of each direction's stream to the last.
    streams: dict[tuple[str, int, str, int], bytes] = {}
    for src, sport, dst, dport, payload in to_ingress:
        streams[(src, sport, dst, dport)] = streams.get((src, sport, dst, dport), b"") + payload
    records = {f"{k[0]}:{k[1]}>{k[2]}:{k[3]}": _tls_records(v) for k, v in streams.items()}
    print(f"TLS records per direction: {records}")
    assert all(n is not None and n > 0 for n in records.values()), records
    assert MARKER.encode() not in wire
    assert after - forwarded >= 1

    def plaintext() -> None:  # the same marker, unmeshed, to the same address
        LABCLI.exec(
            "node1", "curl", "-s", "--max-time", "3",
            f"http://{ZONE_B_INGRESS}:{INGRESS_PORT}/{MARKER}", check=False,
        )  # fmt: skip

    seen = b"".join(p[4] for p in _capture(tmp_path, "veth-zone-a", plaintext))
    assert MARKER.encode() in seen, "the capture cannot see plaintext: the check above is void"


# -- 2. isolation ------------------------------------------------------------------------


def test_zone_b_nodes_are_neither_reachable_nor_known_from_zone_a(lab: dict[str, Any]) -> None:
    probes = {
        # (from, to, port): must it connect?
        ("node1", NODE3, 15008): False,  # zone-b's HBONE port, not its ingress
        ("node1", NODE3, 8080): False,  # api's own port
        ("node1", ZONE_B_INGRESS, 15008): False,  # the ingress node, but not its ingress
        # zone-a's ingress node has a route to zone-b (for its replies): the router's
        # filter still refuses it anything but zone-b's ingress.
        ("node2", NODE3, 15008): False,
        ("node3", "198.18.1.11", 15008): False,  # and the other way
        ("node1", "198.18.200.1", CP_PORT): False,  # nodes never reach the WAN
        ("node1", ZONE_B_INGRESS, INGRESS_PORT): True,  # the control: the ingress does
        ("node3", ZONE_A_INGRESS, INGRESS_PORT): True,
    }
    lines = []
    for (node, host, port), want in probes.items():
        got = LABCLI.connects(node, host, port)
        lines.append(f"  {node} -> {host}:{port}: {got}")
        assert got.startswith("CONNECTED") == want, lines[-1]
    # zone-b's router (and control plane) to zone-a's control plane: routed, refused.
    probe = subprocess.run(
        ["nsenter", f"--net=/run/netns/{LAB}-zone-b", "--", PY, "-c",
         "import socket; socket.create_connection(('198.18.1.1', 15012), 3)"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    lines.append(
        f"  zone-b's router -> zone-a's control plane 198.18.1.1:{CP_PORT}: "
        + ("CONNECTED" if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1])
    )
    assert probe.returncode != 0, lines[-1]
    print("\nTCP from zone to zone:\n" + "\n".join(lines))
    # What node1's proxy knows of zone-b: a remote entry naming its ingress, never
    # the address or name of one of its nodes.
    snap = lab["lab"].node_dir("node1") / "state" / "ztunnel-snapshot.json"
    doc = json.loads(snap.read_text())
    found: list[tuple[str, str]] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and (value.startswith("198.18.2.") or value in ZONE_B_NODES):
            found.append((key, value))

    walk(doc)
    api = next(s for s in doc["services"] if s["name"] == "api")
    print(
        f"node1's ztunnel config: api {api['vip']}, endpoints {api['endpoints']}, remote "
        f"{api['remote']}; zone-b values anywhere in it: {sorted(set(found))}"
    )
    assert api["endpoints"] == [] and api["remote"][0]["zone"] == "zone-b"
    assert set(found) == {("ingress_ip", ZONE_B_INGRESS)}, found


# -- 3. failover to the other zone, and back ----------------------------------------------


def _workload_pid(name: str) -> int:
    return int(next(w["pid"] for w in LABCLI.status()["workloads"] if w["name"] == name))


def test_failover_to_zone_b_and_back_under_load(lab: dict[str, Any]) -> None:
    from meshnode.lab import host

    _server("node2", "fo-a", "fo", 7001)  # zone-a's endpoint: node1 prefers its zone
    _server("node3", "fo-b", "fo", 7001)  # zone-b's, reached through node4's ingress
    vip = LABCLI.vip("fo", "zone-a")
    st = lab["lab"].load()
    load = LABCLI.spawn(
        ["lab", "exec", "node1", "--workload", "client", "--", PY, str(TOOLS / "loadclient.py"),
         vip, "7001", "--count", "100000", "--interval", "0.01", "--max-seconds", "16",
         "--timeout", "3"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    lines: list[tuple[float, dict[str, Any]]] = []  # (arrival, line)

    def read() -> None:
        assert load.stdout is not None
        for raw in load.stdout:
            if raw.startswith("{"):
                lines.append((time.monotonic(), json.loads(raw)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    while not lines and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lines, "the load client printed nothing"
    origin = min(at - line["t"] for at, line in lines)  # the load client's clock, here
    time.sleep(max(3.0 - (time.monotonic() - origin), 0))
    os.kill(_workload_pid("fo-a"), signal.SIGKILL)  # zone-a's only endpoint dies
    killed = time.monotonic() - origin
    time.sleep(2.5)  # back before its ejection (5 s) ends
    wl = st.workloads["fo-a"]
    host.spawn(
        st.nodes["node2"].netns,
        Path(wl.cgroup),
        [*DEMO, "server", "--port", "7001", "--name", "fo-a", "--peer-socket", _peer_sock("node2")],
    )  # it stays, as the lab had it; `lab down` ends it with its cgroup
    revived = time.monotonic() - origin
    load.wait(60)
    reader.join(10)
    conns = [line for _, line in lines if "summary" not in line]
    failed = [c for c in conns if not c["ok"]]
    before = [c for c in conns if c["t"] < killed]
    during = [c for c in conns if killed + 0.5 < c["t"] < revived]
    late = [c for c in conns if c["t"] > revived + 6]
    first_b = min((c["t"] for c in conns if c["server"] == "fo-b"), default=None)
    back = min((c["t"] for c in conns if c["server"] == "fo-a" and c["t"] > revived), default=None)

    def shares(cs: list[dict[str, Any]]) -> dict[str, int]:
        return {n: sum(1 for c in cs if c["server"] == n) for n in ("fo-a", "fo-b")}

    print(
        f"\nfailover: {len(conns)} connections in 16 s, {len(failed)} failed "
        f"(at t={[c['t'] for c in failed]}: {sorted({c['error'] for c in failed})}); fo-a killed "
        f"at t={killed:.2f}s, first served by fo-b at t={first_b}, fo-a back at "
        f"t={revived:.2f}s and serving again from t={back}; shares before {shares(before)}, "
        f"while down {shares(during)}, at the end {shares(late)}"
    )
    assert len(conns) > 200
    assert before and all(c["server"] == "fo-a" for c in before if c["ok"])  # locality
    assert len(failed) <= 5, failed
    assert not [c for c in failed if c["t"] > killed + 2], "failures went on after the kill"
    assert during and all(c["server"] == "fo-b" for c in during if c["ok"])
    assert late and shares(late)["fo-a"] > len(late) * 0.9, shares(late)


# -- 4. the global control plane down ------------------------------------------------------


DENY = """
kind: AuthorizationPolicy
metadata: {name: mz-deny-default, namespace: default}
spec:
  action: DENY
  selector: {services: [api, client]}
  rules: [{from: {namespaces: [default]}}]
"""


def _both_ways(status: dict[str, Any]) -> tuple[str, str]:
    """node1 (zone-a) -> api (zone-b), and node3's api workload -> client (zone-a)."""
    a_to_b = curl("node1", "client", f"http://{LABCLI.vip('api', 'zone-a', status)}:8080/")
    b_to_a = curl("node3", "api", f"http://{LABCLI.vip('client', 'zone-b', status)}:9090/")
    return a_to_b, b_to_a


def _calls_while_down(status: dict[str, Any], seconds: float) -> list[tuple[str, str]]:
    """Calls both ways, again and again for `seconds` (an outage that long)."""
    calls: list[tuple[str, str]] = []
    until = time.monotonic() + seconds
    while not calls or time.monotonic() < until:
        calls.append(_both_ways(status))
    return calls


def _ok(calls: list[tuple[str, str]]) -> int:
    return sum(
        f"hello {CLIENT_ID}, this is api" in a and f"hello {API_ID}, this is client" in b
        for a, b in calls
    )


def _denied(lab: dict[str, Any], node: str, policy: str) -> list[dict[str, Any]]:
    """The access log records of `node`'s ztunnel that `policy` denied (the log is
    written in batches: waited for, 3 s at most)."""
    logf = lab["lab"].node_dir(node) / "state" / "ztunnel.log"
    deadline = time.monotonic() + 3
    while True:
        records = [json.loads(x) for x in logf.read_text().splitlines() if x.startswith("{")]
        found = [
            r for r in records if r.get("result") == "denied" and policy in r.get("reason", "")
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_global_outage_then_a_policy_reaches_both_zones(lab: dict[str, Any]) -> None:
    status = lab["status"]
    meshnode("lab", "controlplane", "stop", "--global", "--kill")  # a crash
    stopped = time.monotonic()
    try:
        down = LABCLI.status()
        calls = _calls_while_down(status, 5.0)
        outage = time.monotonic() - stopped
    finally:
        meshnode("lab", "controlplane", "start", "--global")
    started = time.monotonic()
    print(
        f"\nglobal control plane killed, down for {outage:.1f}s: zones' sync connected "
        f"{[(z['name'], z.get('connected')) for z in down['zones']]}; calls across zones "
        f"meanwhile (node1 -> api in zone-b and node3 -> client in zone-a): {_ok(calls)} of "
        f"{len(calls)} both ok"
    )
    assert not down["controlplane"]["alive"] and "error" in down["controlplane"]
    assert _ok(calls) == len(calls), calls
    # Applied at the global once it is back: `lab apply` returns when both zones took
    # it and every node of both has it.
    meshnode("lab", "apply", "-f", "-", input=DENY)
    applied = time.monotonic() - started
    try:
        a_to_b, b_to_a = _both_ways(status)
        slices = {
            n: [r["metadata"]["name"] for r in json.loads(
                (lab["lab"].node_dir(n) / "state" / "cp-slice.json").read_text())["resources"]]
            for n in ("node1", "node2", "node3", "node4")
        }  # fmt: skip
        print(
            f"DENY from namespace default applied at the global as soon as it answered again: "
            f"on every node of both zones {applied:.2f}s later (the zones' sync reconnecting, "
            f"then the policy down to their nodes): {slices}; "
            f"node1 -> api: {a_to_b}, node3 -> client: {b_to_a}"
        )
        assert all("mz-deny-default" in names for names in slices.values()), slices
        assert "this is api" not in a_to_b and "this is client" not in b_to_a
        # Denied by the destinations' node proxies, one in each zone, by that policy.
        by_node3, by_node1 = (_denied(lab, n, "mz-deny-default") for n in ("node3", "node1"))
        print(f"denied by node3 (zone-b): {len(by_node3)}, by node1 (zone-a): {len(by_node1)}")
        assert by_node3 and by_node3[-1]["src_identity"] == CLIENT_ID, by_node3
        assert by_node1 and by_node1[-1]["src_identity"] == API_ID, by_node1
    finally:
        t0 = time.monotonic()
        meshnode("lab", "delete", "AuthorizationPolicy", "mz-deny-default")
        deleted = time.monotonic() - t0
    a_to_b, b_to_a = _both_ways(status)
    print(f"deleted at the global: gone from every node in {deleted:.2f}s; calls work again")
    assert "this is api" in a_to_b and "this is client" in b_to_a, (a_to_b, b_to_a)


# -- 5. a zone control plane down ----------------------------------------------------------


def test_zone_a_control_plane_outage(lab: dict[str, Any]) -> None:
    status = lab["status"]
    web = LABCLI.vip("web", "zone-a", status)
    meshnode("lab", "controlplane", "stop", "--zone", "zone-a", "--kill")  # a crash
    stopped = time.monotonic()
    try:
        down = {z["name"]: z for z in LABCLI.status()["zones"]}
        calls = _calls_while_down(status, 5.0)
        local = curl("node1", "client", f"http://{web}:8081/")
        outage = time.monotonic() - stopped
    finally:
        meshnode("lab", "controlplane", "start", "--zone", "zone-a")
    started, started_wall = time.monotonic(), time.time()
    print(
        f"\nzone-a's control plane killed, down for {outage:.1f}s (alive: "
        f"{down['zone-a']['alive']}); calls node1 -> api (zone-b) and node3 -> client (zone-a, "
        f"through zone-a's ingress) meanwhile: {_ok(calls)} of {len(calls)} both ok; "
        f"node1 -> web (zone-a's own, on node2): {local.strip()}"
    )
    assert not down["zone-a"]["alive"] and down["zone-b"]["alive"]
    assert _ok(calls) == len(calls), calls
    assert f"hello {CLIENT_ID}, this is web" in local  # zone-a's own, on node2
    # Back: its sync with the global, and its nodes' watches, connect again.
    from meshnode.lab.lab import Lab

    lab_obj: Lab = lab["lab"]
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        zone = next(z for z in LABCLI.status()["zones"] if z["name"] == "zone-a")
        agents = [lab_obj.agent_status(n) or {} for n in ("node1", "node2")]
        if zone.get("connected") and all(
            a.get("cp_reachable") and a.get("cp_last_contact", 0) > started_wall for a in agents
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"zone-a did not come back: {zone}, agents {agents}")
    print(f"zone-a's control plane back: synced with the global, both its nodes watching "
          f"again {time.monotonic() - started:.1f}s after its start")  # fmt: skip
    a_to_b, b_to_a = _both_ways(status)
    assert "this is api" in a_to_b and "this is client" in b_to_a


def test_lab_down_leaves_nothing(lab: dict[str, Any]) -> None:
    """Last: take the lab down and look for anything it left (namespaces with the
    routers' filters, cgroups, pinned maps, processes)."""
    lab_obj = lab["lab"]
    cgroup_root = lab_obj.cgroup_root()
    meshnode("lab", "down")
    left = [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{LAB}-")]
    assert left == []
    assert not cgroup_root.exists() and not lab_obj.pin_root().exists()
    assert not lab_obj.dir.exists()
    ps = subprocess.run(["pgrep", "-f", f"lab-{LAB}/"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
