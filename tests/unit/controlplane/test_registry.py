"""The indexed registry against oracles (issue 16: cost per change).

A random run of every kind of change, and after each step:
- the writer's incrementally kept endpoints equal a registry loaded from its rows;
- a follower fed only the change log equals the writer;
- a node that applies the feed's answers holds the writer's full slice;
- a change touches only what it changes: one workload added to a large service is
  one endpoint change, not the service document.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from meshnode.controlplane import registry as R
from meshnode.controlplane.feed import Feed
from meshnode.core.contracts import NodeSlice, SliceDelta

POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny", "namespace": "default"},
    "spec": {"action": "DENY", "rules": []},
}
NODES = ("node1", "node2", "node3")


def _step(reg: R.Registry, fn: Callable[[R.Registry], object]) -> list[R.Change]:
    return reg.run(reg.revision + 1, fn)[0]


def _wl(node: str, name: str, service: str, port: int = 8080, ns: str = "default"):
    return R.WorkloadRecord(node, name, ns, service, service or name, port)


def _loaded(reg: R.Registry) -> R.Registry:
    return R.Registry.load(
        reg.revision,
        reg.nodes.values(),
        reg.workloads.values(),
        reg.services.values(),
        reg.resources.values(),
        reg.revoked.values(),
    )


def _random_op(rng: random.Random, reg: R.Registry) -> Callable[[R.Registry], object]:
    op = rng.choice(["put", "put", "put", "delete", "node", "grant", "zone-grant", "policy"])
    node = rng.choice(NODES)
    name = f"w{rng.randrange(12)}"
    if op == "put":
        svc = rng.choice(["web", "api", "db", ""])
        return lambda r: r.put_workload(_wl(node, name, svc, port=8000 + rng.randrange(3)))
    if op == "delete" and (node, name) in reg.workloads:
        return lambda r: r.delete_workload(node, name)
    if op == "node":
        ip = f"198.18.0.{rng.randrange(11, 20)}"
        zone = rng.choice(["z1", "z2", ""])
        return lambda r: r.put_node(R.NodeRecord(node, zone, ip))
    if op == "grant":
        idents = rng.choice([["default/*"], ["default/web"], []])
        return lambda r: r.set_token_grant(node, idents)
    if op == "zone-grant":
        doc = {
            "kind": "IdentityGrant",
            "metadata": {"name": "zone-z1"},
            "spec": {"zones": ["z1"], "identities": [rng.choice(["default/api", "default/*"])]},
        }
        if rng.random() < 0.3 and ("IdentityGrant", "default", "zone-z1") in reg.resources:
            return lambda r: r.delete_resource("IdentityGrant", "default", "zone-z1")
        return lambda r: r.apply_resources([doc])
    return lambda r: r.apply_resources([POLICY])


def test_random_changes_keep_writer_follower_and_nodes_equal() -> None:
    rng = random.Random(16)
    writer, follower = R.Registry(), R.Registry()
    boot = _step(
        writer, lambda r: [r.put_node(R.NodeRecord(n, "z1", "198.18.0.10")) for n in NODES]
    )
    follower.follow(boot, writer.revision)
    feed = Feed(floor=writer.revision, revision=writer.revision)
    # Each node holds a slice and applies the answers, asking at different paces.
    held = {n: NodeSlice.from_json(json.loads(writer.slice_json(n, 1, "td"))) for n in NODES}
    for step in range(400):
        changes = _step(writer, _random_op(rng, writer))
        feed.extend(changes, writer.revision)
        follower.follow(changes, writer.revision)
        rev = writer.revision
        # The incremental endpoints are what a load from the rows derives.
        assert writer.service_docs() == _loaded(writer).service_docs(), step
        assert follower.rows() == writer.rows(), step
        assert follower.service_docs() == writer.service_docs(), step
        for node in NODES:
            if rng.random() < 0.5:
                continue  # this node asks later, for several revisions at once
            answer = feed.answer(node, held[node].revision)
            if answer is None:  # full slice: take it
                held[node] = NodeSlice.from_json(json.loads(writer.slice_json(node, rev, "td")))
                continue
            doc = {"revision": rev, "full": False, "changes": [json.loads(b) for b in answer]}
            held[node] = held[node].apply(SliceDelta.from_json(doc))
            want = writer.slice_for(node, rev, "td")
            got = held[node]
            assert got.workloads == want.workloads or sorted(got.workloads, key=str) == sorted(
                want.workloads, key=str
            ), (step, node)
            assert sorted(got.services, key=lambda s: s.key) == list(want.services), (step, node)
            assert sorted(got.resources, key=str) == sorted(want.resources, key=str), (step, node)
        assert (
            json.loads(writer.slice_json("node1", rev, "td"))
            == writer.slice_for("node1", rev, "td").to_json()
        )


def test_one_workload_on_a_large_service_is_one_endpoint_change() -> None:
    reg = R.Registry()

    def fill(r: R.Registry) -> None:
        for i in range(200):
            r.put_node(R.NodeRecord(f"n{i}", "z1", f"10.0.{i // 250}.{i % 250 + 1}"))
            r.set_token_grant(f"n{i}", ["default/*"])
            r.put_workload(_wl(f"n{i}", "api", "api"))

    _step(reg, fill)
    changes = _step(reg, lambda r: r.put_workload(_wl("n7", "api-2", "api")))
    assert [(c.kind, c.op, c.key) for c in changes] == [
        ("workload", "put", "api-2"),
        ("endpoint", "put", "default/api/n7/api-2"),
    ]
    encoded = json.dumps(changes[1].wire())
    assert len(encoded) < 1024, encoded
    # A node moving changes its endpoints only; a grant withdrawn removes them.
    moved = _step(reg, lambda r: r.put_node(R.NodeRecord("n7", "z1", "10.9.9.9")))
    assert sorted(c.key for c in moved if c.kind == "endpoint") == [
        "default/api/n7/api",
        "default/api/n7/api-2",
    ]
    revoked = _step(reg, lambda r: r.set_token_grant("n8", []))
    assert [(c.kind, c.op, c.key) for c in revoked] == [
        ("endpoint", "delete", "default/api/n8/api"),
        ("grant", "delete", "IdentityGrant/default/token-n8"),
    ]
    assert all(not c.concerns("n8") for c in revoked if c.kind == "grant")


def test_register_workload_checks_grants_and_the_limit_by_index() -> None:
    reg = R.Registry()
    _step(reg, lambda r: r.put_node(R.NodeRecord("n1", "z1", "10.0.0.1")))
    with pytest.raises(R.RegistryError) as exc:
        _step(reg, lambda r: r.register_workload(_wl("n1", "web", "web")))
    assert exc.value.status == 403 and not reg.broken
    _step(
        reg,
        lambda r: r.apply_resources(
            [
                {
                    "kind": "IdentityGrant",
                    "metadata": {"name": "z1-web"},
                    "spec": {"zones": ["z1"], "identities": ["default/web"]},
                }
            ]
        ),
    )
    _step(reg, lambda r: r.register_workload(_wl("n1", "web", "web"), limit=2))
    _step(reg, lambda r: r.register_workload(_wl("n1", "web2", "web"), limit=2))
    _step(reg, lambda r: r.register_workload(_wl("n1", "web2", "web"), limit=2))  # an update
    with pytest.raises(R.RegistryError) as exc:
        _step(reg, lambda r: r.register_workload(_wl("n1", "web3", "web"), limit=2))
    assert exc.value.status == 429


def test_feed_answers_are_shared_between_nodes() -> None:
    reg = R.Registry()
    _step(reg, lambda r: [r.put_node(R.NodeRecord(n, "", "10.0.0.1")) for n in NODES])
    _step(reg, lambda r: [r.set_token_grant(n, ["default/*"]) for n in NODES])
    feed = Feed(floor=reg.revision, revision=reg.revision)
    feed.extend(_step(reg, lambda r: r.put_workload(_wl("node1", "web", "web"))), reg.revision)
    a, b = feed.answer("node2", reg.revision - 1), feed.answer("node3", reg.revision - 1)
    assert a is not None and b is not None and a == b and a[0] is b[0]  # the same bytes
    mine = feed.answer("node1", reg.revision - 1)
    assert mine is not None and len(mine) == 2  # its own workload, and the service


def test_namespace_views_follow_their_nodes_workloads() -> None:
    """--node-view namespace: a node holds only its namespaces' services (and the
    shared ones); applying the feed's answers for its view keeps it equal to the
    full slice of that view, as workloads come, go and change namespace."""
    rng = random.Random(1616)
    shared = frozenset({"infra"})
    reg = R.Registry()

    def boot(r: R.Registry) -> None:
        for n in NODES:
            r.put_node(R.NodeRecord(n, "z1", "198.18.0.10"))
            r.set_token_grant(n, ["default/*", "other/*", "infra/*"])

    _step(reg, boot)
    feed = Feed(floor=reg.revision, revision=reg.revision)

    def view(node: str) -> frozenset[str]:
        return reg.view(node, shared)

    held = {
        n: NodeSlice.from_json(json.loads(reg.slice_json(n, reg.revision, "td", None, view(n))))
        for n in NODES
    }
    fulls = 0
    for step in range(300):
        node = rng.choice(NODES)
        name = f"w{rng.randrange(6)}"
        ns = rng.choice(["default", "other", "infra"])
        if rng.random() < 0.3 and (node, name) in reg.workloads:
            wl = reg.workloads[(node, name)]
            changes = _step(reg, lambda r, w=wl: r.delete_workload(w.node, w.name))
        else:
            wl = _wl(node, name, rng.choice(["web", "api"]), ns=ns)
            changes = _step(reg, lambda r, w=wl: r.put_workload(w))
        feed.extend(changes, reg.revision)
        rev = reg.revision
        for n in NODES:
            v = view(n)
            answer = feed.answer(
                n, held[n].revision, view=v, view_changed=reg.view_changed.get(n, 0)
            )
            if answer is None:
                fulls += 1
                held[n] = NodeSlice.from_json(json.loads(reg.slice_json(n, rev, "td", None, v)))
            else:
                doc = {"revision": rev, "full": False, "changes": [json.loads(b) for b in answer]}
                held[n] = held[n].apply(SliceDelta.from_json(doc))
            want = reg.slice_for(n, rev, "td", view=v)
            assert sorted(held[n].services, key=lambda s: s.key) == list(want.services), (step, n)
            assert all(s.namespace in v for s in held[n].services)
    # A view changes only when a namespace comes or goes, not with every change.
    assert 0 < fulls < 300


def test_an_update_in_place_does_not_change_a_view() -> None:
    reg = R.Registry()
    _step(reg, lambda r: r.put_node(R.NodeRecord("n1", "", "10.0.0.1")))
    _step(reg, lambda r: r.put_workload(_wl("n1", "web", "web")))
    changed = reg.view_changed["n1"]
    _step(reg, lambda r: r.put_workload(_wl("n1", "web", "web", port=9090)))
    assert reg.view_changed["n1"] == changed
    _step(reg, lambda r: r.put_workload(_wl("n1", "web", "web", ns="other")))
    assert reg.view_changed["n1"] == reg.revision
    assert reg.view("n1", ["infra"]) == {"other", "infra"}
