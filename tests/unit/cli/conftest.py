"""Fixtures for the command-line tests: an enrolled node's files (no agent, no
kernel), a control plane in a thread with a node, a workload and policies, and a
stand-in for ztunnel's admin endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from meshnode.cli.main import cli
from meshnode.controlplane.store import open_store
from tests.support.controlplane import ThreadedControlPlane, enroll

POLICIES = """\
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: default}
spec: {action: ALLOW, rules: [{from: {namespaces: [default]}}]}
---
kind: TrafficSplit
metadata: {name: web-split}
spec: {service: web, weights: {v1: 90, v2: 10}}
"""

# What ztunnel's /config_dump answers (ztunnel/proxy.py; the supervisor adds
# `workers`), trimmed to one of each.
CONFIG_DUMP: dict[str, Any] = {
    "config": {"workers": 2, "listen": "127.0.0.1:15008"},
    "state": {
        "version": 7,
        "node": {"name": "node1", "ip": "198.18.0.11", "zone": "zone-a"},
        "trust_domain": "cluster.local",
        "authorization_default": "allow",
        "policies": [
            {
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "allow-web", "namespace": "default"},
                "spec": {"action": "ALLOW", "rules": []},
            }
        ],
        "workloads": [],
        "services": [],
    },
    "endpoints": [
        {
            "address": "198.18.0.12",
            "port": 8080,
            "ewma_ms": 0.42,
            "inflight": 0,
            "consecutive_failures": 0,
            "state": "healthy",
            "ejected_for_s": 0.0,
            "times_ejected": 0,
            "total_ejections": 0,
            "worker": 0,
        }
    ],
    "pool": {"connections": 1, "handshakes": 3},
    "active_connections": 0,
    "workers": 2,
}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@dataclass
class Node:
    """An enrolled node's config dir, with what its agent and ztunnel last wrote."""

    config_dir: Path
    state_dir: Path

    def args(self) -> list[str]:
        return ["--config-dir", str(self.config_dir)]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    state.mkdir()
    (etc / "node.json").write_text(
        json.dumps(
            {
                "name": "node1",
                "zone": "zone-a",
                "ip": "198.18.0.11",
                "trust_domain": "cluster.local",
                "control_planes": ["https://198.18.0.1:15012"],
                "cgroup_parent": "/sys/fs/cgroup/mesh",
                "state_dir": str(state),
            }
        )
    )
    (etc / "workloads.json").write_text(
        json.dumps(
            [
                {"name": "web", "service": "web", "port": 8080, "systemd_unit": "web.service"},
                {"name": "api", "service": "api", "port": 9090, "namespace": "prod", "pid": 42},
            ]
        )
    )
    (state / "agent-status.json").write_text(
        json.dumps(
            {
                "ready": True,
                "version": 5,
                "pushed_version": 5,
                "pid": 4242,
                "workloads": ["web"],
                "bind_guard": {"on": True, "cgroup_id": 99, "problem": None},
                "updated": 0,
                "cp_reachable": True,
                "cp_error": "",
                "cp_revision": 12,
                "problems": ["a problem"],
            }
        )
    )
    (state / "ztunnel-snapshot.json").write_text(
        json.dumps(
            {
                "dns_domain": "mesh",
                "workloads": [
                    {
                        "name": "web",
                        "service": "web",
                        "port": 8080,
                        "namespace": "default",
                        "service_account": "web",
                        "cert": str(state / "certs" / "web.pem"),
                    }
                ],
                "services": [
                    {
                        "name": "web",
                        "namespace": "default",
                        "vip": "240.0.0.1",
                        "endpoints": [{"node": "node1"}],
                    }
                ],
            }
        )
    )
    from meshnode.bpf.loader import MeshBpf
    from meshnode.cli import status

    monkeypatch.setattr(
        MeshBpf,
        "attached_programs",
        staticmethod(lambda _cg: [{"name": "mn_connect4", "id": 7, "attach_type": "connect4"}]),
    )
    monkeypatch.setattr(status, "_ready", lambda _url: "ready (2 workers)")
    monkeypatch.setattr(
        status,
        "_dns_state",
        lambda capture, domain: {
            "server": "127.0.0.1:15053",
            "state": "answering",
            "domain": domain,
            "capture": capture,
        },
    )
    return Node(etc, state)


@dataclass
class ControlPlane:
    server: ThreadedControlPlane

    def get(self, *args: str) -> Result:
        return invoke(
            "get",
            *args,
            "--cp",
            self.server.url,
            "--data-dir",
            str(self.server.data_dir),
            env={"MESHNODE_ADMIN_TOKEN": ""},
        )


@pytest.fixture(scope="module")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane with node1 (one workload, web, so one service) and two policies."""
    tmp = tmp_path_factory.mktemp("cp")
    store = open_store(f"sqlite://{tmp}/cp.db")
    server = ThreadedControlPlane(store, tmp / "data").start()
    try:
        admin = server.admin(server.cp.admin_token)
        token = admin.call(
            "POST",
            "/v1/admin/tokens",
            {"node": "node1", "address": "198.18.0.11", "identities": ["default/web"]},
        )["token"]
        status, data, enrolled = enroll(
            server.url, server.bundle(), token, "node1", tmp / "n", ip="198.18.0.11"
        )
        assert enrolled is not None, data
        enrolled.client(server.url).call(
            "POST", "/v1/node/workloads", {"name": "web", "service": "web", "port": 8080}
        )
        (tmp / "p.yaml").write_text(POLICIES)
        result = invoke(
            "apply",
            "-f",
            str(tmp / "p.yaml"),
            "--cp",
            server.url,
            "--data-dir",
            str(server.data_dir),
            env={"MESHNODE_ADMIN_TOKEN": ""},
        )
        assert result.exit_code == 0, result.stderr
        yield ControlPlane(server)
    finally:
        server.stop()
        store.close()


@pytest.fixture
def ztunnel_admin() -> Iterator[str]:
    """host:port of a loopback server that answers /config_dump like ztunnel."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = json.dumps(CONFIG_DUMP).encode()
            self.send_response(200 if self.path == "/config_dump" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
