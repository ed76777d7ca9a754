"""The control-plane server over real TLS on loopback (SQLite store, in a thread)."""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshnode.controlplane.api import admin_allowed, local_admin_allowed
from meshnode.controlplane.store import open_store
from meshnode.core.cpclient import ApiClient, ClientError
from meshnode.core.identity import SpiffeId, spiffe_id_from_certificate
from meshnode.core.pki import generate_private_key, make_csr
from tests.support.controlplane import EnrolledNode, ThreadedControlPlane, enroll

DER = Encoding.DER
POLICY = """\
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: default}
spec:
  action: DENY
  rules: [{from: {namespaces: [evil]}}]
"""


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data").start()
    yield server
    server.stop()
    store.close()


def _token(cp: ThreadedControlPlane, node: str, **kw: Any) -> str:
    return str(cp.admin().call("POST", "/v1/admin/tokens", {"node": node, **kw})["token"])


def _node(
    cp: ThreadedControlPlane,
    tmp_path: Path,
    name: str = "node1",
    identities: tuple[str, ...] = ("default/*",),
) -> EnrolledNode:
    """An enrolled node at 198.18.0.11 (the address its token names), granted
    `identities` by its token."""
    token = _token(cp, name, address="198.18.0.11", identities=list(identities))
    status, data, node = enroll(
        cp.url, cp.bundle(), token, name, tmp_path / name, zone="z1", ip="198.18.0.11"
    )
    assert status == 200, data
    assert node is not None
    return node


def _counts(cp: ThreadedControlPlane) -> tuple[int, int]:
    nodes = cp.admin().call("GET", "/v1/admin/nodes")
    return nodes["revision"], len(nodes["items"])


# --- enrollment ----------------------------------------------------------------------


def test_enroll_success_gives_a_node_certificate(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    node = _node(cp, tmp_path)
    chain = x509.load_pem_x509_certificates(node.cert_path.read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/node/node1"
    ]
    assert node.response["node"] == {"name": "node1", "zone": "z1", "ip": "198.18.0.11"}
    assert node.response["trust_domain"] == "cluster.local"
    # The token's pin is the SHA-256 of the root in the bundle.
    pin = _token(cp, "x").split(".")[3]
    root = x509.load_pem_x509_certificates(node.bundle)[0]
    assert hashlib.sha256(root.public_bytes(DER)).hexdigest() == pin


def test_enroll_refusals_change_nothing(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    token = _token(cp, "node1")
    before = _counts(cp)
    # Wrong name: 403.
    status, data, _ = enroll(cp.url, cp.bundle(), token, "node2", tmp_path / "a")
    assert status == 403 and "node1" in data["error"]
    # Expired: 401.
    short = _token(cp, "node3", ttl_seconds=0.2)
    time.sleep(0.4)
    after_create = _counts(cp)
    status, data, _ = enroll(cp.url, cp.bundle(), short, "node3", tmp_path / "b")
    assert status == 401 and "expired" in data["error"]
    # Bad CSR: 400, and the token is still usable afterwards.
    status, data = ApiClient(cp.url, cp.bundle()).request(
        "POST", "/v1/enroll", {"token": token, "name": "node1", "csr": "garbage"}
    )
    assert status == 400 and "csr" in data["error"]
    # Malformed token: 400.
    status, data, _ = enroll(cp.url, cp.bundle(), "mn1.nope", "node1", tmp_path / "c")
    assert status == 400
    assert _counts(cp) == after_create and after_create[1] == before[1] == 0
    # Success, then reuse refused (401) without a change.
    status, _, _ = enroll(cp.url, cp.bundle(), token, "node1", tmp_path / "d")
    assert status == 200
    rev, count = _counts(cp)
    status, data, _ = enroll(cp.url, cp.bundle(), token, "node1", tmp_path / "e")
    assert status == 401 and "already used" in data["error"]
    assert _counts(cp) == (rev, count) and count == 1


# --- node API ------------------------------------------------------------------------


def test_node_api_needs_a_node_certificate(cp: ThreadedControlPlane) -> None:
    status, data = ApiClient(cp.url, cp.bundle()).request("GET", "/v1/node/config")
    assert status == 401 and "certificate" in data["error"]


def test_register_workload_and_get_slice(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    node = _node(cp, tmp_path).client(cp.url)
    node.call(
        "POST",
        "/v1/node/workloads",
        {"name": "web", "namespace": "default", "service": "web", "port": 8080, "version": "v1"},
    )
    s = node.call("GET", "/v1/node/config")
    assert s["full"] is True and s["node"]["name"] == "node1"
    assert s["workloads"] == [
        {
            "name": "web",
            "namespace": "default",
            "service": "web",
            "service_account": "web",
            "port": 8080,
            "version": "v1",
        }
    ]
    assert s["services"][0]["vip"] == "240.0.0.1"
    assert s["services"][0]["endpoints"][0]["node_ip"] == "198.18.0.11"
    # Bad workload: 400 naming the field.
    status, data = node.request("POST", "/v1/node/workloads", {"name": "web", "port": 70000})
    assert status == 400 and "port" in data["error"]
    # Incremental: since the revision before a change -> only the change.
    rev = s["revision"]
    node.call("DELETE", "/v1/node/workloads/web")
    d = node.call("GET", f"/v1/node/config?since={rev}")
    assert d["full"] is False
    assert {(c["op"], c["kind"], c["key"]) for c in d["changes"]} == {
        ("delete", "workload", "web"),
        ("delete", "service", "default/web"),
    }
    assert node.call("GET", f"/v1/node/config?since={d['revision']}") == {
        "revision": d["revision"],
        "unchanged": True,
    }


def test_long_poll_wakes_on_admin_change(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    node = _node(cp, tmp_path).client(cp.url)
    rev = node.call("GET", "/v1/node/config")["revision"]
    result: dict[str, Any] = {}

    def watch() -> None:
        t0 = time.monotonic()
        result["answer"] = node.call("GET", f"/v1/node/config?since={rev}&wait=30", timeout=40)
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.5)
    assert "answer" not in result  # it is waiting, not answering at once
    t0 = time.monotonic()
    cp.admin().call("POST", "/v1/admin/resources", POLICY, content_type="application/yaml")
    t.join(10)
    assert time.monotonic() - t0 < 1.0
    changes = result["answer"]["changes"]
    assert [(c["kind"], c["key"]) for c in changes] == [
        ("resource", "AuthorizationPolicy/default/deny-web")
    ]


def test_long_poll_times_out_unchanged(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    node = _node(cp, tmp_path).client(cp.url)
    rev = node.call("GET", "/v1/node/config")["revision"]
    t0 = time.monotonic()
    assert node.call("GET", f"/v1/node/config?since={rev}&wait=1") == {
        "revision": rev,
        "unchanged": True,
    }
    assert 0.9 < time.monotonic() - t0 < 3


def test_workload_certificate_only_for_hosted_identities(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    node1 = _node(cp, tmp_path, "node1").client(cp.url)
    node2 = _node(cp, tmp_path, "node2").client(cp.url)
    node1.call("POST", "/v1/node/workloads", {"name": "web", "service": "web", "port": 8080})
    node2.call("POST", "/v1/node/workloads", {"name": "api", "service": "api", "port": 9090})
    csr = make_csr(generate_private_key(), SpiffeId("cluster.local", "default", "api")).decode()
    # node1 asks for api's identity (hosted on node2 only): 403 with a clear message.
    status, data = node1.request(
        "POST",
        "/v1/node/certificates",
        {"csr": csr, "namespace": "default", "service_account": "api"},
    )
    assert status == 403 and "hosts no workload" in data["error"]
    got = node2.call(
        "POST",
        "/v1/node/certificates",
        {"csr": csr, "namespace": "default", "service_account": "api"},
    )
    leaf = x509.load_pem_x509_certificates(got["certificate"].encode())[0]
    assert spiffe_id_from_certificate(leaf) == SpiffeId("cluster.local", "default", "api")


def test_renew_and_node_deletion(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    enrolled = _node(cp, tmp_path)
    node = enrolled.client(cp.url)
    csr = make_csr(generate_private_key(), SpiffeId("cluster.local", "x", "y")).decode()
    renewed = node.call("POST", "/v1/node/renew", {"csr": csr})
    leaf = x509.load_pem_x509_certificates(renewed["certificate"].encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/node/node1"
    ]
    cp.admin().call("DELETE", "/v1/admin/nodes/node1")
    status, data = node.request("GET", "/v1/node/config")
    assert status == 403 and "not registered" in data["error"]


# --- admin API -----------------------------------------------------------------------


def test_invalid_yaml_is_refused_naming_the_field(cp: ThreadedControlPlane) -> None:
    admin = cp.admin()
    rev = admin.call("GET", "/v1/admin/resources")["revision"]
    bad = POLICY + "---\n" + POLICY.replace("deny-web", "second").replace("DENY", "MAYBE")
    status, data = admin.request(
        "POST", "/v1/admin/resources", bad, content_type="application/yaml"
    )
    assert status == 400
    assert "document 2" in data["error"] and "spec.action" in data["error"]
    after = admin.call("GET", "/v1/admin/resources")
    assert after["items"] == [] and after["revision"] == rev  # all or nothing
    ok = admin.call("POST", "/v1/admin/resources", POLICY, content_type="application/yaml")
    assert ok["results"] == ["AuthorizationPolicy/deny-web created"]
    items = admin.call("GET", "/v1/admin/resources?kind=AuthorizationPolicy")["items"]
    assert [i["metadata"]["name"] for i in items] == ["deny-web"]
    admin.call("DELETE", "/v1/admin/resources/AuthorizationPolicy/default/deny-web")
    assert admin.call("GET", "/v1/admin/resources")["items"] == []


def test_admin_auth_function() -> None:
    """The Bearer logic and the socket's uid check, called directly."""
    token = "s3cret"
    hashes = {hashlib.sha256(token.encode()).hexdigest()}
    assert not admin_allowed(None, hashes)
    assert not admin_allowed("Bearer wrong", hashes)
    assert not admin_allowed(f"Basic {token}", hashes)
    assert admin_allowed(f"Bearer {token}", hashes)
    assert local_admin_allowed(0, 990) and local_admin_allowed(990, 990)
    assert not local_admin_allowed(1000, 990) and not local_admin_allowed(None, 0)


def test_loopback_is_no_admin(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    """Issue 10, attack 4: a local account (or a port-forward, an SSRF on the host,
    meshnode's own 127.0.0.6) reaches the admin API over loopback TCP. Before the
    fix the loopback address alone made it admin; now it needs the token."""
    for source in ("127.0.0.1", "127.0.0.6"):
        status, data = _admin_from(cp, source, None, "GET", "/v1/admin/nodes")
        assert status == 401 and "admin-token" in data["error"], (source, data)
        status, data = _admin_from(cp, source, None, "POST", "/v1/admin/tokens", {"node": "evil"})
        assert status == 401, (source, data)
    status, _ = cp.admin("not-the-token").request("GET", "/v1/admin/nodes")
    assert status == 401
    # Control: the token over TLS, and root on the admin socket.
    token = (tmp_path / "data" / "admin-token").read_text().strip()
    assert (tmp_path / "data" / "admin-token").stat().st_mode & 0o777 == 0o600
    assert cp.admin(token).call("GET", "/v1/admin/nodes")["items"] == []
    assert cp.local_admin().call("GET", "/v1/admin/nodes")["items"] == []


def _admin_from(
    cp: ThreadedControlPlane,
    source: str,
    token: str | None,
    method: str,
    path: str,
    body: Any = None,
) -> tuple[int, Any]:
    """A request over TLS from a chosen loopback source address (curl --interface)."""
    import json
    import subprocess

    bundle = cp.data_dir / "trust-bundle.pem"
    cmd = [
        "curl", "-sS", "--max-time", "10", "--interface", source, "--cacert", str(bundle),
        "-X", method, "-o", "-", "-w", "\n%{http_code}",
    ]  # fmt: skip
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = subprocess.run([*cmd, cp.url + path], capture_output=True, text=True, check=True)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else {}


def test_the_admin_socket_is_root_only(tmp_path: Path) -> None:
    """The admin socket is 0600 and, even opened up, answers only root or the
    control plane's own user (SO_PEERCRED: the kernel's word, not the caller's)."""
    import shutil
    import tempfile

    sock_dir = Path(tempfile.mkdtemp(prefix="mn-admin-"))  # a short path others may enter
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    cp = ThreadedControlPlane(store, tmp_path / "data", admin_socket=sock_dir / "a.sock")
    cp.start()
    try:
        _root_only_socket(cp, sock_dir)
    finally:
        cp.stop()
        store.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _root_only_socket(cp: ThreadedControlPlane, sock_dir: Path) -> None:
    import os
    import subprocess
    import sys

    path = cp.config.admin_socket_path
    assert path.stat().st_mode & 0o777 == 0o600
    # Node routes are not on the socket at all.
    status, _ = cp.local_admin().request("GET", "/v1/node/config")
    assert status == 404
    if os.getuid() != 0:
        pytest.skip("the uid check needs root to run a caller as another user")
    # Open the socket (and its directory) to everyone, then call as nobody.
    path.chmod(0o666)
    sock_dir.chmod(0o711)
    request = b"GET /v1/admin/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(bytes.fromhex(sys.argv[2]))\n"
        "print(s.recv(65536).split(b'\\r\\n')[0].decode())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path), request.hex()],
        capture_output=True,
        text=True,
        timeout=30,
        user=65534,
        group=65534,
    )
    assert out.returncode == 0, out.stderr
    assert " 403 " in out.stdout, out.stdout
    path.chmod(0o600)


def test_tls_is_1_3_and_cert_names_the_controlplane(cp: ThreadedControlPlane) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cp.bundle().decode())
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    import socket

    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", cp.cp.port)) as s,
        ctx.wrap_socket(s, server_hostname="127.0.0.1"),
    ):
        pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cp.bundle().decode())
    with (
        socket.create_connection(("127.0.0.1", cp.cp.port)) as s,
        ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
    ):
        peer = tls.getpeercert()
        assert ("URI", "spiffe://cluster.local/controlplane") in peer["subjectAltName"]
        assert tls.version() == "TLSv1.3"


def _roots(cp: ThreadedControlPlane) -> list[x509.Certificate]:
    bundle = cp.admin().call("GET", "/v1/trust-bundle")["trust_bundle"]
    return x509.load_pem_x509_certificates(bundle.encode())


def test_ca_rotation_through_the_api(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    node = _node(cp, tmp_path).client(cp.url)
    # Issue 10, attack 7: an overlap of 0 would lock the fleet out; refused, with why.
    status, data = cp.admin().request("POST", "/v1/admin/ca/rotate", {"overlap_seconds": 0})
    assert status == 400 and "would lock nodes out" in data["error"], data
    assert "--overlap 3720" in data["error"]  # 1 h certificates + 60 s watch + 60 s skew
    status, data = cp.admin().request("POST", "/v1/admin/ca/rotate", {"overlap_seconds": 3600})
    assert status == 400, data
    assert len(_roots(cp)) == 1  # nothing changed
    # Control: the default overlap is the minimum.
    out = cp.admin().call("POST", "/v1/admin/ca/rotate", {})
    assert len(out["roots"]) == 2 and out["overlap_seconds"] == 3720
    # The old node certificate still works during the overlap (new TLS context too).
    s = node.call("GET", "/v1/node/config")
    assert len(x509.load_pem_x509_certificates(s["trust_bundle"].encode())) == 2
    bundle = s["trust_bundle"].encode()
    csr = make_csr(generate_private_key(), SpiffeId("cluster.local", "x", "y")).decode()
    renewed = ApiClient(cp.url, bundle, cert_file=node.cert_file, key_file=node.key_file).call(
        "POST", "/v1/node/renew", {"csr": csr}
    )
    issuer = x509.load_pem_x509_certificates(renewed["certificate"].encode())[1]
    assert hashlib.sha256(issuer.public_bytes(DER)).hexdigest() != out["roots"][0]
    # Forced (a compromised root): no overlap retires the old root at once, and the
    # old certificate is refused.
    cp.admin().call("POST", "/v1/admin/ca/rotate", {"overlap_seconds": 0, "force": True})
    new_bundle = cp.admin().call("GET", "/v1/trust-bundle")["trust_bundle"].encode()
    with pytest.raises((ClientError, ssl.SSLError)):
        ApiClient(cp.url, new_bundle, cert_file=node.cert_file, key_file=node.key_file).call(
            "GET", "/v1/node/config"
        )
