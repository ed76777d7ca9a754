"""Multi-zone state in the registry (controlplane/registry.py, docs/multizone.md).

A zone control plane takes the other zones' states from the global (RemoteZone
rows): a service only another zone runs gets a VIP here and a document with no
endpoints and the remote entries; a service with local endpoints gains them; both
reach nodes as whole service documents, never as internal rows. A follower fed
only the change log, and a registry loaded from the rows, agree with the writer.
The global keeps each enrolled zone's last state (Zone rows) and gives other
zones only the services whose identity a grant gives the zone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from meshnode.controlplane import registry as R
from meshnode.controlplane.feed import Feed
from meshnode.core.contracts import (
    EndpointDoc,
    NodeSlice,
    ServiceDoc,
    ServicePort,
    SliceDelta,
)
from meshnode.core.contracts.documents import RemoteZoneDoc
from meshnode.core.contracts.zone import ZoneService, ZoneState

ZONE = "zone-a"
B_IP, B_PORT = "203.0.113.2", 15443
C_IP, C_PORT = "198.51.100.3", 15443
POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny", "namespace": "default"},
    "spec": {"action": "DENY", "rules": []},
}
POLICY2 = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny", "namespace": "default"},
    "spec": {"action": "ALLOW", "rules": []},
}
LOCAL_POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "zone-own", "namespace": "default"},
    "spec": {"action": "ALLOW", "rules": []},
}
INTERNAL = {R.ZONE_KIND, R.REMOTE_ZONE_KIND, R.ZONE_SYNC_KIND}


def _grant(
    name: str, identities: Sequence[str], zones: Sequence[str] = (), nodes: Sequence[str] = ()
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if nodes:
        spec["nodes"] = list(nodes)
    if zones:
        spec["zones"] = list(zones)
    spec["identities"] = list(identities)
    return {"kind": "IdentityGrant", "metadata": {"name": name}, "spec": spec}


def _step(reg: R.Registry, fn: Callable[[R.Registry], object]) -> list[R.Change]:
    return reg.run(reg.revision + 1, fn)[0]


def _wl(
    node: str, name: str, service: str, port: int = 8080, ns: str = "default", account: str = ""
) -> R.WorkloadRecord:
    return R.WorkloadRecord(node, name, ns, service, account or service or name, port)


def _svc(
    name: str, port: int = 80, account: str = "", endpoints: int = 1, ns: str = "default"
) -> ZoneService:
    return ZoneService(ns, name, port, account or name, endpoints)


def _b(generation: int, *services: ZoneService) -> ZoneState:
    return ZoneState(
        "zone-b", generation, B_IP, B_PORT, tuple(sorted(services, key=lambda s: s.key))
    )


def _c(generation: int, *services: ZoneService) -> ZoneState:
    return ZoneState(
        "zone-c", generation, C_IP, C_PORT, tuple(sorted(services, key=lambda s: s.key))
    )


def _entry(state: ZoneState, name: str, ns: str = "default") -> RemoteZoneDoc:
    return state.remote_entries()[(ns, name)]


def _loaded(reg: R.Registry) -> R.Registry:
    return R.Registry.load(
        reg.revision,
        reg.nodes.values(),
        reg.workloads.values(),
        reg.services.values(),
        reg.resources.values(),
        reg.revoked.values(),
    )


def _summary(changes: Sequence[R.Change]) -> list[tuple[str, str, str]]:
    return [(c.kind, c.op, c.key) for c in changes]


def _zone_registry() -> R.Registry:
    """Zone zone-a: node n1 (granted default/*) runs web (VIP 240.0.0.1, port 8080)."""
    reg = R.Registry()

    def boot(r: R.Registry) -> None:
        r.put_node(R.NodeRecord("n1", ZONE, "10.0.0.1"))
        r.set_token_grant("n1", ["default/*"])
        r.put_workload(_wl("n1", "web", "web"))

    _step(reg, boot)
    assert reg.services[("default", "web")].vip == "240.0.0.1"
    return reg


def _web_endpoint(name: str = "web", node: str = "n1", ip: str = "10.0.0.1") -> EndpointDoc:
    return EndpointDoc(
        workload=name,
        namespace="default",
        service_account="web",
        node=node,
        node_ip=ip,
        address=ip,
        zone=ZONE,
        port=8080,
        service_port=8080,
    )


def _assert_no_internal_reaches_a_node(changes: Sequence[R.Change], node: str) -> None:
    for c in changes:
        if c.kind == "zone":
            assert c.nodes == (), c
            assert c.key.split("/", 1)[0] in INTERNAL, c
        if c.concerns(node):
            assert c.kind in R.NODE_KINDS, c
            text = json.dumps(c.wire())
            for kind in INTERNAL:
                assert f'"{kind}"' not in text and f"{kind}/" not in text, c


# --- a zone taking other zones ------------------------------------------------------


def test_a_service_only_another_zone_runs_gets_a_vip_and_the_remote_entry() -> None:
    reg = _zone_registry()
    feed = Feed(floor=reg.revision, revision=reg.revision)
    before = reg.revision
    state = _b(5, _svc("api", port=80, endpoints=2), _svc("web", port=8080))
    changes = _step(reg, lambda r: r.set_remote_zones([state], {"revision": 1}))
    feed.extend(changes, reg.revision)

    api, web = ("default", "api"), ("default", "web")
    assert reg.services[api] == R.ServiceRecord("default", "api", "240.0.0.2", 80)
    assert reg.services[web] == R.ServiceRecord("default", "web", "240.0.0.1", 8080)
    assert reg.service_doc(api) == ServiceDoc(
        name="api",
        namespace="default",
        vip="240.0.0.2",
        ports=(ServicePort(80, 80),),
        endpoints=(),
        remote=(
            RemoteZoneDoc(
                zone="zone-b",
                ingress_ip=B_IP,
                ingress_port=B_PORT,
                namespace="default",
                service_account="api",
                port=80,
                endpoints=2,
            ),
        ),
    )
    assert reg.service_doc(web).endpoints == (_web_endpoint(),)
    assert reg.service_doc(web).remote == (_entry(state, "web"),)

    # Whole documents for both services; the internal rows concern no node.
    assert _summary(changes) == [
        ("service", "put", "default/api"),
        ("service", "put", "default/web"),
        ("zone", "put", "RemoteZone/default/zone-b"),
        ("zone", "put", "ZoneSync/default/global"),
    ]
    assert changes[0].value == reg.service_doc(api).to_json()
    assert changes[1].value == reg.service_doc(web).to_json()
    assert changes[0].nodes is None and changes[1].nodes is None
    assert changes[2].value == R.internal_doc(R.REMOTE_ZONE_KIND, "zone-b", state.to_json())
    _assert_no_internal_reaches_a_node(changes, "n1")
    answer = feed.answer("n1", before)
    assert answer is not None
    got = [json.loads(b) for b in answer]
    assert [(c["kind"], c["op"], c["key"]) for c in got] == [
        ("service", "put", "default/api"),
        ("service", "put", "default/web"),
    ]
    assert got[0]["value"]["remote"] == [_entry(state, "api").to_json()]

    assert reg.internal(R.REMOTE_ZONE_KIND) == {"zone-b": state.to_json()}
    assert reg.internal(R.ZONE_SYNC_KIND) == {"global": {"revision": 1}}
    assert R.REMOTE_ZONE_KIND in R.INTERNAL_KINDS and R.ZONE_SYNC_KIND in R.INTERNAL_KINDS


def test_the_same_states_again_change_nothing() -> None:
    reg = _zone_registry()
    state = _b(5, _svc("api"))
    _step(reg, lambda r: r.set_remote_zones([state], {"revision": 1}))
    rows = reg.rows()
    assert _step(reg, lambda r: r.set_remote_zones([state], {"revision": 1})) == []
    assert reg.rows() == rows
    # Only the sync row changes when only it differs.
    changes = _step(reg, lambda r: r.set_remote_zones([state], {"revision": 2}))
    assert _summary(changes) == [("zone", "put", "ZoneSync/default/global")]
    assert changes[0].nodes == ()


def test_a_remote_only_service_goes_with_its_zone_and_frees_its_vip() -> None:
    reg = _zone_registry()
    state = _b(5, _svc("api"), _svc("web", port=8080))
    _step(reg, lambda r: r.set_remote_zones([state], {"revision": 1}))
    assert reg.services[("default", "api")].vip == "240.0.0.2"

    changes = _step(reg, lambda r: r.set_remote_zones([], {"revision": 1}))
    assert _summary(changes) == [
        ("service", "delete", "default/api"),
        ("service", "put", "default/web"),
        ("zone", "delete", "RemoteZone/default/zone-b"),
    ]
    _assert_no_internal_reaches_a_node(changes, "n1")
    assert ("default", "api") not in reg.services
    # web still has its local workload: it stays, with its VIP and without the entry.
    assert reg.services[("default", "web")].vip == "240.0.0.1"
    assert reg.service_doc(("default", "web")).remote == ()
    assert reg.service_doc(("default", "web")).endpoints == (_web_endpoint(),)
    assert changes[1].value == reg.service_doc(("default", "web")).to_json()
    assert reg.internal(R.REMOTE_ZONE_KIND) == {}

    # The VIP is free again: the next new service gets it.
    _step(reg, lambda r: r.put_workload(_wl("n1", "db", "db", port=5432)))
    assert reg.services[("default", "db")].vip == "240.0.0.2"


def test_a_service_a_zone_stops_running_goes_though_the_zone_stays() -> None:
    reg = _zone_registry()
    _step(reg, lambda r: r.set_remote_zones([_b(5, _svc("api"), _svc("db"))], {}))
    assert reg.services[("default", "db")].vip == "240.0.0.3"
    changes = _step(reg, lambda r: r.set_remote_zones([_b(6, _svc("api"))], {}))
    assert ("service", "delete", "default/db") in _summary(changes)
    assert ("zone", "put", "RemoteZone/default/zone-b") in _summary(changes)
    assert not [c for c in changes if c.op == "delete" and c.key == "default/api"]
    assert sorted(reg.services) == [("default", "api"), ("default", "web")]
    assert reg.service_doc(("default", "api")).remote == (_entry(_b(6, _svc("api")), "api"),)


def test_a_zone_change_sends_only_the_services_whose_entries_changed() -> None:
    """_Txn.remote is "services whose remote entries changed", and the registry
    derives the log "from what really changed": one service of a zone changing
    (or only its generation) must not send every node the whole document of every
    service that zone runs."""
    reg = _zone_registry()
    api, db, web = _svc("api", endpoints=2), _svc("db", port=5432), _svc("web", port=8080)
    _step(reg, lambda r: r.set_remote_zones([_b(5, api, db, web)], {}))
    more = _svc("db", port=5432, endpoints=4)
    changes = _step(reg, lambda r: r.set_remote_zones([_b(6, api, more, web)], {}))
    assert _summary(changes) == [
        ("service", "put", "default/db"),
        ("zone", "put", "RemoteZone/default/zone-b"),
    ]
    # Only the generation: no node needs anything.
    changes = _step(reg, lambda r: r.set_remote_zones([_b(7, api, more, web)], {}))
    assert _summary(changes) == [("zone", "put", "RemoteZone/default/zone-b")]


def test_a_zone_without_ingress_gives_no_entries() -> None:
    reg = _zone_registry()
    _step(reg, lambda r: r.set_remote_zones([_b(5, _svc("api"))], {}))
    closed = ZoneState("zone-b", 6, "", 0, (_svc("api"),))
    changes = _step(reg, lambda r: r.set_remote_zones([closed], {}))
    assert _summary(changes) == [
        ("service", "delete", "default/api"),
        ("zone", "put", "RemoteZone/default/zone-b"),
    ]
    assert reg.internal(R.REMOTE_ZONE_KIND) == {"zone-b": closed.to_json()}


def test_two_remote_zones_for_one_service() -> None:
    reg = _zone_registry()
    b = _b(5, _svc("api", port=80, endpoints=2))
    c = _c(9, _svc("api", port=81, account="api-c", endpoints=4))
    _step(reg, lambda r: r.set_remote_zones([c, b], {}))  # in any order
    api = ("default", "api")
    # The service port is the first zone's (by name): zone-b's.
    assert reg.services[api] == R.ServiceRecord("default", "api", "240.0.0.2", 80)
    assert reg.service_doc(api).remote == (_entry(b, "api"), _entry(c, "api"))
    assert [e.zone for e in reg.service_doc(api).remote] == ["zone-b", "zone-c"]
    assert reg.service_doc(api).remote[1].service_account == "api-c"

    changes = _step(reg, lambda r: r.set_remote_zones([c], {}))
    assert _summary(changes) == [
        ("service", "put", "default/api"),
        ("zone", "delete", "RemoteZone/default/zone-b"),
    ]
    assert reg.services[api].vip == "240.0.0.2"
    assert reg.service_doc(api).remote == (_entry(c, "api"),)
    assert changes[0].value == reg.service_doc(api).to_json()

    changes = _step(reg, lambda r: r.set_remote_zones([], {}))
    assert ("service", "delete", "default/api") in _summary(changes)
    assert api not in reg.services

    # zone-c first, zone-b later: the entries are still in zone order.
    _step(reg, lambda r: r.set_remote_zones([c], {}))
    _step(reg, lambda r: r.set_remote_zones([c, b], {}))
    assert reg.service_doc(api).remote == (_entry(b, "api"), _entry(c, "api"))
    assert reg.services[api].port == 81  # made when only zone-c ran it


def test_a_service_with_local_workloads_outlives_its_remote_zone_and_vice_versa() -> None:
    reg = _zone_registry()
    web = ("default", "web")
    _step(reg, lambda r: r.set_remote_zones([_b(5, _svc("web", port=8080))], {}))
    # The local workload goes: the remote zone still runs web, so it stays.
    changes = _step(reg, lambda r: r.delete_workload("n1", "web"))
    assert _summary(changes) == [
        ("workload", "delete", "web"),
        ("endpoint", "delete", "default/web/n1/web"),
    ]
    assert reg.services[web].vip == "240.0.0.1"
    assert reg.service_doc(web).endpoints == ()
    assert len(reg.service_doc(web).remote) == 1
    # Deleting the node of a workload of it keeps it too.
    _step(reg, lambda r: r.put_workload(_wl("n1", "web", "web")))
    _step(reg, lambda r: r.delete_node("n1"))
    assert web in reg.services and reg.service_doc(web).endpoints == ()


# --- followers and loads ------------------------------------------------------------


def test_a_follower_and_a_load_agree_with_the_writer_over_a_zone_sequence() -> None:
    writer = R.Registry()

    def boot(r: R.Registry) -> None:
        r.put_node(R.NodeRecord("n1", ZONE, "10.0.0.1"))
        r.put_node(R.NodeRecord("n2", ZONE, "10.0.0.2"))
        r.set_token_grant("n1", ["default/*"])
        r.set_token_grant("n2", ["default/*"])
        r.put_workload(_wl("n2", "web", "web"))

    boot_changes = _step(writer, boot)
    loaded_follower = _loaded(writer)  # a replica started from the store
    empty_follower = R.Registry()  # a replica that followed the log from the start
    empty_follower.follow(boot_changes, writer.revision)
    feed = Feed(floor=writer.revision, revision=writer.revision)
    held = NodeSlice.from_json(json.loads(writer.slice_json("n2", writer.revision, "td")))
    api = ("default", "api")

    b5 = _b(5, _svc("api", endpoints=2), _svc("db", port=5432))
    b6 = _b(6, _svc("api", endpoints=3), _svc("db", port=5432))
    steps: list[tuple[str, Callable[[R.Registry], object]]] = [
        ("local workload", lambda r: r.put_workload(_wl("n1", "api", "api", port=80))),
        ("remote zone added", lambda r: r.set_remote_zones([b5], {"revision": 5})),
        ("remote zone changed", lambda r: r.set_remote_zones([b6], {"revision": 6})),
        ("local workload removed", lambda r: r.delete_workload("n1", "api")),
        ("remote zone removed", lambda r: r.set_remote_zones([], {"revision": 7})),
    ]
    logs = {}
    for name, fn in steps:
        changes = _step(writer, fn)
        logs[name] = changes
        loaded_follower.follow(changes, writer.revision)
        empty_follower.follow(changes, writer.revision)
        feed.extend(changes, writer.revision)
        for follower in (loaded_follower, empty_follower):
            assert follower.rows() == writer.rows(), name
            assert follower.service_docs() == writer.service_docs(), name
            assert follower.internal(R.REMOTE_ZONE_KIND) == writer.internal(R.REMOTE_ZONE_KIND)
        loaded = _loaded(writer)
        assert loaded.rows() == writer.rows(), name
        assert loaded.service_docs() == writer.service_docs(), name
        # A node applying the feed's answers holds the writer's services.
        answer = feed.answer("n2", held.revision)
        assert answer is not None, name
        delta = {
            "revision": writer.revision,
            "full": False,
            "changes": [json.loads(b) for b in answer],
        }
        held = held.apply(SliceDelta.from_json(delta))
        want = writer.slice_for("n2", writer.revision, "td")
        assert sorted(held.services, key=lambda s: s.key) == list(want.services), name
        _assert_no_internal_reaches_a_node(changes, "n2")

        if name == "remote zone added":
            assert writer.service_doc(api).remote == (_entry(b5, "api"),)
            assert writer.services[("default", "db")].vip == "240.0.0.3"
            assert len(writer.service_doc(api).endpoints) == 1
        if name == "remote zone changed":
            assert writer.service_doc(api).remote[0].endpoints == 3
            assert follower.service_doc(api).remote[0].endpoints == 3
        if name == "local workload removed":
            assert writer.service_doc(api).endpoints == ()
            assert writer.service_doc(api).remote == (_entry(b6, "api"),)
        if name == "remote zone removed":
            assert sorted(writer.services) == [("default", "web")]

    changed = _summary(logs["remote zone changed"])
    assert changed[0] == ("service", "put", "default/api")
    assert changed[-2:] == [
        ("zone", "put", "RemoteZone/default/zone-b"),
        ("zone", "put", "ZoneSync/default/global"),
    ]
    assert not [c for c in changed if c[1] == "delete"]
    assert _summary(logs["remote zone removed"]) == [
        ("service", "delete", "default/api"),
        ("service", "delete", "default/db"),
        ("zone", "delete", "RemoteZone/default/zone-b"),
        ("zone", "put", "ZoneSync/default/global"),
    ]


def test_a_follower_from_nothing_takes_the_remote_entries() -> None:
    writer, follower = R.Registry(), R.Registry()

    def boot(r: R.Registry) -> None:
        r.put_node(R.NodeRecord("n1", ZONE, "10.0.0.1"))
        r.set_token_grant("n1", ["default/*"])

    follower.follow(_step(writer, boot), writer.revision)
    state = _b(5, _svc("api"))
    follower.follow(_step(writer, lambda r: r.set_remote_zones([state], {})), writer.revision)
    assert follower.rows() == writer.rows()
    assert follower.service_doc(("default", "api")).remote == (_entry(state, "api"),)
    # The follower's own index prunes like the writer's when it goes on writing.
    follower.run(follower.revision + 1, lambda r: r.set_remote_zones([], {}))
    assert follower.services == {}


def test_load_reproduces_the_remote_entries_and_their_index() -> None:
    reg = _zone_registry()
    b, c = _b(5, _svc("api"), _svc("web", port=8080)), _c(2, _svc("api", endpoints=3))
    _step(reg, lambda r: r.set_remote_zones([b, c], {"revision": 3}))
    loaded = _loaded(reg)
    assert loaded.rows() == reg.rows()
    assert loaded.service_docs() == reg.service_docs()
    assert loaded.service_doc(("default", "api")).remote == (_entry(b, "api"), _entry(c, "api"))
    assert loaded.service_doc(("default", "web")).remote == (_entry(b, "web"),)
    assert loaded.internal(R.ZONE_SYNC_KIND) == {"global": {"revision": 3}}
    assert loaded.slice_json("n1", 9, "td") == reg.slice_json("n1", 9, "td")
    # What the loaded registry derived is what pruning needs: zone-b going leaves
    # api (zone-c runs it) and web (a local workload), and frees nothing.
    changes = _step(loaded, lambda r: r.set_remote_zones([c], {"revision": 3}))
    assert _summary(changes) == [
        ("service", "put", "default/api"),
        ("service", "put", "default/web"),
        ("zone", "delete", "RemoteZone/default/zone-b"),
    ]
    _step(loaded, lambda r: r.set_remote_zones([], {"revision": 3}))
    assert sorted(loaded.services) == [("default", "web")]


# --- the global's configuration -----------------------------------------------------


def test_apply_global_replaces_resources_but_keeps_the_zones_token_grants() -> None:
    reg = _zone_registry()
    _step(reg, lambda r: r.set_token_grant("n2", ["other/*"]))
    _step(reg, lambda r: r.apply_resources([LOCAL_POLICY]))
    zone_grant = _grant("zone-a-db", ["default/db"], zones=[ZONE])
    b = _b(5, _svc("api"))
    changes = _step(reg, lambda r: r.apply_global([POLICY, zone_grant], [b], {"revision": 1}))
    token_n1 = ("IdentityGrant", "default", "token-n1")
    token_n2 = ("IdentityGrant", "default", "token-n2")
    assert sorted(reg.resources) == [
        ("AuthorizationPolicy", "default", "deny"),
        ("IdentityGrant", "default", "token-n1"),
        ("IdentityGrant", "default", "token-n2"),
        ("IdentityGrant", "default", "zone-a-db"),
        ("RemoteZone", "default", "zone-b"),
        ("ZoneSync", "default", "global"),
    ]
    assert ("resource", "delete", "AuthorizationPolicy/default/zone-own") in _summary(changes)
    assert reg.resources[("AuthorizationPolicy", "default", "deny")] == POLICY
    assert reg.service_doc(("default", "api")).remote == (_entry(b, "api"),)
    _assert_no_internal_reaches_a_node(changes, "n1")
    tokens = (reg.resources[token_n1], reg.resources[token_n2])

    # The next configuration: the policy changed, the grant and zone-b gone.
    changes = _step(reg, lambda r: r.apply_global([POLICY2], [], {"revision": 2}))
    assert sorted(reg.resources) == [
        ("AuthorizationPolicy", "default", "deny"),
        token_n1,
        token_n2,
        ("ZoneSync", "default", "global"),
    ]
    assert (reg.resources[token_n1], reg.resources[token_n2]) == tokens
    assert reg.resources[("AuthorizationPolicy", "default", "deny")] == POLICY2
    assert _summary(changes) == [
        ("service", "delete", "default/api"),
        ("resource", "put", "AuthorizationPolicy/default/deny"),
        ("grant", "delete", "IdentityGrant/default/zone-a-db"),
        ("zone", "delete", "RemoteZone/default/zone-b"),
        ("zone", "put", "ZoneSync/default/global"),
    ]
    # Still the zone's own workload's endpoint: its token grant was kept.
    assert reg.service_doc(("default", "web")).endpoints == (_web_endpoint(),)


@pytest.mark.parametrize("kind", sorted(INTERNAL))
def test_apply_global_refuses_an_internal_row(kind: str) -> None:
    reg = _zone_registry()
    doc = R.internal_doc(kind, "zone-x", _b(1, _svc("api")).to_json())
    with pytest.raises(R.RegistryError) as info:
        _step(reg, lambda r: r.apply_global([doc], [], {}))
    assert str(info.value) == f"the global sent an internal row {kind}/default/zone-x"
    assert info.value.status == 400


def test_apply_global_refuses_an_internal_row_before_changing_anything() -> None:
    """The registry's mutations check before they change anything: a refused
    configuration leaves the registry usable and as it was, not broken half-way
    (which makes the store's writer load everything again)."""
    reg = _zone_registry()
    _step(reg, lambda r: r.apply_resources([LOCAL_POLICY]))
    rows = reg.rows()
    doc = R.internal_doc(R.REMOTE_ZONE_KIND, "zone-x", _b(1, _svc("api")).to_json())
    with pytest.raises(R.RegistryError):
        _step(reg, lambda r: r.apply_global([POLICY, doc], [], {}))
    assert not reg.broken
    assert reg.rows() == rows


# --- what nodes see -----------------------------------------------------------------


def test_slices_never_carry_internal_rows_and_json_equals_the_contract() -> None:
    reg = _zone_registry()
    b, c = _b(5, _svc("api"), _svc("web", port=8080)), _c(2, _svc("api", endpoints=3))
    grant = _grant("zone-a-all", ["default/*"], zones=[ZONE])
    _step(reg, lambda r: r.apply_global([POLICY, grant], [b, c], {"revision": 4}))
    assert {k[0] for k in reg.resources} == {
        "AuthorizationPolicy",
        "IdentityGrant",
        "RemoteZone",
        "ZoneSync",
    }
    for view in (None, frozenset({"default"})):
        full = reg.slice_for("n1", reg.revision, "td", view=view)
        assert [r.kind for r in full.resources] == ["AuthorizationPolicy"]
        raw = reg.slice_json("n1", reg.revision, "td", view=view)
        parsed = json.loads(raw)
        assert parsed == full.to_json()
        assert NodeSlice.from_json(parsed) == full
        assert [r["kind"] for r in parsed["resources"]] == ["AuthorizationPolicy"]
        for kind in INTERNAL:
            assert f'"kind":"{kind}"'.encode() not in raw
        services = {s["name"]: s for s in parsed["services"]}
        assert services["api"]["remote"] == [
            _entry(b, "api").to_json(),
            _entry(c, "api").to_json(),
        ]
        assert services["api"]["endpoints"] == []
        assert services["web"]["remote"] == [_entry(b, "web").to_json()]
        assert len(services["web"]["endpoints"]) == 1
    # A zone row at the global side is as invisible.
    _step(reg, lambda r: r.enroll_zone("zone-z", 1.0, "PEM"))
    assert b'"kind":"Zone"' not in reg.slice_json("n1", reg.revision, "td")
    assert [r.kind for r in reg.slice_for("n1", reg.revision, "td").resources] == [
        "AuthorizationPolicy"
    ]


@pytest.mark.parametrize("kind", sorted(INTERNAL))
def test_delete_resource_of_an_internal_kind_is_refused(kind: str) -> None:
    reg = _zone_registry()
    spec = _b(1).to_json()  # a RemoteZone row holds a ZoneState
    _step(reg, lambda r: r.put_internal(kind, "zone-b", spec))
    key = (kind, "default", "zone-b")
    assert reg.resources[key] == R.internal_doc(kind, "zone-b", spec)
    with pytest.raises(R.RegistryError) as info:
        _step(reg, lambda r: r.delete_resource(kind, "default", "zone-b"))
    assert info.value.status == 404
    assert str(info.value) == f"{kind} default/zone-b not found"
    assert not reg.broken and key in reg.resources
    assert reg.internal(kind) == {"zone-b": spec}
    # put_internal is the way; and it is idempotent.
    assert _step(reg, lambda r: r.put_internal(kind, "zone-b", dict(spec))) == []
    changes = _step(reg, lambda r: r.put_internal(kind, "zone-b", None))
    assert _summary(changes) == [("zone", "delete", f"{kind}/default/zone-b")]
    assert changes[0].nodes == ()
    assert reg.internal(kind) == {}


# --- what a zone publishes ----------------------------------------------------------


def test_zone_services_publishes_services_with_endpoints() -> None:
    reg = R.Registry()

    def boot(r: R.Registry) -> None:
        r.put_node(R.NodeRecord("n1", ZONE, "10.0.0.1"))
        r.put_node(R.NodeRecord("n2", ZONE, "10.0.0.2"))
        r.put_node(R.NodeRecord("n3", ZONE, "10.0.0.3"))
        r.set_token_grant("n1", ["default/*", "other/*"])
        r.set_token_grant("n2", ["default/*"])
        # api: created by api-1 (port 9000); accounts api-b, api-a, api-a, api-c.
        r.put_workload(_wl("n1", "api-1", "api", port=9000, account="api-b"))
        r.put_workload(_wl("n1", "api-2", "api", port=9001, account="api-a"))
        r.put_workload(_wl("n2", "api-3", "api", port=9001, account="api-a"))
        r.put_workload(_wl("n2", "api-4", "api", port=9001, account="api-c"))
        r.put_workload(_wl("n1", "db", "db", port=5432, ns="other"))
        r.put_workload(_wl("n2", "web", "web"))
        # n3 is granted nothing: its workload is no endpoint, its service not published.
        r.put_workload(_wl("n3", "hidden", "hidden", port=7000))
        r.put_workload(_wl("n1", "solo", ""))  # in no service

    _step(reg, boot)
    _step(reg, lambda r: r.set_remote_zones([_b(5, _svc("remote-only"), _svc("web"))], {}))
    assert ("default", "hidden") in reg.services and ("default", "remote-only") in reg.services
    assert reg.zone_services() == (
        ZoneService("default", "api", 9000, "api-a", 2),
        ZoneService("default", "web", 8080, "web", 1),
        ZoneService("other", "db", 5432, "db", 1),
    )
    # The grant withdrawn: n2's endpoints go, and api's least account is n1's api-a.
    _step(reg, lambda r: r.set_token_grant("n2", []))
    assert reg.zone_services() == (
        ZoneService("default", "api", 9000, "api-a", 1),
        ZoneService("other", "db", 5432, "db", 1),
    )
    _step(reg, lambda r: r.delete_workload("n1", "db"))
    assert [s.key for s in reg.zone_services()] == [("default", "api")]


# --- the global side ----------------------------------------------------------------


def test_enroll_zone_keeps_the_last_intermediates_and_the_state() -> None:
    reg = R.Registry()
    changes = _step(reg, lambda r: r.enroll_zone("zone-b", 10.0, "I1"))
    assert _summary(changes)[-1] == ("zone", "put", "Zone/default/zone-b")
    assert all(c.kind == "zone" and c.nodes == () for c in changes)
    assert reg.internal(R.ZONE_KIND) == {
        "zone-b": {"state": None, "enrolled_at": 10.0, "intermediates": ["I1"]}
    }
    state = _b(3, _svc("api"))
    assert reg.run(reg.revision + 1, lambda r: r.put_zone_state(state, 11.0))[1] == 3
    assert reg.internal(R.ZONE_KIND)["zone-b"]["state"] == state.to_json()
    _step(reg, lambda r: r.enroll_zone("zone-b", 20.0, "I2"))
    _step(reg, lambda r: r.enroll_zone("zone-b", 30.0, "I3"))
    spec = reg.internal(R.ZONE_KIND)["zone-b"]
    assert spec["intermediates"] == ["I2", "I3"]  # keep=2, newest last
    assert spec["enrolled_at"] == 30.0
    assert spec["state"] == state.to_json()
    assert spec["received_at"] == 11.0
    _step(reg, lambda r: r.enroll_zone("zone-b", 40.0, "I4", keep=3))
    assert reg.internal(R.ZONE_KIND)["zone-b"]["intermediates"] == ["I2", "I3", "I4"]
    _step(reg, lambda r: r.enroll_zone("zone-b", 50.0, "I5", keep=1))
    assert reg.internal(R.ZONE_KIND)["zone-b"]["intermediates"] == ["I5"]
    # Another zone is apart.
    _step(reg, lambda r: r.enroll_zone("zone-c", 60.0, "C1"))
    assert reg.internal(R.ZONE_KIND)["zone-c"]["intermediates"] == ["C1"]
    assert reg.internal(R.ZONE_KIND)["zone-b"]["intermediates"] == ["I5"]
    with pytest.raises(R.RegistryError) as info:
        _step(reg, lambda r: r.enroll_zone("Zone_B", 1.0, "X"))
    assert info.value.status == 400 and "zone: 'Zone_B' is not a DNS label" in str(info.value)


def test_put_zone_state_keeps_the_highest_generation() -> None:
    reg = R.Registry()
    with pytest.raises(R.RegistryError) as info:
        _step(reg, lambda r: r.put_zone_state(_b(1), 1.0))
    assert info.value.status == 403
    assert str(info.value) == "zone 'zone-b' is not enrolled"
    assert not reg.broken and reg.resources == {}

    _step(reg, lambda r: r.enroll_zone("zone-b", 1.0, "I1"))
    five = _b(5, _svc("api"))
    assert reg.run(reg.revision + 1, lambda r: r.put_zone_state(five, 2.0))[1] == 5
    # Older: ignored, the kept generation answered, nothing changes.
    older = _b(3, _svc("web"))
    changes, kept = reg.run(reg.revision + 1, lambda r: r.put_zone_state(older, 3.0))
    assert (changes, kept) == ([], 5)
    spec = reg.internal(R.ZONE_KIND)["zone-b"]
    assert spec["state"] == five.to_json() and spec["received_at"] == 2.0
    # Equal: taken (a retried push, or the same revision with another ingress).
    again = ZoneState("zone-b", 5, "203.0.113.9", B_PORT, (_svc("db"),))
    assert reg.run(reg.revision + 1, lambda r: r.put_zone_state(again, 4.0))[1] == 5
    spec = reg.internal(R.ZONE_KIND)["zone-b"]
    assert spec["state"] == again.to_json() and spec["received_at"] == 4.0
    # Newer: taken.
    newer = _b(8, _svc("api"), _svc("web"))
    changes, kept = reg.run(reg.revision + 1, lambda r: r.put_zone_state(newer, 5.0))
    assert kept == 8
    assert _summary(changes) == [("zone", "put", "Zone/default/zone-b")]
    assert changes[0].nodes == ()
    spec = reg.internal(R.ZONE_KIND)["zone-b"]
    assert spec["state"] == newer.to_json() and spec["received_at"] == 5.0
    assert spec["intermediates"] == ["I1"] and spec["enrolled_at"] == 1.0


def test_a_re_enrolled_zones_first_state_replaces_the_kept_one() -> None:
    """A zone enrolls again with a new control plane, whose store (and so its
    revision, the generation it publishes) starts from nothing: its state must not
    be ignored as older than what the control plane before it published."""
    reg = R.Registry()
    _step(reg, lambda r: r.enroll_zone("zone-b", 1.0, "I1"))
    _step(reg, lambda r: r.put_zone_state(_b(500, _svc("api")), 2.0))
    _step(reg, lambda r: r.enroll_zone("zone-b", 3.0, "I2"))  # a new control plane
    fresh = _b(4, _svc("web"))
    assert reg.run(reg.revision + 1, lambda r: r.put_zone_state(fresh, 4.0))[1] == 4
    assert reg.internal(R.ZONE_KIND)["zone-b"]["state"] == fresh.to_json()


def test_zone_states_gives_only_the_services_a_grant_gives_the_zone() -> None:
    reg = R.Registry()
    _step(reg, lambda r: r.enroll_zone("zone-b", 1.0, "I1"))
    _step(reg, lambda r: r.enroll_zone("zone-c", 1.0, "C1"))  # publishes nothing
    api, web, db = _svc("api"), _svc("web", port=8080), _svc("db", ns="other")
    state = _b(5, api, web, db)
    _step(reg, lambda r: r.put_zone_state(state, 2.0))

    def refusal(ns: str, name: str, account: str) -> str:
        return (
            f"{ns}/{name}: zone zone-b is not granted identity {ns}/{account}; at the global "
            "control plane, `meshnode apply` an IdentityGrant with zones: [zone-b] and that "
            "identity"
        )

    # No grant at all: every service refused.
    assert reg.zone_states() == {
        "zone-b": (
            ZoneState("zone-b", 5, B_IP, B_PORT, ()),
            [
                refusal("default", "api", "api"),
                refusal("default", "web", "web"),
                refusal("other", "db", "db"),
            ],
        )
    }
    grants = [
        _grant("nodes-only", ["default/api", "other/*"], nodes=["zone-b", "n1"]),
        _grant("zone-c-db", ["other/db"], zones=["zone-c"]),
        _grant("zone-b-web", ["default/web"], zones=["zone-b"]),
    ]
    _step(reg, lambda r: r.apply_resources(grants))
    allowed, refused = reg.zone_states()["zone-b"]
    assert allowed == ZoneState("zone-b", 5, B_IP, B_PORT, (web,))
    assert refused == [refusal("default", "api", "api"), refusal("other", "db", "db")]
    # A grant applied later changes the filter, with no new push.
    _step(reg, lambda r: r.apply_resources([_grant("zone-b-all", ["default/*"], zones=["zone-b"])]))
    allowed, refused = reg.zone_states()["zone-b"]
    assert allowed == ZoneState("zone-b", 5, B_IP, B_PORT, (api, web))
    assert refused == [refusal("other", "db", "db")]
    assert reg.internal(R.ZONE_KIND)["zone-b"]["state"] == state.to_json()  # as published
    # And withdrawn.
    _step(reg, lambda r: r.delete_resource("IdentityGrant", "default", "zone-b-all"))
    assert reg.zone_states()["zone-b"][0].services == (web,)
    assert list(reg.zone_states()) == ["zone-b"]


def test_put_zone_state_of_the_same_services_writes_nothing() -> None:
    reg = R.Registry()
    _step(reg, lambda r: r.enroll_zone("zone-b", 1.0, "I1"))
    _step(reg, lambda r: r.put_zone_state(_b(5, _svc("api")), 2.0))
    rows = reg.rows()
    changes, kept = reg.run(reg.revision + 1, lambda r: r.put_zone_state(_b(9, _svc("api")), 3.0))
    assert (changes, kept) == ([], 9)
    assert reg.rows() == rows  # no write, no revision that wakes every zone
    # Anything else in it is a change.
    changes, kept = reg.run(reg.revision + 1, lambda r: r.put_zone_state(_b(9, _svc("web")), 4.0))
    assert kept == 9 and _summary(changes) == [("zone", "put", "Zone/default/zone-b")]
