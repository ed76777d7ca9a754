"""Identities are granted, not claimed (issue: zero trust), attacked as a
compromised node would: with only curl and openssl against the real control
plane over TLS, a node enrolled for web-1 tries to become prod/payments.

Each attack has its control case (the granted identity works), so every test can
fail: before grants were enforced, the attacks here got 200s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.controlplane.store import open_store
from tests.support.controlplane import EnrolledNode, ThreadedControlPlane, enroll

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None,
    reason="needs curl and openssl (the attacker's tools)",
)

PAYMENTS = {"name": "pay", "namespace": "prod", "service": "payments", "port": 8443}
GRANT = """\
kind: IdentityGrant
metadata: {name: payments-hosts}
spec:
  nodes: [pay-1]
  identities: [prod/payments]
"""


def _start(tmp_path: Path, **kw: Any) -> ThreadedControlPlane:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    return ThreadedControlPlane(store, tmp_path / "data", **kw).start()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    server = _start(tmp_path)
    yield server
    server.stop()


def _token(cp: ThreadedControlPlane, node: str, **body: Any) -> str:
    return str(cp.admin().call("POST", "/v1/admin/tokens", {"node": node, **body})["token"])


def _enrolled(
    cp: ThreadedControlPlane, tmp_path: Path, name: str, *identities: str
) -> EnrolledNode:
    token = _token(cp, name, identities=list(identities))
    status, data, node = enroll(cp.url, cp.bundle(), token, name, tmp_path / name)
    assert status == 200 and node is not None, data
    (tmp_path / name / "bundle.pem").write_bytes(node.bundle)
    return node


def _curl(
    cp: ThreadedControlPlane, node: EnrolledNode, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """What a compromised node can do with its own key and certificate."""
    cmd = [
        "curl", "-sS", "--max-time", "10", "-X", method,
        "--cacert", str(node.dir / "bundle.pem"),
        "--cert", str(node.cert_path), "--key", str(node.key_path),
        "-o", "-", "-w", "\n%{http_code}",
    ]  # fmt: skip
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = subprocess.run(cmd + [cp.url + path], capture_output=True, text=True, check=True)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else {}


def _csr(tmp_path: Path) -> str:
    """A CSR made with openssl alone (the identity in it is the attacker's wish)."""
    key, csr = tmp_path / "attacker.key", tmp_path / "attacker.csr"
    subprocess.run(
        [
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=payments",
            "-addext", "subjectAltName=URI:spiffe://cluster.local/ns/prod/sa/payments",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return csr.read_text()


def _apply(cp: ThreadedControlPlane, text: str) -> dict[str, Any]:
    result: dict[str, Any] = cp.admin().call(
        "POST", "/v1/admin/resources", text.encode(), content_type="application/yaml"
    )
    return result


def _endpoints(cp: ThreadedControlPlane, namespace: str, service: str) -> list[str]:
    for svc in cp.admin().call("GET", "/v1/admin/services")["items"]:
        if (svc["namespace"], svc["name"]) == (namespace, service):
            return [e["node"] for e in svc["endpoints"]]
    return []


def test_a_node_cannot_register_or_get_a_certificate_for_an_identity_it_was_not_granted(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    web1 = _enrolled(cp, tmp_path, "web-1", "default/web")
    csr = _csr(tmp_path)
    # The attack: register prod/payments and ask for its certificate.
    code, data = _curl(cp, web1, "POST", "/v1/node/workloads", PAYMENTS)
    assert code == 403, data
    assert "not granted identity prod/payments" in data["error"]
    assert "IdentityGrant" in data["error"]  # says what the operator would add
    code, data = _curl(
        cp,
        web1,
        "POST",
        "/v1/node/certificates",
        {"namespace": "prod", "service_account": "payments", "csr": csr},
    )
    assert code == 403 and "not granted" in data["error"], data
    assert _endpoints(cp, "prod", "payments") == []
    assert cp.admin().call("GET", "/v1/admin/workloads")["items"] == []
    # Control: the identity its token grants works on day 0, with no extra step.
    code, data = _curl(
        cp, web1, "POST", "/v1/node/workloads", {"name": "web", "service": "web", "port": 8080}
    )
    assert code == 200, data
    code, data = _curl(
        cp,
        web1,
        "POST",
        "/v1/node/certificates",
        {"namespace": "default", "service_account": "web", "csr": csr},
    )
    assert code == 200 and "BEGIN CERTIFICATE" in data["certificate"], data
    assert _endpoints(cp, "default", "web") == ["web-1"]


def test_a_grant_applied_later_allows_and_its_removal_takes_the_endpoint_away(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    pay1 = _enrolled(cp, tmp_path, "pay-1")  # a token with no identity
    code, data = _curl(cp, pay1, "POST", "/v1/node/workloads", PAYMENTS)
    assert code == 403, data
    applied = _apply(cp, GRANT)
    assert applied["results"] == ["IdentityGrant/payments-hosts created"]
    code, data = _curl(cp, pay1, "POST", "/v1/node/workloads", PAYMENTS)
    assert code == 200, data
    assert _endpoints(cp, "prod", "payments") == ["pay-1"]
    # The grant is revoked: the registration stays, but it is no endpoint any more and
    # no certificate is signed for it.
    cp.admin().call("DELETE", "/v1/admin/resources/IdentityGrant/default/payments-hosts")
    assert _endpoints(cp, "prod", "payments") == []
    code, data = _curl(
        cp,
        pay1,
        "POST",
        "/v1/node/certificates",
        {"namespace": "prod", "service_account": "payments", "csr": _csr(tmp_path)},
    )
    assert code == 403 and "payments" in data["error"], data


def test_a_node_cannot_choose_its_address(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    # The attack: enroll claiming another node's address to draw its traffic.
    token = _token(cp, "web-1")
    status, data, _ = enroll(cp.url, cp.bundle(), token, "web-1", tmp_path / "a", ip="10.9.9.9")
    assert status == 403 and "address is fixed at enrollment" in data["error"], data
    assert cp.admin().call("GET", "/v1/admin/nodes")["items"] == []
    # Control: the same token (not consumed) enrolls at the address it came from.
    status, data, _ = enroll(cp.url, cp.bundle(), token, "web-1", tmp_path / "b")
    assert status == 200 and data["node"]["ip"] == "127.0.0.1", data
    # The operator may name the address in the token; then only that one is taken.
    named = _token(cp, "web-2", address="198.18.0.12")
    status, data, _ = enroll(cp.url, cp.bundle(), named, "web-2", tmp_path / "c", ip="127.0.0.1")
    assert status == 403 and "its token names 198.18.0.12" in data["error"], data
    status, data, _ = enroll(cp.url, cp.bundle(), named, "web-2", tmp_path / "d")
    assert status == 200 and data["node"]["ip"] == "198.18.0.12", data


def test_the_token_is_checked_before_anything_is_signed(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    # A wrong token with a bad CSR gets the token's refusal: no signing work is done
    # for a caller without a valid token.
    wrong = _token(cp, "web-1")[:-64] + "0" * 64
    wrong = "mn1.00000000." + "0" * 32 + "." + wrong.split(".")[3]
    status, data = cp.admin().request(
        "POST", "/v1/enroll", {"token": wrong, "name": "web-1", "csr": "garbage"}
    )
    assert status == 401 and "unknown token" in data["error"], data


def test_one_node_cannot_register_without_end(tmp_path: Path) -> None:
    cp = _start(tmp_path, max_workloads_per_node=3)
    try:
        web1 = _enrolled(cp, tmp_path, "web-1", "default/*")
        for i in range(3):
            body = {"name": f"w{i}", "service": f"w{i}", "port": 8000 + i}
            assert _curl(cp, web1, "POST", "/v1/node/workloads", body)[0] == 200
        code, data = _curl(
            cp, web1, "POST", "/v1/node/workloads", {"name": "w3", "service": "w3", "port": 8003}
        )
        assert code == 429 and "already has 3 workloads" in data["error"], data
        # Re-registering an existing one (an update) is not a new workload.
        body = {"name": "w0", "service": "w0", "port": 8000, "version": "v2"}
        assert _curl(cp, web1, "POST", "/v1/node/workloads", body)[0] == 200
    finally:
        cp.stop()


def test_a_zone_grant_covers_the_nodes_of_that_zone(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    applied = _apply(
        cp,
        "kind: IdentityGrant\nmetadata: {name: zone-a-db}\n"
        "spec: {zones: [zone-a], identities: [data/*]}\n",
    )
    assert applied["results"] == ["IdentityGrant/zone-a-db created"]
    db = {"name": "pg", "namespace": "data", "service": "pg", "port": 5432}
    for name, zone, want in (("db-1", "zone-a", 200), ("db-2", "zone-b", 403)):
        token = _token(cp, name, zone=zone)
        status, data, node = enroll(cp.url, cp.bundle(), token, name, tmp_path / name)
        assert status == 200 and node is not None, data
        (tmp_path / name / "bundle.pem").write_bytes(node.bundle)
        assert _curl(cp, node, "POST", "/v1/node/workloads", db)[0] == want


def test_an_older_store_gains_the_token_columns_and_keeps_its_data(tmp_path: Path) -> None:
    """An upgrade: a store made before tokens carried identities and an address."""
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, "
        "node TEXT NOT NULL, zone TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "expires_at DOUBLE PRECISION NOT NULL, used_at DOUBLE PRECISION, "
        "used_by TEXT NOT NULL DEFAULT '')"
    )
    conn.execute("INSERT INTO tokens VALUES ('0badc0de', 'x', 'old-1', '', 1.0, 2.0, NULL, '')")
    conn.commit()
    conn.close()
    store = open_store(f"sqlite://{db}")
    try:
        store.initialize()
        store.initialize()  # twice: idempotent
        old = store.get_token("0badc0de")
        assert old is not None and old.node == "old-1"
        assert (old.identities, old.address) == ((), "")
    finally:
        store.close()
