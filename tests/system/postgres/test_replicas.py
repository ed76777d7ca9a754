"""Two control-plane processes (`meshnode controlplane run`) on one real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.core.cpclient import ApiClient, ClientError
from tests.support.controlplane import PostgresServer, enroll, free_port, wait_until

POLICY = """\
kind: AuthorizationPolicy
metadata: {name: from-a, namespace: default}
spec: {action: ALLOW, rules: [{from: {namespaces: [default]}}]}
"""


class Replica:
    def __init__(self, name: str, dsn: str, base: Path) -> None:
        self.name, self.dsn = name, dsn
        self.data = base / name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        log = open(self.data.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshnode.cli.main",
                "controlplane",
                "run",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--db",
                self.dsn,
                "--data-dir",
                str(self.data),
                "--cert-ttl",
                "1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ok = wait_until(self._ready, timeout=30, interval=0.1)
        assert ok, (self.data.parent / f"{self.name}.log").read_text()
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "replica exited"
        if not (self.data / "trust-bundle.pem").exists():
            return False
        try:
            self.admin().call("GET", "/v1/trust-bundle", timeout=2)
        except ClientError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def admin(self) -> ApiClient:
        """Admin over TLS with this replica's admin token (no address is trusted)."""
        token_file = self.data / "admin-token"
        token = token_file.read_text().strip() if token_file.exists() else None
        return ApiClient(self.url, (self.data / "trust-bundle.pem").read_bytes(), admin_token=token)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        return self.proc.wait(15)


@pytest.fixture
def replicas(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    dsn = postgres.new_database()
    a, b = Replica("a", dsn, tmp_path), Replica("b", dsn, tmp_path)
    try:  # a replica that started is stopped even when the other one fails to
        a.start()
        b.start()
        yield a, b
    finally:
        for r in (a, b):
            if r.proc is not None and r.proc.poll() is None:
                r.kill(signal.SIGTERM)


def test_replicas_share_state_and_survive_a_crash(
    replicas: tuple[Replica, Replica], tmp_path: Path
) -> None:
    a, b = replicas
    # One CA for both: the same bundle.
    assert (a.data / "trust-bundle.pem").read_bytes() == (b.data / "trust-bundle.pem").read_bytes()
    # A token made on A enrolls on B.
    # (Each token names its node's address and grants the identity it will host.)
    body1 = {"node": "node1", "address": "198.18.0.11", "identities": ["default/web"]}
    token = a.admin().call("POST", "/v1/admin/tokens", body1)["token"]
    status, data, node = enroll(
        b.url, b.admin().bundle_pem, token, "node1", tmp_path / "n1", ip="198.18.0.11"
    )
    assert status == 200, data
    assert node is not None
    # ... and is then used up on A too.
    status, data, _ = enroll(a.url, a.admin().bundle_pem, token, "node1", tmp_path / "n1b")
    assert status == 401
    on_b = node.client(b.url)
    on_b.call("POST", "/v1/node/workloads", {"name": "web", "service": "web", "port": 8080})
    rev = on_b.call("GET", "/v1/node/config")["revision"]

    # A policy applied on A reaches a watcher on B quickly.
    result: dict[str, Any] = {}

    def watch() -> None:
        result["answer"] = on_b.call("GET", f"/v1/node/config?since={rev}&wait=20", timeout=30)
        result["at"] = time.monotonic()

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.5)
    assert "answer" not in result
    t0 = time.monotonic()
    a.admin().call("POST", "/v1/admin/resources", POLICY, content_type="application/yaml")
    t.join(10)
    assert result["at"] - t0 < 2.0, result["at"] - t0
    assert [(c["kind"], c["key"]) for c in result["answer"]["changes"]] == [
        ("resource", "AuthorizationPolicy/default/from-a")
    ]

    # Kill A hard: B serves everything.
    a.kill(signal.SIGKILL)
    nodes = b.admin().call("GET", "/v1/admin/nodes")["items"]
    assert [n["name"] for n in nodes] == ["node1"]
    s = on_b.call("GET", "/v1/node/config")
    assert [r["metadata"]["name"] for r in s["resources"]] == ["from-a"]
    assert s["services"][0]["vip"] == "240.0.0.1"
    body2 = {"node": "node2", "address": "198.18.0.12", "identities": ["default/api"]}
    token2 = b.admin().call("POST", "/v1/admin/tokens", body2)["token"]
    status, _, node2 = enroll(
        b.url, b.admin().bundle_pem, token2, "node2", tmp_path / "n2", ip="198.18.0.12"
    )
    assert status == 200 and node2 is not None
    node2.client(b.url).call(
        "POST", "/v1/node/workloads", {"name": "api", "service": "api", "port": 9090}
    )
    rev_b = b.admin().call("GET", "/v1/admin/nodes")["revision"]

    # Restart A: nothing lost, it sees what B did meanwhile, and serves node1.
    a.start()
    assert [n["name"] for n in a.admin().call("GET", "/v1/admin/nodes")["items"]] == [
        "node1",
        "node2",
    ]
    assert a.admin().call("GET", "/v1/admin/nodes")["revision"] == rev_b
    svcs = {s["name"]: s["vip"] for s in a.admin().call("GET", "/v1/admin/services")["items"]}
    assert svcs == {"web": "240.0.0.1", "api": "240.0.0.2"}
    s_a = node.client(a.url).call("GET", "/v1/node/config")
    assert [r["metadata"]["name"] for r in s_a["resources"]] == ["from-a"]
    # Graceful stop on SIGTERM: exits 0.
    assert b.kill(signal.SIGTERM) == 0
