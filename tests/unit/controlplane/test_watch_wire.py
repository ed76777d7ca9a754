"""The node watch on the wire (issue 16): a real control plane and the node client.

- the agent's watch keeps one TLS connection across long polls (not a handshake
  per poll), and a full slice closes it (its large buffers go with it);
- answers are compact and shared; one endpoint is one small change;
- a node of an older release (no ``endpoints=1``) gets the whole service instead;
- ``--node-view namespace`` sends a node only its namespaces' services.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.controlplane.store import open_store
from meshnode.core.contracts import NodeSlice, SliceDelta
from meshnode.core.cpclient import NodeClient
from meshnode.core.identity import controlplane_uri
from tests.support.controlplane import EnrolledNode, ThreadedControlPlane, enroll

GRANT = """\
kind: IdentityGrant
metadata: {name: all}
spec: {zones: [z1], identities: ["default/*", "other/*"]}
"""


def _start(tmp_path: Path, **config: Any) -> ThreadedControlPlane:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data", **config).start()
    server.admin().request(
        "POST", "/v1/admin/resources", GRANT.encode(), content_type="application/yaml"
    )
    return server


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    server = _start(tmp_path)
    yield server
    server.stop()


def _node(cp: ThreadedControlPlane, tmp_path: Path, name: str) -> EnrolledNode:
    _, doc = cp.admin().request("POST", "/v1/admin/tokens", {"node": name, "zone": "z1"})
    status, data, node = enroll(cp.url, cp.bundle(), doc["token"], name, tmp_path / name)
    assert status == 200 and node is not None, data
    return node


def _client(cp: ThreadedControlPlane, node: EnrolledNode) -> NodeClient:
    bundle = node.dir / "bundle.pem"
    bundle.write_bytes(node.bundle)
    return NodeClient(
        [cp.url], bundle, node.cert_path, node.key_path, controlplane_uri("cluster.local")
    )


def _register(client: NodeClient, name: str, ns: str = "default", service: str = "api") -> None:
    body = {"name": name, "namespace": ns, "service": service, "port": 8080}
    client.request("POST", "/v1/node/workloads", body)


def test_the_watch_keeps_its_connection_and_gets_endpoint_changes(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    n1, n2 = _node(cp, tmp_path, "node1"), _node(cp, tmp_path, "node2")
    c1, c2 = _client(cp, n1), _client(cp, n2)
    _register(c2, "api-1")
    full = c1.request("GET", "/v1/node/config", keep=True)
    held = NodeSlice.from_json(full)
    # A full slice closes its connection; the next poll opens the one that stays.
    c1.request("GET", f"/v1/node/config?since={held.revision}&endpoints=1", keep=True)
    admitted = []
    limits = cp.cp.limits
    real_admit = limits.admit

    def counting(peer: str) -> str:
        admitted.append(peer)
        return real_admit(peer)

    limits.admit = counting  # type: ignore[method-assign]
    for i in range(2, 5):
        _register(c2, f"api-{i}")  # fresh connections: counted too
        before = len(admitted)
        doc = c1.request("GET", f"/v1/node/config?since={held.revision}&endpoints=1", keep=True)
        assert len(admitted) == before, "the watch opened a new connection"
        assert [(c["kind"], c["key"]) for c in doc["changes"]] == [
            ("endpoint", f"default/api/node2/api-{i}")
        ]
        assert len(json.dumps(doc)) < 1024
        held = held.apply(SliceDelta.from_json(doc))
    assert [e.workload for e in held.services[0].endpoints] == [f"api-{i}" for i in range(1, 5)]
    # An agent of an older release: the whole current service document instead.
    old = c1.request("GET", f"/v1/node/config?since={held.revision - 1}")
    assert [c["kind"] for c in old["changes"]] == ["service"]
    assert len(old["changes"][0]["value"]["endpoints"]) == 4
    c1.close()


def test_namespace_view_sends_only_the_nodes_namespaces(tmp_path: Path) -> None:
    cp = _start(tmp_path, node_view="namespace", shared_namespaces=("infra",))
    try:
        n1, n2 = _node(cp, tmp_path, "node1"), _node(cp, tmp_path, "node2")
        c1, c2 = _client(cp, n1), _client(cp, n2)
        _register(c1, "web", ns="default", service="web")
        _register(c2, "api", ns="default")
        _register(c2, "db", ns="other", service="db")
        full = c1.request("GET", "/v1/node/config")
        assert [s["name"] for s in full["services"]] == ["api", "web"]  # not other/db
        rev = full["revision"]
        _register(c2, "db-2", ns="other", service="db")
        doc = c1.request("GET", f"/v1/node/config?since={rev}&endpoints=1")
        assert doc.get("changes", []) == [] or doc.get("unchanged")
        # node2 sees both of its namespaces.
        both = c2.request("GET", "/v1/node/config")
        assert sorted(s["namespace"] for s in both["services"]) == ["default", "default", "other"]
        # node1 gains a workload in `other`: its view grew, so it gets a full slice.
        _register(c1, "db-3", ns="other", service="db")
        grown = c1.request("GET", f"/v1/node/config?since={rev}&endpoints=1")
        assert grown["full"] is True
        assert sorted(s["name"] for s in grown["services"]) == ["api", "db", "web"]
    finally:
        cp.stop()


def test_a_node_that_stops_reading_full_slices_cannot_starve_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a compromised node asks for its full slice on many connections and
    never reads, to hold every writing slot (--max-full-syncs) so no other node can
    sync. Each node gets one full slice written at a time, and a reader that stalls
    a step is cut off, so an honest node's full sync still goes through."""
    import socket
    import ssl
    import time

    from meshnode.controlplane.api import app as app_mod
    from meshnode.controlplane.registry import WorkloadRecord

    monkeypatch.setattr(app_mod.ChunksPayload, "STEP_TIMEOUT", 2.0)
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data", max_full_syncs=1).start()
    try:
        server.admin().request(
            "POST", "/v1/admin/resources", GRANT.encode(), content_type="application/yaml"
        )
        evil, honest = _node(server, tmp_path, "evil"), _node(server, tmp_path, "honest")

        def fill(tx: Any, reg: Any, rev: int) -> None:  # a large mesh: a ~8 MB slice
            for i in range(30000):
                reg.put_workload(
                    WorkloadRecord("honest", f"w{i}", "default", f"s{i % 10}", "sa", 80)
                )

        store.mutate(fill)
        ctx = ssl.create_default_context(cadata=evil.bundle.decode())
        ctx.check_hostname = False
        ctx.load_cert_chain(evil.cert_path, evil.key_path)
        stalled = []
        for _ in range(6):
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", server.cp.port))
            conn = ctx.wrap_socket(raw)
            conn.sendall(b"GET /v1/node/config HTTP/1.1\r\nHost: cp\r\n\r\n")
            stalled.append(conn)  # and never read
        time.sleep(0.5)
        started = time.monotonic()
        doc = _client(server, honest).request("GET", "/v1/node/config", timeout=8)
        assert len(doc["services"]) == 10
        assert time.monotonic() - started < 8
        for conn in stalled:
            conn.close()
    finally:
        server.stop()
        store.close()


def test_a_remembered_certificate_check_is_redone_after_a_minute(
    cp: ThreadedControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root retires by the clock, not only when the CA set changes: a signature
    check remembered for a watch is redone after RECHECK seconds."""
    from cryptography import x509

    from meshnode.controlplane.api.app import _VerifiedCA

    node = _node(cp, tmp_path, "node1")
    leaf = x509.load_pem_x509_certificates(node.cert_path.read_bytes())[0]
    answers = [True, False]

    class Flipping:
        def verify_leaf(self, cert: x509.Certificate) -> bool:
            return answers.pop(0)

    verified = _VerifiedCA(Flipping())  # type: ignore[arg-type]
    assert verified.verify_leaf(leaf) and verified.verify_leaf(leaf)  # remembered
    monkeypatch.setattr(_VerifiedCA, "RECHECK", 0.0)
    assert not verified.verify_leaf(leaf)  # checked again: the root retired
