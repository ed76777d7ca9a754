"""ZeroLB in a real lab: endpoint failure and readmission, latency-aware
balancing, traffic splits, L4 authorization, STRICT mode in the kernel, and
Prometheus metrics that match the traffic. Each test prints what it measured.

One lab for the module (`mnlb` unless $MESHNODE_TEST_LAB_LB says otherwise);
services are added per test so that each one's shares are its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TOOLS
from tests.support.labcli import LabCli
from tests.support.skips import requires_lab

pytestmark = [pytest.mark.root, requires_lab]

LAB = os.environ.get("MESHNODE_TEST_LAB_LB", "mnlb")
PY = sys.executable
DEMO = [PY, "-m", "meshnode.lab.demo"]


LABCLI = LabCli(LAB)
meshnode, add = LABCLI.run, LABCLI.add


def vip(service: str) -> str:
    st = json.loads(meshnode("lab", "status", "-o", "json").stdout)
    return next(s["vip"] for s in st["services"] if s["name"] == service)


def load(node: str, workload: str, host: str, port: int, *args: str) -> tuple[list[dict], dict]:
    out = meshnode(
        "lab",
        "exec",
        node,
        "--workload",
        workload,
        "--",
        PY,
        str(TOOLS / "loadclient.py"),
        host,
        str(port),
        *args,
        timeout=240,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [x for x in lines if "summary" not in x], next(x for x in lines if "summary" in x)


def scrape(node: str) -> list:
    from meshnode.ztunnel.metrics import parse_exposition

    text = meshnode(
        "lab",
        "exec",
        node,
        "--",
        "curl",
        "-sf",
        "--max-time",
        "5",
        "http://127.0.0.1:15020/metrics",
    ).stdout
    return parse_exposition(text)  # raises on anything that is not valid exposition format


def metric(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    meshnode("lab", "down", check=False)
    try:
        meshnode("lab", "up", "--nodes", "2")
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
            *DEMO,
            "idle",
        )
        yield
    finally:
        meshnode("lab", "down", check=False)


def _workload_pid(name: str) -> int:
    st = json.loads(meshnode("lab", "status", "-o", "json").stdout)
    return next(w["pid"] for w in st["workloads"] if w["name"] == name)


def test_endpoint_failure_costs_at_most_a_handful_then_readmits(lab: None) -> None:
    from meshnode.lab import host
    from meshnode.lab.lab import Lab

    # Three endpoints on two nodes; the client's node has one, which locality prefers.
    add("node1", "echo-a", "echo", 7001)
    add("node2", "echo-b", "echo", 7002, service_port=7001)
    add("node2", "echo-c", "echo", 7003, service_port=7001)
    ip = vip("echo")
    lab_obj = Lab(LAB)
    st = lab_obj.load()
    client = LABCLI.spawn(
        [
            "lab",
            "exec",
            "node1",
            "--workload",
            "client",
            "--",
            PY,
            str(TOOLS / "loadclient.py"),
            ip,
            "7001",
            "--count",
            "100000",
            "--interval",
            "0.01",
            "--max-seconds",
            "16",
            "--timeout",
            "3",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(3)
    os.kill(_workload_pid("echo-a"), signal.SIGKILL)  # the local endpoint dies
    killed_at = time.monotonic()
    time.sleep(3)
    wl = st.workloads["echo-a"]
    revived = host.spawn(
        st.nodes["node1"].netns,
        Path(wl.cgroup),
        [*DEMO, "server", "--port", "7001", "--name", "echo-a"],
    )
    revived_after = time.monotonic() - killed_at
    out, _ = client.communicate(timeout=60)
    try:
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        conns = [x for x in lines if "summary" not in x]
        failed = [c for c in conns if not c["ok"]]
        t_kill = 3.0
        late = [c for c in conns if c["t"] > t_kill + revived_after + 8]
        late_shares = {
            n: sum(1 for c in late if c["server"] == n) for n in ("echo-a", "echo-b", "echo-c")
        }
        print(
            f"\nendpoint failure: {len(conns)} connections, {len(failed)} failed "
            f"(at t={[c['t'] for c in failed]}); killed at ~{t_kill}s, back after "
            f"{revived_after:.1f}s; shares at the end: {late_shares}"
        )
        assert len(conns) > 300
        assert len(failed) <= 5, failed
        assert not [c for c in failed if c["t"] > t_kill + 2], "failures went on after the first"
        # While echo-a was gone, the others served; after it came back and its
        # ejection ran out, locality sent traffic to it again.
        during = [c for c in conns if t_kill + 0.5 < c["t"] < t_kill + revived_after]
        assert during and all(c["server"] in ("echo-b", "echo-c") for c in during if c["ok"])
        assert late and sum(1 for c in late if c["server"] == "echo-a") > len(late) / 2
        ejections = metric(scrape("node1"), "meshnode_endpoint_ejections_total")
        assert ejections >= 1
    finally:
        revived.terminate()
        revived.wait(5)


def test_slow_endpoint_gets_a_smaller_share(lab: None) -> None:
    # All three on node2 (same locality for the client on node1); one is slow to accept.
    add("node2", "lat-fast1", "lat", 7101)
    add("node2", "lat-fast2", "lat", 7102, service_port=7101)
    add(
        "node2",
        "lat-slow",
        "lat",
        7103,
        *DEMO,
        "slow-server",
        "--port",
        "7103",
        "--name",
        "lat-slow",
        "--accept-delay",
        "0.15",
        "--backlog",
        "1",
        service_port=7101,
    )
    conns, summary = load(
        "node1",
        "client",
        vip("lat"),
        7101,
        "--count",
        "600",
        "--concurrency",
        "8",
        "--max-seconds",
        "60",
        "--timeout",
        "10",
    )
    shares = summary["servers"]
    total = sum(shares.values())
    print(f"\nlatency-aware balancing over {total} connections: {shares}")
    assert summary["failures"] == 0
    slow = shares.get("lat-slow", 0) / total
    fast = min(shares.get("lat-fast1", 0), shares.get("lat-fast2", 0)) / total
    assert slow < 0.15 and fast > 0.3, shares


def test_traffic_split_90_10(lab: None) -> None:
    add("node2", "split-v1", "split", 7201, version="v1")
    add("node2", "split-v2", "split", 7202, version="v2", service_port=7201)
    meshnode(
        "lab",
        "apply",
        "-f",
        "-",
        input="""
kind: TrafficSplit
metadata: {name: split-canary}
spec: {service: split, weights: {v1: 90, v2: 10}}
""",
    )
    conns, summary = load(
        "node1",
        "client",
        vip("split"),
        7201,
        "--count",
        "1000",
        "--concurrency",
        "4",
        "--max-seconds",
        "120",
    )
    shares = summary["servers"]
    v2 = shares.get("split-v2", 0) / 1000
    print(f"\ntraffic split 90/10 over 1000 connections: {shares} -> v2 {v2:.1%}")
    assert summary["failures"] == 0 and sum(shares.values()) == 1000
    assert abs(v2 - 0.10) <= 0.03


def test_authorization_allows_and_denies_with_reasons(lab: None) -> None:
    add("node2", "vault", "vault", 7301)
    meshnode(
        "lab",
        "workload",
        "add",
        "node1",
        "intruder",
        "--service",
        "intruder",
        "--port",
        "9091",
        "--",
        *DEMO,
        "idle",
    )
    ip = vip("vault")
    before = scrape("node2")
    meshnode(
        "lab",
        "apply",
        "-f",
        "-",
        input="""
kind: AuthorizationPolicy
metadata: {name: vault-clients-only}
spec:
  action: ALLOW
  selector: {services: [vault]}
  rules:
    - from: {principals: ["spiffe://cluster.local/ns/default/sa/client"]}
""",
    )
    ok = meshnode(
        "lab",
        "exec",
        "node1",
        "--workload",
        "client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "5",
        f"http://{ip}:7301/",
    ).stdout
    assert "this is vault" in ok
    denied = meshnode(
        "lab",
        "exec",
        "node1",
        "--workload",
        "intruder",
        "--",
        "curl",
        "-s",
        "--max-time",
        "5",
        f"http://{ip}:7301/",
        check=False,
    )
    assert denied.returncode != 0 and "this is vault" not in denied.stdout
    after = scrape("node2")
    label = {"policy": "default", "destination_service": "vault"}
    delta = metric(after, "meshnode_authz_denied_total", **label) - metric(
        before, "meshnode_authz_denied_total", **label
    )
    print(
        f"\nauthorization: client allowed, intruder denied (curl exit {denied.returncode}); "
        f"denied counter +{delta:.0f}"
    )
    assert delta == 1
    from meshnode.lab.lab import Lab

    def denials() -> list[dict]:  # type: ignore[type-arg]
        log = (Lab(LAB).node_dir("node2") / "state" / "ztunnel.log").read_text().splitlines()
        records = [json.loads(x) for x in log if x.startswith("{")]
        return [
            r
            for r in records
            if r.get("result") == "denied" and r.get("src_identity", "").endswith("/sa/intruder")
        ]

    deadline = time.monotonic() + 3  # the access log is written in batches
    while not (deny := denials()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert deny and "vault-clients-only" in deny[-1]["reason"], deny
    print(f"access log: {deny[-1]['reason']}")


def test_strict_mode_refuses_plaintext_but_not_the_mesh(lab: None) -> None:
    add("node2", "ledger", "ledger", 7401)
    url = "http://198.18.0.12:7401/"

    def plaintext() -> subprocess.CompletedProcess[str]:
        return meshnode(
            "lab", "exec", "node1", "--", "curl", "-s", "--max-time", "3", url, check=False
        )

    assert "this is ledger" in plaintext().stdout  # PERMISSIVE: plaintext still reaches it
    meshnode(
        "lab",
        "apply",
        "-f",
        "-",
        input="""
kind: PeerAuthentication
metadata: {name: ledger-strict}
spec: {mode: STRICT, selector: {services: [ledger]}}
""",
    )
    refused = plaintext()
    meshed = meshnode(
        "lab",
        "exec",
        "node1",
        "--workload",
        "client",
        "--",
        "curl",
        "-s",
        "--max-time",
        "5",
        f"http://{vip('ledger')}:7401/",
    ).stdout
    print(f"\nSTRICT: plaintext curl exit {refused.returncode}; through the mesh: {meshed.strip()}")
    assert refused.returncode != 0 and "this is ledger" not in refused.stdout
    assert "this is ledger" in meshed
    meshnode("lab", "delete", "PeerAuthentication", "ledger-strict")
    assert "this is ledger" in plaintext().stdout


def test_metrics_parse_and_match_the_traffic(lab: None) -> None:
    add("node2", "count", "count", 7501)
    before1, before2 = scrape("node1"), scrape("node2")
    n = 25
    conns, summary = load("node1", "client", vip("count"), 7501, "--count", str(n))
    assert summary["failures"] == 0
    after1, after2 = scrape("node1"), scrape("node2")
    src = {
        "reporter": "source",
        "source_workload": "client",
        "destination_workload": "count",
        "source_principal": "spiffe://cluster.local/ns/default/sa/client",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/count",
        "destination_service": "count.default.mesh",
        "connection_security_policy": "mutual_tls",
    }
    dst = {
        "reporter": "destination",
        "destination_workload": "count",
        "source_principal": "spiffe://cluster.local/ns/default/sa/client",
    }

    def delta(name: str, before: list, after: list, labels: dict) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    request = len(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    for before, after, labels in ((before1, after1, src), (before2, after2, dst)):
        opened = delta("istio_tcp_connections_opened_total", before, after, labels)
        closed = delta("istio_tcp_connections_closed_total", before, after, labels)
        sent = delta("istio_tcp_sent_bytes_total", before, after, labels)
        received = delta("istio_tcp_received_bytes_total", before, after, labels)
        print(
            f"\n{labels['reporter']}: opened +{opened:.0f} closed +{closed:.0f} "
            f"sent +{sent:.0f}B received +{received:.0f}B"
        )
        assert opened == n and closed == n
        assert sent == n * request
        assert received > n * 100  # each answer is an HTTP response with a body
    assert metric(after1, "meshnode_hbone_pool_connections") >= 1
    assert any(s.name == "meshnode_hbone_handshake_seconds_count" for s in after1)
    dump = json.loads(
        meshnode(
            "lab", "exec", "node1", "--", PY, "-m", "meshnode.cli.main", "config", "dump"
        ).stdout
    )
    eps = {f"{e['address']}:{e['port']}": e for e in dump["endpoints"]}
    assert eps["198.18.0.12:7501"]["state"] == "healthy"
    assert eps["198.18.0.12:7501"]["ewma_ms"] > 0
