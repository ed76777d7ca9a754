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
        # The replica follows the store's change log on its own schedule: wait
        # until it serves the filled mesh, so the attack below is what is timed.
        deadline = time.monotonic() + 30
        while len(server.admin().call("GET", "/v1/admin/services")["items"]) < 10:
            assert time.monotonic() < deadline, "the replica never caught up with the store"
            time.sleep(0.1)
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


def _stream(
    client: NodeClient, since: int, until: Any, beat: int = 1, limit: float = 20.0
) -> list[dict[str, Any]]:
    """Stream from `since`, collecting answers until `until(answers)` is true, the
    stream ends, or `limit` seconds (heartbeats every `beat` s keep it checking)."""
    import time

    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + limit

    def on_line(raw: bytes) -> bool:
        answers.append(json.loads(raw))
        return not until(answers) and time.monotonic() < deadline

    client.stream(
        f"/v1/node/config?since={since}&wait={beat}&endpoints=1&stream=1", on_line, idle=beat + 5
    )
    return answers


def test_a_streamed_watch_sends_each_change_as_a_line_on_one_connection(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    import threading
    import time

    n1, n2 = _node(cp, tmp_path, "node1"), _node(cp, tmp_path, "node2")
    c1, c2 = _client(cp, n1), _client(cp, n2)
    _register(c2, "api-1")
    held = NodeSlice.from_json(c1.request("GET", "/v1/node/config"))
    admitted: list[str] = []
    real_admit = cp.cp.limits.admit
    cp.cp.limits.admit = lambda peer: admitted.append(peer) or real_admit(peer)  # type: ignore[method-assign]

    def writer() -> None:
        time.sleep(1.5)  # after a heartbeat or two
        for i in range(2, 5):
            _register(c2, f"api-{i}")
            time.sleep(0.2)

    threading.Thread(target=writer, daemon=True).start()
    started = time.monotonic()
    answers = _stream(
        c1,
        held.revision,
        lambda a: sum(len(x.get("changes", [])) for x in a) >= 3,
    )
    changes = [c for a in answers for c in a.get("changes", [])]
    assert [(c["kind"], c["key"]) for c in changes] == [
        ("endpoint", f"default/api/node2/api-{i}") for i in range(2, 5)
    ]
    # It opened with "unchanged" at once and kept beating while nothing happened.
    assert answers[0] == {"revision": held.revision, "unchanged": True}
    assert sum(1 for a in answers if a.get("unchanged")) >= 2
    assert time.monotonic() - started < 15
    # One connection for the stream, plus one for each registration (fresh ones).
    assert len(admitted) == 1 + 3
    for a in answers:
        if not a.get("unchanged"):
            held = held.apply(SliceDelta.from_json(a))
    assert [e.workload for e in held.services[0].endpoints] == [f"api-{i}" for i in range(1, 5)]
    c1.close()


def test_a_deleted_nodes_stream_ends_and_it_is_refused(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    """Attack: a node the operator deleted (stolen, decommissioned) holds its watch
    stream open to go on learning the mesh's services and policies. The stream
    ends at the delete, and asking again is refused."""
    import threading
    import time

    from meshnode.core.cpclient import ClientError

    n1 = _node(cp, tmp_path, "node1")
    c1 = _client(cp, n1)
    rev = c1.request("GET", "/v1/node/config")["revision"]

    def delete() -> None:
        time.sleep(1.0)
        status, _ = cp.admin().request("DELETE", "/v1/admin/nodes/node1")
        assert status == 200

    threading.Thread(target=delete, daemon=True).start()
    started = time.monotonic()
    answers = _stream(c1, rev, lambda a: False, beat=30)
    assert time.monotonic() - started < 10, "the stream outlived the node's deletion"
    assert all(a.get("unchanged") for a in answers)  # nothing of the delete's revision
    with pytest.raises(ClientError) as refused:
        _stream(c1, rev, lambda a: False)
    assert refused.value.status == 403
    c1.close()


def test_a_stream_ends_cleanly_when_the_control_plane_stops(tmp_path: Path) -> None:
    import threading
    import time

    server = _start(tmp_path)
    c1 = _client(server, _node(server, tmp_path, "node1"))
    rev = c1.request("GET", "/v1/node/config")["revision"]
    threading.Timer(1.0, server.stop).start()
    started = time.monotonic()
    answers = _stream(c1, rev, lambda a: False, beat=30)
    assert time.monotonic() - started < 10
    assert answers and answers[0]["unchanged"]
    c1.close()


def test_a_stream_ends_when_the_nodes_certificate_stops_passing(
    cp: ThreadedControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: a node holds its stream open past its certificate's expiry (or the
    retirement of the root that signed it), where a new request would be refused.
    The stream checks the certificate again every heartbeat and ends."""
    import time

    from meshnode.controlplane.api.app import _VerifiedCA

    c1 = _client(cp, _node(cp, tmp_path, "node1"))
    rev = c1.request("GET", "/v1/node/config")["revision"]
    real = _VerifiedCA.verify_leaf
    passing = {"ok": True}
    monkeypatch.setattr(
        _VerifiedCA, "verify_leaf", lambda self, leaf: passing["ok"] and real(self, leaf)
    )

    def expire(answers: list[dict[str, Any]]) -> bool:
        passing["ok"] = False  # from the first line on, the certificate "expired"
        return False

    started = time.monotonic()
    answers = _stream(c1, rev, expire, beat=1)
    assert time.monotonic() - started < 5, "the stream outlived the node's certificate"
    assert len(answers) <= 3
    c1.close()


def test_after_a_restart_a_namespace_view_node_catches_up_with_changes(tmp_path: Path) -> None:
    """A restarted control plane knows each node's view but not when it changed.
    It must not send every node a full slice for that (10,000 of them at once
    after a restart); only a node whose workloads changed after its revision."""
    cp = _start(tmp_path, node_view="namespace")
    try:
        n1, n2 = _node(cp, tmp_path, "node1"), _node(cp, tmp_path, "node2")
        c1, c2 = _client(cp, n1), _client(cp, n2)
        _register(c1, "web", service="web")
        _register(c2, "api")
        rev1 = c1.request("GET", "/v1/node/config")["revision"]
        _register(c2, "db", ns="other", service="db")  # node2's view grows after rev1
    finally:
        cp.stop()
    cp = ThreadedControlPlane(open_store(f"sqlite://{tmp_path}/cp.db"), tmp_path / "data").start()
    try:
        cp.cp.config.node_view = "namespace"
        c1, c2 = _client(cp, n1), _client(cp, n2)  # its new port
        _register(c2, "api-2")
        doc = c1.request("GET", f"/v1/node/config?since={rev1}&endpoints=1")
        assert doc["full"] is False
        assert [c["key"] for c in doc["changes"]] == ["default/api/node2/api-2"]
        # node2's view changed after rev1, before the restart: only the log says so.
        assert c2.request("GET", f"/v1/node/config?since={rev1}&endpoints=1")["full"] is True
    finally:
        cp.stop()


def _watcher(cp: ThreadedControlPlane, node: EnrolledNode, tmp_path: Path) -> Any:
    """The agent's own watcher (nodeagent/enrolled.py) for `node`, on its files."""
    import shutil

    from meshnode.nodeagent.enrolled import CpClient, CpWatcher, Enrollment, SliceStore

    conf = tmp_path / f"{node.name}-etc"
    conf.mkdir()
    shutil.copy(node.cert_path, conf / "node.pem")
    shutil.copy(node.key_path, conf / "node-key.pem")
    (conf / "bundle.pem").write_bytes(node.bundle)
    e = Enrollment(node.name, "z1", "", "cluster.local", (cp.url,), "/", tmp_path, conf)
    changes: list[int] = []
    store = SliceStore(tmp_path / f"{node.name}-slice.json")
    watcher = CpWatcher(CpClient(e), store, lambda: changes.append(store.revision))
    watcher.changes = changes  # type: ignore[attr-defined]
    return watcher


def test_the_agents_watcher_streams_changes_and_backs_off_when_refused(
    cp: ThreadedControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's CpWatcher end to end: a full slice, then each change as a line
    of its stream, saved and handed on; a node deleted under it is refused (403),
    and the watcher says so and backs off instead of asking in a loop."""
    import time

    import meshnode.nodeagent.enrolled as enrolled

    monkeypatch.setattr(enrolled, "WATCH_BEAT", 1.0)
    n1, n2 = _node(cp, tmp_path, "node1"), _node(cp, tmp_path, "node2")
    watcher = _watcher(cp, n1, tmp_path)
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while not watcher.changes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.changes, "no full slice"
        _register(_client(cp, n2), "api-1")
        while time.monotonic() < deadline:
            slice_ = watcher.store.slice
            if slice_ is not None and slice_.services and slice_.services[0].endpoints:
                break
            time.sleep(0.05)
        assert [e.workload for e in watcher.store.slice.services[0].endpoints] == ["api-1"]
        assert json.loads((tmp_path / "node1-slice.json").read_text())["revision"] > 0
        assert watcher.reachable is True
        admitted: list[str] = []
        real_admit = cp.cp.limits.admit
        cp.cp.limits.admit = lambda peer: admitted.append(peer) or real_admit(peer)  # type: ignore[method-assign]
        cp.admin().request("DELETE", "/v1/admin/nodes/node1")
        while watcher.reachable is not False and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert watcher.reachable is False and "not registered" in watcher.last_error
        asked = len(admitted)
        time.sleep(2.0)
        assert len(admitted) - asked <= 2, "the refused watcher asked again in a loop"
    finally:
        watcher.stop.set()
        watcher.join(15)
    assert not watcher.is_alive()
