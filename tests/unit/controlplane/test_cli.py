"""`meshnode token create / apply / get / delete` against a real control plane."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from meshnode.cli.main import cli
from meshnode.controlplane.store import open_store
from tests.support.controlplane import ThreadedControlPlane, enroll

POLICY = """\
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: default}
spec: {action: ALLOW, rules: [{from: {namespaces: [default]}}]}
---
kind: TrafficSplit
metadata: {name: web-split}
spec: {service: web, weights: {v1: 90, v2: 10}}
"""


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data").start()
    yield server
    server.stop()
    store.close()


def _run(cp: ThreadedControlPlane, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [*args, "--cp", cp.url, "--data-dir", str(cp.data_dir)],
        env={"MESHNODE_ADMIN_TOKEN": ""},
    )
    return result.exit_code, result.stdout, result.stderr


def test_token_create_prints_token_and_enroll_line(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    code, out, err = _run(cp, "token", "create", "--node", "node1", "--zone", "z1", "--ttl", "10m")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("mn1.")
    assert f"meshnode enroll --cp {cp.url} --token {token} --name node1" in err
    status, data, _ = enroll(cp.url, cp.bundle(), token, "node1", tmp_path / "n")
    assert status == 200 and data["node"]["zone"] == "z1"


def test_apply_get_delete(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    code, out, err = _run(cp, "apply", "-f", str(f))
    assert code == 0, err
    assert out.splitlines() == [
        "AuthorizationPolicy/allow-web created",
        "TrafficSplit/web-split created",
    ]
    code, out, _ = _run(cp, "apply", "-f", str(f))
    assert "AuthorizationPolicy/allow-web unchanged" in out

    code, out, _ = _run(cp, "get", "authorizationpolicies")
    assert code == 0 and "allow-web" in out and "KIND" in out
    code, out, _ = _run(cp, "get", "TrafficSplit", "web-split", "-o", "json")
    assert json.loads(out)["spec"]["weights"] == {"v1": 90, "v2": 10}
    code, out, _ = _run(cp, "get", "trafficsplit", "-o", "yaml")
    assert list(yaml.safe_load_all(out))[0]["metadata"]["name"] == "web-split"

    code, out, err = _run(cp, "delete", "trafficsplit", "web-split")
    assert code == 0, err
    code, out, err = _run(cp, "get", "trafficsplit", "web-split")
    assert code == 1 and "not found" in err
    code, out, err = _run(cp, "delete", "trafficsplit", "web-split")
    assert code == 1 and "HTTP 404" in err and "not found" in err


def test_apply_invalid_names_the_field_and_changes_nothing(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(POLICY.replace("v2: 10", "v2: -1"))
    code, out, err = _run(cp, "apply", "-f", str(f))
    assert code == 1
    assert "bad.yaml: document 2" in err and "spec.weights.v2" in err
    assert "Traceback" not in err
    code, out, _ = _run(cp, "get", "authorizationpolicy")
    assert "allow-web" not in out


def test_get_nodes_workloads_services(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    code, token, err = _run(
        cp,
        "token",
        "create",
        "--node",
        "node1",
        "--address",
        "198.18.0.11",
        "--identity",
        "default/web",
    )
    assert code == 0 and "grants default/web" in err
    status, _, node = enroll(
        cp.url, cp.bundle(), token.strip(), "node1", tmp_path / "n", ip="198.18.0.11"
    )
    assert node is not None
    node.client(cp.url).call(
        "POST", "/v1/node/workloads", {"name": "web", "service": "web", "port": 8080}
    )
    code, out, _ = _run(cp, "get", "nodes")
    assert "node1" in out and "198.18.0.11" in out
    code, out, _ = _run(cp, "get", "svc", "-o", "json")
    assert json.loads(out)["items"][0]["vip"] == "240.0.0.1"
    code, out, _ = _run(cp, "get", "workloads")
    assert "web" in out
    code, out, err = _run(cp, "delete", "workload", "web")
    assert code == 1 and "--node" in err
    code, out, err = _run(cp, "delete", "workload", "web", "--node", "node1")
    assert code == 0, err
    code, out, _ = _run(cp, "get", "services", "-o", "json")
    assert json.loads(out)["items"] == []


def test_cli_without_trust_bundle_says_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["get", "nodes", "--cp", "https://127.0.0.1:1", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1 and "--ca-file" in result.stderr


def test_cli_pin_fetches_and_checks_the_bundle(cp: ThreadedControlPlane) -> None:
    pin = cp.admin().call("POST", "/v1/admin/tokens", {"node": "x"})["token"].split(".")[3]
    empty = cp.data_dir.parent / "empty"
    empty.mkdir()
    ok = CliRunner().invoke(
        cli,
        ["get", "nodes", "--cp", cp.url, "--data-dir", str(empty), "--pin", pin],
        env={"MESHNODE_ADMIN_TOKEN": cp.cp.admin_token},
    )
    assert ok.exit_code == 0, ok.stderr
    bad = CliRunner().invoke(
        cli, ["get", "nodes", "--cp", cp.url, "--data-dir", str(empty), "--pin", "0" * 64]
    )
    assert bad.exit_code == 1 and "expected pin" in bad.stderr


def test_cli_on_the_control_plane_host_uses_the_admin_socket(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    """No --cp, no token: the CLI talks to the root-only admin socket of the data dir."""
    (cp.data_dir / "admin-token").unlink()  # nothing to fall back on
    result = CliRunner().invoke(
        cli, ["get", "nodes", "--data-dir", str(cp.data_dir)], env={"MESHNODE_ADMIN_TOKEN": ""}
    )
    assert result.exit_code == 0, result.stderr
    # Over TCP the same call without a token is refused, and says what to do.
    result = CliRunner().invoke(
        cli,
        ["get", "nodes", "--cp", cp.url, "--data-dir", str(cp.data_dir)],
        env={"MESHNODE_ADMIN_TOKEN": ""},
    )
    assert result.exit_code == 1 and "HTTP 401" in result.stderr
    assert "admin.sock" in result.stderr and "Traceback" not in result.stderr


def test_ca_rotate_refuses_a_short_overlap_and_says_why(cp: ThreadedControlPlane) -> None:
    code, out, err = _run(cp, "ca", "rotate", "--overlap", "1h")
    assert code == 1 and "would lock nodes out" in err and "--force" in err, err
    assert "Traceback" not in err
    code, out, err = _run(cp, "ca", "rotate")
    assert code == 0 and "2 roots trusted" in out, err
