"""A real Prometheus (Debian's `prometheus`) scrapes a lab: every node's ztunnel
and the control plane's metrics listener. The test sends traffic between two
services, then asks Prometheus over its HTTP API for the Istio-compatible
`istio_tcp_connections_opened_total` with the two workloads' SPIFFE ids, and for
the control plane's request-duration histogram (docs/observability.md).

The lab's network is a bridge in a namespace of its own (lab/host.py): the host
has no route to it. So Prometheus runs in that namespace, the fabric's, beside
the control plane, where a monitoring host on the nodes' network would be; the
nodes' ztunnels serve /metrics on their lab addresses (lab.py starts them with
`--metrics 0.0.0.0:15020`) and the control plane on 198.18.0.1:15091. The test
talks to Prometheus's API from a thread inside that namespace.

One lab for the module (`mnprom` unless $MESHNODE_TEST_LAB_PROM says otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.labcli import LabCli
from tests.support.skips import requires_lab

PROMETHEUS = Path("/usr/bin/prometheus")

pytestmark = [
    pytest.mark.root,
    requires_lab,
    pytest.mark.skipif(
        not PROMETHEUS.exists(),
        reason="/usr/bin/prometheus is missing: install Debian's `prometheus` package "
        "(apt-get install --no-install-recommends prometheus)",
    ),
]

LAB = os.environ.get("MESHNODE_TEST_LAB_PROM", "mnprom")
PY = sys.executable
DEMO = [PY, "-m", "meshnode.lab.demo"]
WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/default/sa/api"
CALLS = 5


meshnode = LabCli(LAB).out


class Prometheus:
    """/usr/bin/prometheus as a process of its own in the fabric's namespace (never
    the packaged service), its data and config in a temporary directory."""

    def __init__(self, fabric: str, workdir: Path, targets: dict[str, list[str]]) -> None:
        from tests.support.bpf import in_netns

        self.fabric = fabric
        self._in_netns = in_netns
        with in_netns(fabric), socket.socket() as s:  # a port free in that namespace
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = workdir / "prometheus.yml"
        jobs = [
            {
                "job_name": job,
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": addrs}],
            }
            for job, addrs in targets.items()
        ]
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
        self.log = workdir / "prometheus.log"
        from meshnode.lab import host

        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *host.nsenter_prefix(fabric),
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def api(self, path: str, **query: str) -> Any:
        """GET /api/v1/<path>: its `data`, or None while Prometheus does not answer."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with self._in_netns(self.fabric):
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    doc = json.loads(resp.read())
            except (OSError, urllib.error.URLError, ValueError):
                return None
        assert doc.get("status") == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"]) if data else []

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}):\n{self.tail()}")
            got = check()
            if got:
                return got
            if time.monotonic() > deadline:
                pytest.fail(f"{what} within {timeout:.0f} s; prometheus log:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    from meshnode.lab.lab import Lab

    meshnode("lab", "down", check=False)  # a leftover from an aborted run
    try:
        meshnode("lab", "up", "--nodes", "2")
        meshnode(
            "lab", "workload", "add", "node2", "api", "--service", "api", "--port", "8080",
            "--", *DEMO, "server", "--port", "8080", "--name", "api",
        )  # fmt: skip
        meshnode(
            "lab", "workload", "add", "node1", "web", "--service", "web", "--port", "9090",
            "--", *DEMO, "idle",
        )  # fmt: skip
        yield Lab(LAB)
    finally:
        meshnode("lab", "down", check=False)


def test_prometheus_scrapes_the_lab_and_sees_its_traffic_by_principal(
    lab: Any, tmp_path: Path
) -> None:
    from meshnode.core.constants import CONTROLPLANE_METRICS_PORT, METRICS_PORT
    from meshnode.lab.lab import CP_IP

    state = lab.load()
    vip = state.services["api"].vip
    for _ in range(CALLS):
        out = meshnode(
            "lab", "exec", "node1", "--workload", "web", "--",
            "curl", "-sS", "--max-time", "10", f"http://{vip}:8080/",
        )  # fmt: skip
        assert "this is api" in out, out
    targets = {
        "meshnode-ztunnel": [f"{n.ip}:{METRICS_PORT}" for n in state.nodes.values()],
        "meshnode-controlplane": [f"{CP_IP}:{CONTROLPLANE_METRICS_PORT}"],
    }
    prom = Prometheus(lab.fabric, tmp_path, targets)
    try:

        def all_up() -> list[dict[str, Any]] | None:
            data = prom.api("targets")
            active = data["activeTargets"] if data else []
            if len(active) == 3 and all(t["health"] == "up" for t in active):
                return list(active)
            return None

        up = prom.wait("every target up", all_up, timeout=60)
        print(f"\nprometheus on the lab's network scrapes {[t['scrapeUrl'] for t in up]}")

        def edge() -> list[dict[str, Any]]:
            return [
                s
                for s in prom.query("istio_tcp_connections_opened_total")
                if s["metric"].get("source_principal") == WEB
                and s["metric"].get("destination_principal") == API
                and float(s["value"][1]) > 0
            ]

        series = prom.wait(f"a series {WEB} -> {API}", edge, timeout=30)
        reporters = {s["metric"]["reporter"]: float(s["value"][1]) for s in series}
        print(f"istio_tcp_connections_opened_total web -> api: {reporters}")
        assert reporters.get("source", 0) >= CALLS  # counted by node1's ztunnel
        assert reporters.get("destination", 0) >= CALLS  # and by node2's
        assert {s["metric"]["instance"] for s in series} <= set(targets["meshnode-ztunnel"])

        cp = prom.wait(
            "the control plane's request-duration metric",
            lambda: prom.query(
                'meshnode_controlplane_request_duration_seconds_count{job="meshnode-controlplane"}'
            ),
            timeout=30,
        )
        routes = sorted({s["metric"]["route"] for s in cp})
        print(f"control plane routes timed: {routes}")
        assert "/v1/node/config" in routes  # the nodes' watches
        rss = prom.query('process_resident_memory_bytes{job="meshnode-ztunnel"}')
        assert len(rss) == 2 and all(float(s["value"][1]) > 1 << 20 for s in rss), rss
    finally:
        prom.stop()
    assert prom.proc.returncode is not None
