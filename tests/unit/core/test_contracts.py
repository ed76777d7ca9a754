"""The wire contracts of meshnode.core.contracts: every document survives
to_json -> JSON text -> from_json unchanged, every validator refuses what it
should with the field's path in the message, and the two ends (registry ->
agent, agent -> ztunnel) understand each other."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshnode.controlplane import registry as R
from meshnode.core.contracts import (
    CONTROL_PROTOCOL_VERSION,
    SNAPSHOT_SCHEMA,
    Ack,
    AddMessage,
    ContractError,
    DeleteMessage,
    EndpointDoc,
    Nack,
    NodeDoc,
    NodeSlice,
    ServiceDoc,
    ServicePort,
    SliceChange,
    SliceDelta,
    SliceUnchanged,
    Snapshot,
    SnapshotMessage,
    SnapshotWorkload,
    WorkloadDoc,
    parse_control_message,
    parse_control_reply,
    parse_slice_answer,
)
from meshnode.core.resources import AuthorizationPolicy, resource_from_dict

POLICY = {
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny", "namespace": "default"},
    "spec": {"action": "DENY", "rules": []},
}

ENDPOINT = EndpointDoc(
    workload="api",
    namespace="default",
    service_account="api",
    node="node2",
    node_ip="198.18.0.12",
    address="198.18.0.12",
    port=8080,
    zone="z2",
    service_port=80,
    version="v1",
)
SERVICE = ServiceDoc(
    name="api",
    namespace="default",
    vip="240.0.0.1",
    ports=(ServicePort(80, 8080),),
    endpoints=(ENDPOINT,),
    split=(("v1", 90), ("v2", 10)),
)
WORKLOAD = WorkloadDoc(
    name="web", namespace="default", service="web", service_account="web", port=8080, version="v1"
)
NODE = NodeDoc(name="node1", ip="198.18.0.11", zone="z1")
SLICE = NodeSlice(
    revision=42,
    node=NODE,
    trust_domain="cluster.local",
    workloads=(WORKLOAD,),
    services=(SERVICE,),
    resources=(resource_from_dict(POLICY),),
    trust_bundle="-----BEGIN CERTIFICATE-----\n...",
)
SNAP_WORKLOAD = SnapshotWorkload(
    id=1,
    name="web",
    namespace="default",
    service_account="web",
    node="node1",
    address="198.18.0.11",
    port=8080,
    service="web",
    cert="/c/web.pem",
    key="/c/web.key",
)
POLICY_OBJ = resource_from_dict(POLICY)
assert isinstance(POLICY_OBJ, AuthorizationPolicy)
SNAPSHOT = Snapshot(
    version=7,
    node=NODE,
    trust_domain="cluster.local",
    trust_bundle="/c/b.pem",
    bpf_pin_dir="/sys/fs/bpf/meshnode",
    workloads=(SNAP_WORKLOAD,),
    services=(SERVICE,),
    policies=(POLICY_OBJ,),
    authorization_default="DENY",
)

ROUND_TRIP: list[Any] = [
    NODE,
    WORKLOAD,
    ServicePort(80, 8080),
    ENDPOINT,
    SERVICE,
    SLICE,
    SliceChange("put", "workload", "web", WORKLOAD),
    SliceChange("put", "service", "default/api", SERVICE),
    SliceChange("put", "resource", "AuthorizationPolicy/default/deny", POLICY_OBJ),
    SliceChange("delete", "service", "default/api"),
    SliceDelta(43, (SliceChange("delete", "workload", "web"),)),
    SliceUnchanged(42),
    SNAP_WORKLOAD,
    SNAPSHOT,
    SnapshotMessage(7, SNAPSHOT),
    AddMessage(8, SNAP_WORKLOAD),
    AddMessage(9, SERVICE),
    DeleteMessage(10, "service", "default/api"),
    Ack(7),
    Nack(7, "why"),
    Nack(None, "why"),
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=lambda v: type(v).__name__)
def test_round_trip_through_json_text(value: Any) -> None:
    text = json.dumps(value.to_json())
    assert type(value).from_json(json.loads(text)) == value


def test_dispatchers_pick_the_right_type() -> None:
    for value in (SLICE, SliceDelta(1), SliceUnchanged(1)):
        assert parse_slice_answer(value.to_json()) == value
    for msg in (
        SnapshotMessage(7, SNAPSHOT),
        AddMessage(8, SERVICE),
        DeleteMessage(9, "workload", "web"),
    ):
        assert parse_control_message(msg.to_json()) == msg
    for reply in (Ack(3), Nack(3, "no")):
        assert parse_control_reply(reply.to_json()) == reply


def test_wire_format_is_todays() -> None:
    """The JSON shape nodes of the previous version send and expect."""
    assert SnapshotMessage(7, SNAPSHOT).to_json()["v"] == CONTROL_PROTOCOL_VERSION == 1
    assert SNAPSHOT.to_json()["schema"] == SNAPSHOT_SCHEMA == 4
    assert SNAPSHOT.to_json()["dns_domain"] == "mesh"
    assert ENDPOINT.to_json() == {
        "workload": "api",
        "namespace": "default",
        "service_account": "api",
        "node": "node2",
        "node_ip": "198.18.0.12",
        "address": "198.18.0.12",
        "zone": "z2",
        "port": 8080,
        "service_port": 80,
        "version": "v1",
    }
    assert SERVICE.to_json()["split"] == {"v1": 90, "v2": 10}
    assert "split" not in ServiceDoc("a", "b", "240.0.0.2", (), ()).to_json()
    assert SliceChange("delete", "workload", "web").to_json() == {
        "op": "delete",
        "kind": "workload",
        "key": "web",
    }
    assert SliceUnchanged(5).to_json() == {"revision": 5, "unchanged": True}
    assert DeleteMessage(3, "workload", "web").to_json() == {
        "v": 1,
        "type": "delete",
        "version": 3,
        "kind": "workload",
        "key": "web",
    }


def test_defaults_for_absent_or_null_optional_fields() -> None:
    ep = EndpointDoc.from_json(
        {
            "workload": "a",
            "namespace": "d",
            "service_account": "a",
            "node": "n",
            "node_ip": "10.0.0.1",
            "address": "10.0.0.1",
            "port": 80,
            "zone": None,
        }
    )
    assert (ep.zone, ep.service_port, ep.version) == ("", 0, "")
    assert ServicePort.from_json({"port": 80}) == ServicePort(80, 80)
    # A slice saved by the previous version had no "full" field.
    saved = SLICE.to_json()
    del saved["full"]
    assert NodeSlice.from_json(saved) == SLICE


def test_ips_are_normalised() -> None:
    doc = SERVICE.to_json()
    doc["vip"] = "FD00:0::0001"
    assert ServiceDoc.from_json(doc).vip == "fd00::1"


# --- refusals: each validator, the field's path in the message --------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value

    return mutate


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]

    return mutate


SNAPSHOT_REFUSED = [
    ("unknown top field", _set(("vips",), []), "snapshot: unknown field 'vips'"),
    (
        "unknown endpoint field (typo)",
        _set(("services", 0, "endpoints", 0, "adress"), "1.2.3.4"),
        "snapshot.services[0].endpoints[0]: unknown field 'adress'",
    ),
    ("schema", _set(("schema",), 1), "snapshot.schema: snapshot schema 1 is not 4"),
    ("schema True", _set(("schema",), True), "snapshot schema True is not 4"),
    (
        "label",
        _set(("workloads", 0, "namespace"), "Default"),
        "snapshot.workloads[0].namespace: 'Default' is not a DNS label",
    ),
    (
        "port",
        _set(("services", 0, "ports", 0, "target_port"), 0),
        "snapshot.services[0].ports[0].target_port: 0 is not a port",
    ),
    (
        "port bool",
        _set(("workloads", 0, "port"), True),
        "snapshot.workloads[0].port: True is not a port",
    ),
    (
        "ip",
        _set(("services", 0, "endpoints", 0, "node_ip"), "node2"),
        "snapshot.services[0].endpoints[0].node_ip: 'node2' is not an IP address",
    ),
    ("ip not a string", _set(("node", "ip"), 7), "snapshot.node.ip: 7 is not an IP address"),
    (
        "trust domain",
        _set(("trust_domain",), "Cluster.Local"),
        "snapshot.trust_domain: trust domain 'Cluster.Local'",
    ),
    ("int", _set(("version",), "7"), "snapshot.version: expected int, got '7'"),
    ("str", _set(("trust_bundle",), 5), "snapshot.trust_bundle: expected str, got 5"),
    ("list", _set(("services",), {}), "snapshot.services: expected list, got {}"),
    (
        "object",
        _set(("services", 0, "ports", 0), 80),
        "snapshot.services[0].ports[0]: expected dict, got 80",
    ),
    (
        "missing",
        _delete(("workloads", 0, "address")),
        "snapshot.workloads[0]: missing field 'address'",
    ),
    ("negative id", _set(("workloads", 0, "id"), -1), "snapshot.workloads[0].id: -1 is negative"),
    (
        "version label",
        _set(("services", 0, "endpoints", 0, "version"), "v 1"),
        "snapshot.services[0].endpoints[0].version: 'v 1' is not a version label",
    ),
    (
        "split weight",
        _set(("services", 0, "split"), {"v1": -1}),
        "snapshot.services[0].split.v1: weight must be an integer >= 0",
    ),
    (
        "split zero",
        _set(("services", 0, "split"), {"v1": 0}),
        "snapshot.services[0].split: the weights add up to 0",
    ),
    ("policy", _set(("policies", 0, "spec", "action"), "MAYBE"), "snapshot.policies[0]: "),
    (
        "policy kind",
        _set(
            ("policies", 0),
            {"kind": "PeerAuthentication", "metadata": {"name": "p"}, "spec": {"mode": "STRICT"}},
        ),
        "snapshot.policies[0]: a PeerAuthentication, not an AuthorizationPolicy",
    ),
    (
        "authorization default",
        _set(("authorization_default",), "MAYBE"),
        "snapshot.authorization_default: 'MAYBE' is not ALLOW or DENY",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [pytest.param(m, msg, id=name) for name, m, msg in SNAPSHOT_REFUSED]
)
def test_snapshot_refusals_name_the_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = SNAPSHOT.to_json()
    mutate(doc)
    with pytest.raises(ContractError) as info:
        Snapshot.from_json(doc)
    assert message in str(info.value)


SLICE_REFUSED = [
    (
        "workload service",
        _set(("workloads", 0, "service"), "Web"),
        "slice.workloads[0].service: 'Web' is not a DNS label",
    ),
    ("resource", _set(("resources", 0, "kind"), "Nope"), "slice.resources[0]: "),
    ("revision negative", _set(("revision",), -1), "slice.revision: -1 is negative"),
    (
        "full false: a delta, which has no node",
        _set(("full",), False),
        "slice: unknown field 'node'",
    ),
    ("bundle", _set(("trust_bundle",), 1), "slice.trust_bundle: expected str, got 1"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [pytest.param(m, msg, id=name) for name, m, msg in SLICE_REFUSED]
)
def test_slice_refusals_name_the_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = SLICE.to_json()
    mutate(doc)
    with pytest.raises(ContractError) as info:
        parse_slice_answer(doc)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"op": "put", "kind": "workload", "key": "other", "value": WORKLOAD.to_json()},
            "changes[0].key: 'other' is not the key of the value ('web')",
        ),
        ({"op": "put", "kind": "workload", "key": "web"}, "changes[0]: missing field 'value'"),
        (
            {"op": "delete", "kind": "workload", "key": "web", "value": WORKLOAD.to_json()},
            "changes[0].value: a delete carries no value",
        ),
        ({"op": "patch", "kind": "workload", "key": "web"}, "changes[0].op: 'patch' is not put"),
        ({"op": "delete", "kind": "node", "key": "n"}, "changes[0].kind: 'node' is not workload"),
    ],
)
def test_change_refusals_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_slice_answer({"revision": 3, "full": False, "changes": [change]})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        ({"v": 2, "type": "ack", "version": 1}, "reply.v: protocol version 2 is not 1"),
        ({"v": 1, "type": "hello"}, "reply.type: 'hello' is not ack or nack"),
        ({"v": 1, "type": "nack", "version": 1}, "reply: missing field 'error'"),
        ({"v": 1, "type": "ack", "version": 1, "extra": 1}, "reply: unknown field 'extra'"),
    ],
)
def test_reply_refusals_name_the_field(msg: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_control_reply(msg)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        ([], "message: expected dict"),
        ({"v": 1, "type": "reset", "version": 1}, "message.type: unknown message type 'reset'"),
        (
            {"type": "delete", "version": 1, "kind": "workload", "key": "w"},
            "message.v: protocol version None is not 1",
        ),
        (
            {"v": 1, "type": "delete", "version": True, "kind": "workload", "key": "w"},
            "message.version: expected int, got True",
        ),
        (
            {"v": 1, "type": "add", "version": 1, "kind": "resource", "value": {}},
            "message.kind: 'resource' is not workload or service",
        ),
        (
            {"v": 1, "type": "add", "version": 1, "kind": "workload", "value": {"id": 1}},
            "message.value: missing field",
        ),
        (
            {"v": 1, "type": "snapshot", "version": 1, "state": {"schema": 4}},
            "message.state: missing field",
        ),
    ],
)
def test_message_refusals_name_the_field(msg: Any, message: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_control_message(msg)
    assert message in str(info.value)


def test_snapshot_message_version_wins_over_the_state_version() -> None:
    doc = SnapshotMessage(7, SNAPSHOT).to_json()
    doc["version"] = 9
    assert parse_control_message(doc).state.version == 9  # type: ignore[union-attr]


# --- both ends: registry -> agent ------------------------------------------------------


def test_registry_slices_parse_and_deltas_rebuild_the_full_slice() -> None:
    from meshnode.controlplane.feed import Feed

    reg = R.Registry()

    def step(fn: Callable[[R.Registry], object]) -> list[R.Change]:
        return reg.run(reg.revision + 1, fn)[0]

    def nodes(r: R.Registry) -> None:
        r.put_node(R.NodeRecord("node1", "z1", "198.18.0.11"))
        r.put_node(R.NodeRecord("node2", "z2", "198.18.0.12"))
        r.set_token_grant("node1", ["default/*"])
        r.set_token_grant("node2", ["default/*"])

    step(nodes)
    step(lambda r: r.put_workload(R.WorkloadRecord("node1", "web", "default", "web", "web", 8080)))
    start = parse_slice_answer(json.loads(reg.slice_json("node1", 2, "td")))
    assert isinstance(start, NodeSlice)
    feed = Feed(floor=2, revision=2)
    api = R.WorkloadRecord("node2", "api", "default", "api", "api", 9090, "v2")
    feed.extend(step(lambda r: r.put_workload(api)), 3)
    feed.extend(
        step(
            lambda r: r.put_workload(
                R.WorkloadRecord("node1", "api-1", "default", "api", "api", 9090, "v1")
            )
        ),
        4,
    )
    feed.extend(step(lambda r: r.apply_resources([POLICY])), 5)
    feed.extend(step(lambda r: r.delete_workload("node1", "web")), 6)
    changes = feed.answer("node1", 2)
    assert changes is not None
    assert b'"kind":"endpoint"' in b"".join(changes)
    delta = parse_slice_answer(
        json.loads(b'{"revision":6,"full":false,"changes":[%b]}' % b",".join(changes))
    )
    assert isinstance(delta, SliceDelta)
    full = NodeSlice.from_json(json.loads(reg.slice_json("node1", 6, "td")))
    applied = start.apply(delta)
    assert applied.revision == 6 and applied.workloads == full.workloads
    assert sorted(applied.services, key=lambda s: s.key) == sorted(
        full.services, key=lambda s: s.key
    )
    assert applied.resources == full.resources == (POLICY_OBJ,)


def test_slice_store_folds_answers_and_survives_a_restart(tmp_path: Path) -> None:
    from meshnode.nodeagent.enrolled import SliceStore

    store = SliceStore(tmp_path / "slice.json")
    assert store.revision == 0 and store.doc == {}
    with pytest.raises(ContractError):  # changes before any full slice: ask for a full one
        store.apply(SliceDelta(3, (SliceChange("delete", "workload", "web"),)).to_json())
    assert store.apply(SLICE.to_json()) is True
    assert store.apply(SliceUnchanged(42).to_json()) is False
    assert store.apply(SliceDelta(43, (SliceChange("delete", "workload", "web"),)).to_json())
    assert store.revision == 43 and store.slice is not None and store.slice.workloads == ()
    store.save()
    assert (tmp_path / "slice.json").stat().st_mode & 0o777 == 0o600
    again = SliceStore(tmp_path / "slice.json")
    assert again.load() and again.slice == store.slice
    again.ask_full()
    assert again.revision == 0
    (tmp_path / "slice.json").write_text('{"revision": 1, "surprise": 1}')
    assert SliceStore(tmp_path / "slice.json").load() is False


# --- both ends: agent -> ztunnel, over a real Unix socket -------------------------------


def test_control_state_add_delete_and_refusals() -> None:
    from meshnode.ztunnel.control import ControlError, ControlState

    state = ControlState()
    with pytest.raises(ControlError, match="add before any snapshot"):
        state.next_doc(AddMessage(2, SERVICE).to_json())
    version, doc = state.next_doc(SnapshotMessage(1, SNAPSHOT).to_json())
    assert version == 1 and Snapshot.from_json(doc) == replace(SNAPSHOT, version=1)
    state.doc = doc
    other = SnapshotWorkload(
        id=2,
        name="db",
        namespace="data",
        service_account="db",
        node="node1",
        address="198.18.0.11",
        port=5432,
    )
    version, doc = state.next_doc(AddMessage(2, other).to_json())
    assert version == 2 and [w["name"] for w in doc["workloads"]] == ["web", "db"]
    state.doc = doc
    with pytest.raises(ControlError, match="duplicate workload id 2"):
        clash = SnapshotWorkload(
            id=2,
            name="cache",
            namespace="data",
            service_account="c",
            node="node1",
            address="198.18.0.11",
            port=6379,
        )
        state.next_doc(AddMessage(3, clash).to_json())
    version, doc = state.next_doc(DeleteMessage(3, "service", "default/api").to_json())
    assert version == 3 and doc["services"] == []
    with pytest.raises(ControlError, match="delete: no workload 'nope'"):
        state.next_doc(DeleteMessage(4, "workload", "nope").to_json())


def test_link_and_server_speak_the_same_contract(tmp_path: Path) -> None:
    from meshnode.nodeagent.ztunnel_link import ZtunnelLink
    from meshnode.ztunnel.control import ControlServer, ControlState

    applied: list[tuple[int, dict[str, Any]]] = []

    async def apply(version: int, doc: dict[str, Any]) -> None:
        applied.append((version, copy.deepcopy(doc)))

    async def scenario() -> list[tuple[bool, str]]:
        path = str(tmp_path / "ztunnel.sock")
        server = ControlServer(path, ControlState(), apply)
        await server.start()
        try:
            link = ZtunnelLink(path)
            bad = SNAPSHOT.to_json()
            bad["services"][0]["vip"] = "nope"
            return [
                await asyncio.to_thread(link.push_snapshot, SNAPSHOT, 5.0),
                await asyncio.to_thread(link.send, DeleteMessage(8, "workload", "web"), 5.0),
                await asyncio.to_thread(link.send, DeleteMessage(9, "workload", "web"), 5.0),
                await asyncio.to_thread(link.push_snapshot, bad, 5.0),
            ]
        finally:
            server.close()

    results = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert results[0] == (True, "") and results[1] == (True, "")
    assert results[2][0] is False and "delete: no workload 'web'" in results[2][1]
    assert results[3] == (
        False,
        "the snapshot is not valid, not sent: "
        "snapshot.services[0].vip: 'nope' is not an IP address",
    )
    assert [v for v, _ in applied] == [7, 8]
    assert Snapshot.from_json(applied[0][1]) == SNAPSHOT
    assert applied[1][1]["workloads"] == []


def test_answer_lines_frame_a_streamed_watch() -> None:
    from meshnode.core.contracts import AnswerLines

    lines = AnswerLines(limit=64)
    assert lines.feed(b'{"revision":1,') == []
    assert lines.feed(b'"unchanged":true}\n{"rev') == [b'{"revision":1,"unchanged":true}']
    assert lines.feed(b'ision":2}\n\n{"a":1}\n') == [b'{"revision":2}', b'{"a":1}']
    assert lines.end() == []
    # An older control plane answers one long poll, without a newline.
    assert lines.feed(b'{"revision":3,"full":true}') == []
    assert lines.end() == [b'{"revision":3,"full":true}']


def test_answer_lines_refuse_a_line_that_never_ends() -> None:
    """Attack: a server (or a man in the middle past TLS, or a bug) sends bytes
    without a newline for ever, to fill the node's memory."""
    from meshnode.core.contracts import AnswerLines, ContractError

    lines = AnswerLines(limit=64)
    lines.feed(b"x" * 60)
    with pytest.raises(ContractError, match="longer than 64 bytes"):
        lines.feed(b"y" * 10)
    with pytest.raises(ContractError):
        AnswerLines(limit=64).feed(b"ok\n" + b"z" * 65)
