"""Multi-zone control planes (issue 12), for real over TLS on loopback: a global
control plane and two zone control planes, each with its own database, enrolled
with zone join tokens; nodes enrolled with their zone's control plane.

What it proves: a zone's CA is an intermediate of the global root; a service that
runs only in zone-b reaches zone-a's nodes as a remote entry (its ingress, never
its nodes' addresses); only granted identities cross; policies flow down; zones
keep serving, and pick up changes, across a global outage; and the zone API
refuses every certificate but the right zone's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509

from meshnode.cli.main import cli
from meshnode.controlplane.ca import CertificateAuthority, RotatingCA
from meshnode.controlplane.store import open_store
from meshnode.core import api
from meshnode.core.cpclient import ApiClient
from meshnode.core.pki import generate_private_key, make_node_csr, private_key_pem
from tests.support.controlplane import (
    EnrolledNode,
    ThreadedControlPlane,
    enroll,
    free_port,
    wait_until,
)

API_GRANT = """\
kind: IdentityGrant
metadata: {name: zone-b-api}
spec:
  zones: [zone-b]
  identities: [default/api]
"""
INGRESS = {"zone-a": "127.0.0.21:15443", "zone-b": "127.0.0.22:15443"}


@dataclass
class Mesh:
    tmp: Path
    global_port: int
    glob: ThreadedControlPlane
    zones: dict[str, ThreadedControlPlane]

    @property
    def global_url(self) -> str:
        return f"https://127.0.0.1:{self.global_port}"

    def start_global(self) -> ThreadedControlPlane:
        store = open_store(f"sqlite://{self.tmp}/global.db")
        self.glob = ThreadedControlPlane(store, self.tmp / "global", mode="global")
        self.glob.cp.config  # noqa: B018 - built; started below on the fixed port
        _start_on(self.glob, self.global_port)
        return self.glob

    def start_zone(self, zone: str, token: str = "") -> ThreadedControlPlane:
        store = open_store(f"sqlite://{self.tmp}/{zone}.db")
        cp = ThreadedControlPlane(
            store,
            self.tmp / zone,
            mode="zone",
            zone=zone,
            global_url=self.global_url,
            global_token=token,
            zone_ingress=INGRESS[zone],
        ).start()
        self.zones[zone] = cp
        return cp

    def node(self, zone: str, name: str, *identities: str) -> EnrolledNode:
        """Node `name` (nodeN) enrolled with its zone's control plane at 127.0.0.3N."""
        cp = self.zones[zone]
        address = f"127.0.0.3{name[-1]}"
        body = {"node": name, "identities": list(identities), "address": address}
        token = cp.admin().call("POST", api.ADMIN_TOKENS, body)["token"]
        status, data, node = enroll(cp.url, cp.bundle(), token, name, self.tmp / "nodes" / name)
        assert status == 200 and node is not None, data
        return node


def _start_on(cp: ThreadedControlPlane, port: int) -> None:
    import asyncio

    cp._thread.start()
    asyncio.run_coroutine_threadsafe(cp.cp.start("127.0.0.1", port), cp.loop).result(30)


def zone_token(glob: ThreadedControlPlane, zone: str) -> str:
    return str(glob.admin().call("POST", api.ADMIN_TOKENS, {"zone_controlplane": zone})["token"])


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path, free_port(), None, {})  # type: ignore[arg-type]
    m.start_global()
    for zone in ("zone-a", "zone-b"):
        m.start_zone(zone, zone_token(m.glob, zone))
    yield m
    for cp in m.zones.values():
        cp.stop()
    m.glob.stop()


def service(cp: ThreadedControlPlane, name: str) -> dict[str, Any] | None:
    for item in cp.admin().call("GET", api.ADMIN_SERVICES)["items"]:
        if item["name"] == name:
            return dict(item)
    return None


def slice_of(cp: ThreadedControlPlane, node: EnrolledNode) -> dict[str, Any]:
    status, data = node.client(cp.url).request("GET", api.NODE_CONFIG)
    assert status == 200, data
    return dict(data)


def register(cp: ThreadedControlPlane, node: EnrolledNode, name: str, port: int = 8080) -> None:
    status, data = node.client(cp.url).request(
        "POST", api.NODE_WORKLOADS, {"name": name, "port": port}
    )
    assert status == 200, data


def apply(cp: ThreadedControlPlane, text: str) -> Any:
    return cp.admin().request("POST", api.ADMIN_RESOURCES, text, content_type="application/yaml")


# --- trust --------------------------------------------------------------------------


def test_a_zone_signs_with_an_intermediate_of_the_global_root(mesh: Mesh) -> None:
    glob_root = x509.load_pem_x509_certificate(mesh.glob.bundle())
    for zone, cp in mesh.zones.items():
        assert cp.bundle() == mesh.glob.bundle(), f"{zone} must hand out the global's roots"
        ca = cp.cp.cache.ca
        assert ca is not None and not ca.active.holds_root_key, "a zone never holds the root key"
        ca.active.intermediate_certificate.verify_directly_issued_by(glob_root)
    node = mesh.node("zone-a", "node1")
    chain = x509.load_pem_x509_certificates(node.cert_path.read_bytes())
    inter_a = mesh.zones["zone-a"].cp.cache.ca.active.intermediate_certificate  # type: ignore[union-attr]
    assert chain[1] == inter_a
    chain[0].verify_directly_issued_by(inter_a)
    # zone-b's intermediate is another one: zone-a's nodes are not zone-b's to sign.
    inter_b = mesh.zones["zone-b"].cp.cache.ca.active.intermediate_certificate  # type: ignore[union-attr]
    assert inter_b != inter_a


def test_a_zone_token_is_single_use_and_no_node_token(mesh: Mesh, tmp_path: Path) -> None:
    token = zone_token(mesh.glob, "zone-c")
    # A zone token does not enroll a node (at the global, nor anywhere).
    status, data, _ = enroll(mesh.glob.url, mesh.glob.bundle(), token, "node9", tmp_path / "n9")
    assert status == 403 and "zone control plane" in data["error"], data
    # The global makes no node tokens at all.
    status, data = mesh.glob.admin().request("POST", api.ADMIN_TOKENS, {"node": "node9"})
    assert status == 400 and "zone" in data["error"], data
    # A node token of zone-a does not enroll a zone.
    node_token = mesh.zones["zone-a"].admin().call("POST", api.ADMIN_TOKENS, {"node": "x"})["token"]
    body = {"token": node_token, "zone": "zone-c", "intermediate_csr": _csr()}
    status, data = ApiClient(mesh.global_url, mesh.glob.bundle()).request(
        "POST", api.ZONE_ENROLL, body
    )
    assert status == 401, data  # not a token the global issued
    # The right token works once.
    body = {"token": token, "zone": "zone-c", "intermediate_csr": _csr()}
    client = ApiClient(mesh.global_url, mesh.glob.bundle())
    status, data = client.request("POST", api.ZONE_ENROLL, body)
    assert status == 200, data
    status, data = client.request("POST", api.ZONE_ENROLL, body)
    assert status == 401 and "already used" in data["error"], data
    # A token for zone-c does not enroll zone-d.
    body = {"token": zone_token(mesh.glob, "zone-c"), "zone": "zone-d", "intermediate_csr": _csr()}
    status, data = client.request("POST", api.ZONE_ENROLL, body)
    assert status == 403, data


def _csr() -> str:
    return make_node_csr(generate_private_key(), None, "x").decode()


# --- services across zones -------------------------------------------------------------


def test_a_service_only_zone_b_runs_reaches_zone_a_through_its_ingress(mesh: Mesh) -> None:
    status, data = apply(mesh.glob, API_GRANT)
    assert status == 200, data
    node3 = mesh.node("zone-b", "node3", "default/api")
    register(mesh.zones["zone-b"], node3, "api")
    node1 = mesh.node("zone-a", "node1")
    a = mesh.zones["zone-a"]
    assert wait_until(lambda: service(a, "api") is not None, 15), "api never reached zone-a"
    api_a = service(a, "api")
    assert api_a is not None
    assert api_a["endpoints"] == []
    assert api_a["remote"] == [
        {
            "zone": "zone-b",
            "ingress_ip": "127.0.0.22",
            "ingress_port": 15443,
            "namespace": "default",
            "service_account": "api",
            "port": 8080,
            "version": "",
            "endpoints": 1,
        }
    ]
    # node1's own slice carries it, with a VIP of zone-a, and no address of zone-b's nodes.
    got = slice_of(a, node1)
    (svc,) = [s for s in got["services"] if s["name"] == "api"]
    assert svc["vip"].startswith("240.") and svc["remote"][0]["zone"] == "zone-b"
    assert mesh.zones["zone-b"].cp.cache.registry.nodes["node3"].ip == "127.0.0.33"
    assert "127.0.0.33" not in json.dumps(got) and "node3" not in json.dumps(got)
    # zone-b does not see its own service as remote.
    assert "remote" not in service(mesh.zones["zone-b"], "api")  # type: ignore[operator]
    # node3's workload goes: the service goes from zone-a too (its VIP is free again).
    status, _ = node3.client(mesh.zones["zone-b"].url).request(
        "DELETE", api.path(api.NODE_WORKLOAD, name="api")
    )
    assert status == 200
    assert wait_until(lambda: service(a, "api") is None, 15), "api stayed in zone-a"


def test_a_zone_cannot_publish_an_identity_it_was_not_granted(mesh: Mesh) -> None:
    node3 = mesh.node("zone-b", "node3", "default/api", "default/secret")
    register(mesh.zones["zone-b"], node3, "api")
    register(mesh.zones["zone-b"], node3, "secret")
    b = mesh.zones["zone-b"]
    assert wait_until(
        lambda: b.cp.zone_sync is not None and len(b.cp.zone_sync.status.refused) == 2, 15
    ), "zone-b was not told what the global left out"
    assert (
        "default/api: zone zone-b is not granted identity default/api"
        in (
            b.cp.zone_sync.status.refused[0]  # type: ignore[union-attr]
        )
    )
    a = mesh.zones["zone-a"]
    time.sleep(1.0)
    assert service(a, "api") is None and service(a, "secret") is None
    # Granting it at the global publishes what zone-b already sent.
    assert apply(mesh.glob, API_GRANT)[0] == 200
    assert wait_until(lambda: service(a, "api") is not None, 15)
    assert service(a, "secret") is None


def test_policy_applied_at_the_global_reaches_every_zone_and_zones_refuse_their_own(
    mesh: Mesh,
) -> None:
    policy = (
        "kind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: default}\n"
        "spec: {action: DENY, rules: [{}]}\n"
    )
    status, data = apply(mesh.zones["zone-a"], policy)
    assert status == 409 and "global control plane" in data["error"], data
    assert apply(mesh.glob, policy)[0] == 200
    for zone, cp in mesh.zones.items():
        assert wait_until(lambda cp=cp: _has_policy(cp, "deny-all"), 15), (
            f"the policy never reached {zone}"
        )
    # Deleted at the global: gone everywhere.
    mesh.glob.admin().call(
        "DELETE", api.path(api.ADMIN_RESOURCE, kind="AuthorizationPolicy", namespace="default",
                            name="deny-all")
    )  # fmt: skip
    for cp in mesh.zones.values():
        assert wait_until(lambda cp=cp: not _has_policy(cp, "deny-all"), 15)


def _has_policy(cp: ThreadedControlPlane, name: str) -> bool:
    items = cp.admin().call("GET", api.ADMIN_RESOURCES)["items"]
    return any(i["metadata"]["name"] == name for i in items)


# --- outages -----------------------------------------------------------------------------


def test_zones_keep_serving_while_the_global_is_down_and_catch_up_after(mesh: Mesh) -> None:
    assert apply(mesh.glob, API_GRANT)[0] == 200
    node3 = mesh.node("zone-b", "node3", "default/api")
    register(mesh.zones["zone-b"], node3, "api")
    a = mesh.zones["zone-a"]
    node1 = mesh.node("zone-a", "node1")
    assert wait_until(lambda: service(a, "api") is not None, 15)

    mesh.glob.stop()
    # zone-a restarts while the global is away: it serves from its own store.
    a.stop()
    a = mesh.start_zone("zone-a")
    svc = [s for s in slice_of(a, node1)["services"] if s["name"] == "api"]
    assert svc and svc[0]["remote"][0]["zone"] == "zone-b"
    assert wait_until(lambda: a.cp.zone_sync is not None and a.cp.zone_sync.status.last_error, 10)

    # The global comes back; a policy applied then reaches both zones.
    mesh.start_global()
    started = time.monotonic()
    policy = (
        "kind: AuthorizationPolicy\nmetadata: {name: after-outage, namespace: default}\n"
        "spec: {action: ALLOW, rules: [{from: {namespaces: [default]}}]}\n"
    )
    assert apply(mesh.glob, policy)[0] == 200
    for cp in mesh.zones.values():
        assert wait_until(lambda cp=cp: _has_policy(cp, "after-outage"), 60)
    print(f"policy applied after the global's restart reached both zones in "
          f"{time.monotonic() - started:.2f}s")  # fmt: skip


# --- the zone API under attack -------------------------------------------------------------


def _client_with(mesh: Mesh, tmp: Path, chain: bytes, key: Any) -> ApiClient:
    cert, keyf = tmp / "c.pem", tmp / "k.pem"
    cert.write_bytes(chain)
    keyf.write_bytes(private_key_pem(key))
    keyf.chmod(0o600)
    return ApiClient(mesh.global_url, mesh.glob.bundle(), cert_file=str(cert), key_file=str(keyf))


STATE = {"zone": "zone-b", "generation": 10**9, "ingress_ip": "127.0.0.99", "ingress_port": 1}


def test_the_zone_api_refuses_every_certificate_but_the_zones_own(
    mesh: Mesh, tmp_path: Path
) -> None:
    plain = ApiClient(mesh.global_url, mesh.glob.bundle())
    status, data = plain.request("PUT", api.ZONE_STATE, STATE)
    assert status == 401, data
    ca_a = mesh.zones["zone-a"].cp.cache.ca.active  # type: ignore[union-attr]
    key = generate_private_key()
    csr = make_node_csr(key, None, "x")
    # A compromised zone-a control plane mints a certificate naming zone-b.
    forged = ca_a.issue_zone_controlplane_certificate(csr, "zone-b", timedelta(hours=1))
    status, data = _client_with(mesh, tmp_path, forged, key).request("PUT", api.ZONE_STATE, STATE)
    assert status == 403 and "not signed by the intermediate" in data["error"], data
    # zone-a's own certificate cannot publish zone-b's state.
    own = ca_a.issue_zone_controlplane_certificate(csr, "zone-a", timedelta(hours=1))
    status, data = _client_with(mesh, tmp_path, own, key).request("PUT", api.ZONE_STATE, STATE)
    assert status == 403 and "not zone-b" in data["error"], data
    # A node of zone-a (its certificate chains to the global root) is no zone.
    node1 = mesh.node("zone-a", "node1")
    status, data = node1.client(mesh.global_url).request("PUT", api.ZONE_STATE, STATE)
    assert status == 403, data
    # Another trust domain's zone certificate: TLS refuses it or the API does.
    other = CertificateAuthority.create("evil.example")
    foreign = other.issue_zone_controlplane_certificate(csr, "zone-b", timedelta(hours=1))
    try:
        status, data = _client_with(mesh, tmp_path, foreign, key).request(
            "PUT", api.ZONE_STATE, STATE
        )
    except Exception as exc:  # noqa: BLE001 - a refused handshake is a pass too
        status, data = 0, {"error": str(exc)}
    assert status in (0, 401, 403), data
    # Nothing of it reached zone-a.
    time.sleep(0.5)
    assert "127.0.0.99" not in json.dumps(mesh.zones["zone-a"].admin().call("GET", api.ADMIN_ZONES))


def test_get_zones_shows_the_sync(mesh: Mesh) -> None:
    assert apply(mesh.glob, API_GRANT)[0] == 200
    node3 = mesh.node("zone-b", "node3", "default/api")
    register(mesh.zones["zone-b"], node3, "api")
    a = mesh.zones["zone-a"]
    assert wait_until(lambda: service(a, "api") is not None, 15)
    runner = CliRunner()
    out = runner.invoke(
        cli, ["get", "zones", "--cp", mesh.glob.url, "--data-dir", str(mesh.glob.data_dir)]
    )
    assert out.exit_code == 0, out.output
    assert "global control plane" in out.stdout
    assert "zone-b" in out.stdout and "127.0.0.22:15443" in out.stdout
    out = runner.invoke(cli, ["get", "zones", "--cp", a.url, "--data-dir", str(a.data_dir)])
    assert out.exit_code == 0, out.output
    assert "zone zone-a: global" in out.stdout and "connected" in out.stdout
    assert "zone-b" in out.stdout and "NOT CONNECTED" not in out.stdout
    # -o json is the documented ZoneList / Zone (docs/cli.md), at both ends.
    from tests.unit.cli.test_docs import check

    for cp, kind, extra in (
        (mesh.glob, "ZoneList", []),
        (a, "ZoneList", []),
        (mesh.glob, "Zone", ["zone-b"]),
        (a, "Zone", ["zone-b"]),
    ):
        where = ["--cp", cp.url, "--data-dir", str(cp.data_dir)]
        out = runner.invoke(cli, ["get", "zones", *extra, "-o", "json", *where])
        assert out.exit_code == 0, out.output
        check(kind, json.loads(out.stdout))


# --- a root rotation at the global reaches the zones ---------------------------------------


def _roots(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def test_a_root_rotation_at_the_global_reaches_every_zone_with_its_overlap(
    mesh: Mesh, tmp_path: Path
) -> None:
    glob = mesh.glob
    old_root = _roots(glob.bundle())[0]
    # An overlap: the old root stays trusted (at the global, so in every zone).
    rotated = glob.admin().call("POST", api.ADMIN_CA_ROTATE, {"overlap_seconds": 3720})
    assert len(rotated["roots"]) == 2
    for zone, cp in mesh.zones.items():
        assert wait_until(lambda cp=cp: cp.bundle() == glob.bundle(), 20), (
            f"{zone} did not take the global's new bundle"
        )
        ca = cp.cp.cache.ca
        assert ca is not None and len(ca.entries) == 2
        new_root = _roots(glob.bundle())[-1]
        assert ca.active.root_certificate == new_root
        ca.active.intermediate_certificate.verify_directly_issued_by(new_root)
        assert old_root in [c.root_certificate for c in ca.trusted()]
    # A node enrolled now gets a certificate under the new root; the sync goes on.
    node1 = mesh.node("zone-a", "node1")
    chain = x509.load_pem_x509_certificates(node1.cert_path.read_bytes())
    chain[1].verify_directly_issued_by(_roots(glob.bundle())[-1])
    assert apply(mesh.glob, API_GRANT)[0] == 200
    node3 = mesh.node("zone-b", "node3", "default/api")
    register(mesh.zones["zone-b"], node3, "api")
    assert wait_until(lambda: service(mesh.zones["zone-a"], "api") is not None, 15)

    # The overlap ends at the global (as its clock would end it, here at once): the
    # zones retire the old root too. (`rotate --force` instead would cut the zones
    # off like every node: they trust the global only under roots they know.)
    def end_overlap(current: RotatingCA) -> RotatingCA:
        now = datetime.now(UTC)
        return RotatingCA([(c, now if r is not None else None) for c, r in current.entries])

    glob.cp.store.rotate_ca(end_overlap)
    assert wait_until(lambda: len(_roots(glob.bundle())) == 1, 20)
    for zone, cp in mesh.zones.items():
        assert wait_until(lambda cp=cp: cp.bundle() == glob.bundle(), 20), (
            f"{zone} still trusts a root the global retired"
        )
        assert old_root not in _roots(cp.bundle())
        assert cp.cp.zone_sync is not None and cp.cp.zone_sync.status.last_error == ""


# --- operator errors: one line, what to do, no traceback ---------------------------------


def _run_cp(tmp_path: Path, *args: str) -> tuple[int, str]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "meshnode.cli.main", "controlplane", "run",
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "z"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stderr


def test_a_zone_control_plane_says_what_is_missing(mesh: Mesh, tmp_path: Path) -> None:
    code, err = _run_cp(tmp_path, "--mode", "zone", "--zone", "zone-c")
    assert code != 0 and "--mode zone needs --global" in err, err
    code, err = _run_cp(tmp_path, "--zone", "zone-c")
    assert code != 0 and "only apply with --mode zone" in err, err
    code, err = _run_cp(tmp_path, "--mode", "zone", "--zone", "zone-c", "--global", mesh.global_url)
    assert code != 0 and "start it once with --global-token" in err, err
    assert "--zone-controlplane zone-c" in err
    code, err = _run_cp(
        tmp_path, "--mode", "zone", "--zone", "zone-c", "--global", mesh.global_url,
        "--global-token", zone_token(mesh.glob, "zone-d"),
    )  # fmt: skip
    assert code != 0 and "is for zone 'zone-d', not 'zone-c'" in err, err
    dead = f"https://127.0.0.1:{free_port()}"
    code, err = _run_cp(
        tmp_path, "--mode", "zone", "--zone", "zone-c", "--global", dead,
        "--global-token", zone_token(mesh.glob, "zone-c"),
    )  # fmt: skip
    assert code != 0 and "cannot enroll zone zone-c" in err and "connection refused" in err, err
    code, err = _run_cp(
        tmp_path, "--mode", "zone", "--zone", "zone-c", "--global", mesh.global_url,
        "--zone-ingress", "ingress.example:15443",
    )  # fmt: skip
    assert code != 0 and "expected IP:PORT" in err, err


# --- a zone renews its intermediate before it ends -----------------------------------------


def test_plan_roots_decides_renewal_and_retirement() -> None:
    from meshnode.controlplane.zonesync import plan_roots
    from meshnode.core.pki import generate_private_key as key_

    glob = CertificateAuthority.create("cluster.local")
    now = datetime.now(UTC)
    k = key_()
    inter = x509.load_pem_x509_certificate(
        glob.issue_zone_intermediate(make_node_csr(k, None, "z"), "zone-a", timedelta(days=30))
    )
    zone_ca = CertificateAuthority.for_zone(glob.root_certificate, inter, k)
    ca = RotatingCA([(zone_ca, None)])
    root = glob.root_certificate
    assert plan_roots(ca, [root], now) == ("", set())
    assert plan_roots(ca, [root], now + timedelta(days=19)) == ("", set())
    assert plan_roots(ca, [root], now + timedelta(days=21)) == ("age", set())
    other = CertificateAuthority.create("cluster.local").root_certificate
    assert plan_roots(ca, [root, other], now) == ("root", set())  # the global signs with `other`
    assert plan_roots(ca, [], now) == ("", set())
    # A second entry under a root the global dropped is retired; the active one never.
    k2 = key_()
    inter2 = x509.load_pem_x509_certificate(
        glob.issue_zone_intermediate(make_node_csr(k2, None, "z"), "zone-a")
    )
    newer = CertificateAuthority.for_zone(glob.root_certificate, inter2, k2)
    old_global = CertificateAuthority.create("cluster.local")
    k3 = key_()
    old_inter = x509.load_pem_x509_certificate(
        old_global.issue_zone_intermediate(make_node_csr(k3, None, "z"), "zone-a")
    )
    old = CertificateAuthority.for_zone(old_global.root_certificate, old_inter, k3)
    two = RotatingCA([(old, None), (newer, None)])
    _, retire = plan_roots(two, [root], now)
    assert len(retire) == 1 and retire != {_pin_of(newer)}


def _pin_of(ca: CertificateAuthority) -> str:
    from cryptography.hazmat.primitives import serialization

    from meshnode.core.pki import root_pin

    return root_pin(ca.root_certificate.public_bytes(serialization.Encoding.DER))


def test_a_zone_renews_its_intermediate_under_the_same_root(tmp_path: Path) -> None:
    port = free_port()
    m = Mesh(tmp_path, port, None, {})  # type: ignore[arg-type]
    store = open_store(f"sqlite://{tmp_path}/global.db")
    m.glob = ThreadedControlPlane(
        store, tmp_path / "global", mode="global", zone_intermediate_ttl=timedelta(seconds=4)
    )
    _start_on(m.glob, port)
    try:
        a = m.start_zone("zone-a", zone_token(m.glob, "zone-a"))
        ca = a.cp.cache.ca
        assert ca is not None and len(ca.entries) == 1
        first = ca.active.intermediate_certificate
        time.sleep(max(0.0, (first.not_valid_after_utc - datetime.now(UTC)).total_seconds() - 1.2))
        # A change at the global wakes the zone's watch; it sees a third of the life left.
        apply(m.glob, policy_text("wake"))
        assert wait_until(lambda: len(a.cp.cache.ca.entries) == 2, 10), "no renewal"  # type: ignore[union-attr]
        ca = a.cp.cache.ca
        assert ca is not None
        assert ca.active.intermediate_certificate != first
        assert ca.active.root_certificate == ca.entries[0][0].root_certificate
        # The old one serves until it ends, no longer; one root in the bundle.
        assert ca.entries[0][1] == first.not_valid_after_utc
        assert len(_roots(a.bundle())) == 1
        # The global knows the zone by its new intermediate too.
        zones = m.glob.cp.cache.registry.internal("Zone")
        assert len(zones["zone-a"]["intermediates"]) == 2
    finally:
        for cp in m.zones.values():
            cp.stop()
        m.glob.stop()


def policy_text(name: str) -> str:
    return (
        f"kind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\n"
        "spec: {action: ALLOW, rules: [{from: {namespaces: [default]}}]}\n"
    )


def test_a_zone_control_plane_cannot_pose_as_the_global(mesh: Mesh) -> None:
    """Every zone control plane serves `spiffe://<td>/controlplane`, under the same
    root: a compromised one on the path between a zone and the global must not pass
    for the global. The zones' client accepts only a certificate a control plane's
    own intermediate signed, never a zone's."""
    from meshnode.core.cpclient import ClientError, request, tls_context
    from meshnode.core.identity import controlplane_uri

    bundle = mesh.glob.bundle()
    uri = controlplane_uri("cluster.local")
    zone_b = mesh.zones["zone-b"]
    # Without the check, zone-b's control plane passes: same root, same URI SAN.
    plain = tls_context(bundle, check_hostname=False, server_uri=uri)
    assert request(zone_b.url, "GET", api.TRUST_BUNDLE, plain).status == 200
    strict = tls_context(bundle, check_hostname=False, server_uri=uri, global_only=True)
    with pytest.raises(ClientError, match="zone control plane, not the global one"):
        request(zone_b.url, "GET", api.TRUST_BUNDLE, strict)
    assert request(mesh.glob.url, "GET", api.TRUST_BUNDLE, strict).status == 200
    # Enrolling a zone with zone-b's address for the global is refused the same way.
    from meshnode.core.cpclient import fetch_pinned_bundle
    from meshnode.core.token import parse_token

    pin = parse_token(zone_token(mesh.glob, "zone-c")).pin
    with pytest.raises(ClientError, match="not the global one"):
        fetch_pinned_bundle(zone_b.url, pin, global_only=True)
    assert fetch_pinned_bundle(mesh.global_url, pin, global_only=True) == bundle
