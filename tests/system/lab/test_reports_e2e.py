"""Node health reports, end to end in a real lab: each node's agent gathers its
state and its ztunnel's view (endpoint health, traffic edges) and posts it to the
control plane, whose admin node list then shows a fresh report per node, the
edge between the two talking identities, and an endpoint the caller's balancer
ejected after its process was killed.

One lab for the module (`mnrep` unless $MESHNODE_TEST_LAB_REPORTS says otherwise);
the lab's agents report every 2 s (lab.LAB_REPORT_INTERVAL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import TOOLS
from tests.support.labcli import LabCli
from tests.support.skips import requires_lab

pytestmark = [pytest.mark.root, requires_lab]

LAB = os.environ.get("MESHNODE_TEST_LAB_REPORTS", "mnrep")
PY = sys.executable
DEMO = [PY, "-m", "meshnode.lab.demo"]
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
API = "spiffe://cluster.local/ns/default/sa/api"


LABCLI = LabCli(LAB)
meshnode, add, status = LABCLI.out, LABCLI.add, LABCLI.status


def nodes() -> dict[str, dict[str, Any]]:
    """The control plane's admin node list, with each node's whole last report."""
    from meshnode.lab.lab import Lab

    items = Lab(LAB).admin().call("GET", "/v1/admin/nodes?report=1")["items"]
    return {n["name"]: n for n in items}


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    """Poll `check()` until it returns something true; fail saying `what` and the
    last node list."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = nodes()
        got = check(last)
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f}s; the node list:\n{json.dumps(last)}")


def load(
    vip: str, port: int, count: int, seconds: float, quiet: bool = False
) -> subprocess.Popen[str]:
    """node1's client opening `count` connections to `vip`:`port` (its output
    dropped when `quiet`: nobody reads a pipe while it runs)."""
    return LABCLI.spawn(
        [
            "lab",
            "exec",
            "node1",
            "--workload",
            "client",
            "--",
            PY,
            str(TOOLS / "loadclient.py"),
            vip,
            str(port),
            "--count",
            str(count),
            "--interval",
            "0.02",
            "--max-seconds",
            str(seconds),
            "--timeout",
            "3",
        ],
        stdout=subprocess.DEVNULL if quiet else subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    meshnode("lab", "down", check=False)
    try:
        meshnode("lab", "up", "--nodes", "2")
        add("node1", "client", "client", 9090, *DEMO, "idle")
        add("node2", "api-a", "api", 7201)
        add("node2", "api-b", "api", 7202, service_port=7201)
        yield
    finally:
        meshnode("lab", "down", check=False)


def _edge(node: dict[str, Any]) -> dict[str, Any] | None:
    report = node.get("report") or {}
    return next(
        (e for e in report.get("edges", []) if e["source"] == CLIENT and e["destination"] == API),
        None,
    )


def test_reports_show_fresh_nodes_and_the_edge_then_an_ejection(lab: None) -> None:
    st = status()
    vip = next(s["vip"] for s in st["services"] if s["name"] == "api")

    # Both nodes report, with what they are.
    listed = wait_for(
        "a fresh report from both nodes",
        lambda ns: ns if all(n["last_report"] and not n["stale"] for n in ns.values()) else None,
    )
    for name, node in listed.items():
        report = node["report"]
        assert report["node"] == name and report["agent_ready"] and report["ztunnel_ready"]
        assert node["cert_not_after"] > time.time() + 60, node
        assert node["config_revision"] >= 1 and node["agent_version"], node
        assert any(p.startswith("mn_") for p in report["bpf_programs"]), report
        assert time.time() - node["last_report"] < 15, node

    # Traffic from node1's client to the api service: node1 reports the edge.
    out, err = load(vip, 7201, 40, 20).communicate(timeout=120)
    summary = json.loads(out.strip().splitlines()[-1])
    assert sum(summary["servers"].values()) >= 35, (summary, err)
    edge = wait_for(
        "node1 reporting the client -> api edge",
        lambda ns: (lambda e: e if e and e["connections"] >= 35 else None)(_edge(ns["node1"])),
    )
    assert edge["mtls"] is True and edge["bytes_received"] > 0, edge
    assert _edge(nodes()["node2"]) is None  # counted once, where the caller is
    print(f"node1 reported {edge}")

    # The endpoint node1's balancer prefers (the lowest EWMA: P2C between two never
    # picks the other) dies; the balancer ejects it after a few failed connects,
    # and node1's report says so.
    api = [e for e in nodes()["node1"]["report"]["endpoints"] if e["service"] == "default/api"]
    assert len(api) == 2 and all(e["ewma_ms"] > 0 for e in api), api
    victim = min(api, key=lambda e: e["ewma_ms"])
    port = victim["address"].rpartition(":")[2]
    name = {"7201": "api-a", "7202": "api-b"}[port]
    pid = next(w["pid"] for w in status()["workloads"] if w["name"] == name)
    os.kill(pid, signal.SIGKILL)
    client = load(vip, 7201, 2000, 30, quiet=True)
    try:
        ejected = wait_for(
            "node1 reporting api-b ejected",
            lambda ns: next(
                (
                    e
                    for e in (ns["node1"]["report"] or {}).get("endpoints", [])
                    if e["service"] == "default/api"
                    and e["address"] == victim["address"]
                    and e["ejected"]
                ),
                None,
            ),
            timeout=40,
        )
    finally:
        client.send_signal(signal.SIGTERM)
        client.communicate(timeout=60)
    assert ejected["node"] == "node2", ejected
    healthy = [
        e
        for e in nodes()["node1"]["report"]["endpoints"]
        if e["service"] == "default/api" and e["address"] != victim["address"]
    ]
    assert healthy and not healthy[0]["ejected"] and healthy[0]["ewma_ms"] > 0, healthy
    print(f"node1 reported {ejected}")

    # The CLI shows the reports in its node table.
    from meshnode.lab.lab import Lab

    table = meshnode("get", "nodes", "--data-dir", str(Lab(LAB).cp_dir))
    assert "LAST REPORT" in table and "STALE" in table, table
    assert "no report yet" not in table, table
