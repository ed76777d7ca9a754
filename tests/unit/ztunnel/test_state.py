"""Snapshot validation: parse_snapshot accepts the documented schema and rejects
anything else with a StateError that names the offending field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.ztunnel.state import (
    SCHEMA,
    Endpoint,
    NodeInfo,
    ServicePort,
    StateError,
    Workload,
    parse_snapshot,
)


def good_snapshot() -> dict[str, Any]:
    return {
        "schema": 4,
        "version": 7,
        "node": {"name": "node1", "ip": "198.18.0.11", "zone": "z1"},
        "trust_domain": "cluster.local",
        "trust_bundle": "/var/lib/meshnode/bundle.pem",
        "bpf_pin_dir": "/sys/fs/bpf/meshnode",
        "workloads": [
            {
                "id": 1,
                "name": "web",
                "namespace": "default",
                "service_account": "web",
                "node": "node1",
                "address": "198.18.0.11",
                "port": 8080,
                "service": "web",
                "cert": "/certs/web.pem",
                "key": "/certs/web.key",
            },
            {
                "id": 2,
                "name": "worker",
                "namespace": "jobs",
                "service_account": "worker",
                "node": "node1",
                "address": "198.18.0.11",
                "port": 9000,
                "service": "",
            },
            {
                "id": 1,
                "name": "remote",
                "namespace": "default",
                "service_account": "api",
                "node": "node2",
                "address": "198.18.0.12",
                "port": 8080,
                "service": "api",
            },
        ],
        "services": [
            {
                "name": "api",
                "namespace": "default",
                "vip": "240.0.0.1",
                "ports": [{"port": 80, "target_port": 8080}, {"port": 8081}],
                "endpoints": [
                    {
                        "workload": "api",
                        "namespace": "default",
                        "service_account": "api",
                        "node": "node2",
                        "node_ip": "198.18.0.12",
                        "address": "198.18.0.12",
                        "zone": "z2",
                        "port": 8080,
                    },
                ],
            },
        ],
    }


def test_schema_constant_is_4() -> None:
    assert SCHEMA == 4  # 4: services[].zone_split


def test_accepts_a_good_snapshot() -> None:
    state = parse_snapshot(good_snapshot())
    td = "cluster.local"
    assert state.version == 7
    assert state.node == NodeInfo("node1", "198.18.0.11", "z1")
    assert state.trust_domain == td
    assert state.trust_bundle == "/var/lib/meshnode/bundle.pem"
    assert state.bpf_pin_dir == "/sys/fs/bpf/meshnode"
    # Only this node's workloads are indexed.
    assert sorted(state.workloads_by_id) == [1, 2]
    web = Workload(
        1,
        "web",
        SpiffeId(td, "default", "web"),
        "node1",
        "198.18.0.11",
        8080,
        "web",
        "/certs/web.pem",
        "/certs/web.key",
    )
    assert state.find_local_workload(1) == web
    assert state.find_local_by_addr("198.18.0.11", 8080) == web
    assert state.find_local_workload(2) is not None
    assert state.find_local_workload(2).cert_path is None
    assert state.find_local_workload(3) is None
    assert state.local_identities() == {SpiffeId(td, "default", "web"): web}

    api = state.find_service_by_vip("240.0.0.1")
    assert api is not None
    assert api.hostname == "api.default.mesh"
    assert api.ports == (ServicePort(80, 8080), ServicePort(8081, 8081))
    assert api.target_port(80) == 8080
    assert api.target_port(8081) == 8081
    assert api.target_port(8080) is None
    endpoint = Endpoint(
        "api", SpiffeId(td, "default", "api"), "node2", "198.18.0.12", "198.18.0.12", 8080, "z2"
    )
    assert api.endpoints == (endpoint,)
    assert state.find_endpoint_by_addr("198.18.0.12", 8080) == endpoint
    assert state.services_by_name[("default", "api")] is api


def test_ips_are_normalized() -> None:
    doc = good_snapshot()
    doc["services"][0]["vip"] = "FD00:0::0001"
    doc["services"][0]["endpoints"][0]["address"] = "fd00:0000::12"
    state = parse_snapshot(doc)
    assert state.find_service_by_vip("fd00::1") is not None
    assert state.find_endpoint_by_addr("fd00::12", 8080) is not None


def test_dump_is_json_serializable_and_complete() -> None:
    state = parse_snapshot(good_snapshot())
    dumped = state.dump()
    text = json.dumps(dumped)
    back = json.loads(text)
    assert back["version"] == 7
    assert back["node"] == {"name": "node1", "ip": "198.18.0.11", "zone": "z1"}
    assert back["trust_domain"] == "cluster.local"
    assert [w["identity"] for w in back["workloads"]] == [
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://cluster.local/ns/jobs/sa/worker",
    ]
    assert back["workloads"][0]["address"] == "198.18.0.11:8080"
    assert back["workloads"][0]["certificate"] == "/certs/web.pem"
    assert back["workloads"][1]["certificate"] is None
    (svc,) = back["services"]
    assert svc["vip"] == "240.0.0.1"
    assert svc["ports"] == [{"port": 80, "target_port": 8080}, {"port": 8081, "target_port": 8081}]
    assert svc["split"] == {}
    assert svc["endpoints"] == [
        {
            "workload": "api",
            "identity": "spiffe://cluster.local/ns/default/sa/api",
            "node": "node2",
            "address": "198.18.0.12:8080",
            "zone": "z2",
            "version": "",
        }
    ]


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _duplicate_local_id(doc: dict[str, Any]) -> None:
    doc["workloads"][1]["id"] = 1


REJECTED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("schema 1", _set(("schema",), 1), "schema 1 is not 4"),
    ("schema 3", _set(("schema",), 3), "schema 3 is not 4"),  # before zone_split
    ("schema missing", _delete(("schema",)), "schema None is not 4"),
    ("schema as string", _set(("schema",), "4"), "schema '4' is not 4"),
    ("node missing", _delete(("node",)), "snapshot: missing field 'node'"),
    ("node not an object", _set(("node",), "node1"), "snapshot.node: expected dict"),
    ("node name missing", _delete(("node", "name")), "node: missing field 'name'"),
    ("node ip bad", _set(("node", "ip"), "198.18.0.300"), "node.ip: '198.18.0.300' is not an IP"),
    ("node ip hostname", _set(("node", "ip"), "node1.lan"), "node.ip: 'node1.lan' is not an IP"),
    ("version bool", _set(("version",), True), "snapshot.version: expected int, got True"),
    ("version string", _set(("version",), "7"), "snapshot.version: expected int, got '7'"),
    ("trust domain missing", _delete(("trust_domain",)), "missing field 'trust_domain'"),
    ("workloads not a list", _set(("workloads",), {}), "snapshot.workloads: expected list"),
    (
        "workload ip bad",
        _set(("workloads", 0, "address"), "1.2.3"),
        "workloads[0].address: '1.2.3' is not an IP",
    ),
    ("workload port 0", _set(("workloads", 0, "port"), 0), "workloads[0].port: 0 is not a port"),
    (
        "workload port 70000",
        _set(("workloads", 1, "port"), 70000),
        "workloads[1].port: 70000 is not a port",
    ),
    (
        "workload port string",
        _set(("workloads", 0, "port"), "80"),
        "workloads[0].port: '80' is not a port",
    ),
    (
        "workload port True",
        _set(("workloads", 0, "port"), True),
        "workloads[0].port: True is not a port",
    ),
    (
        "workload port missing",
        _delete(("workloads", 0, "port")),
        "workloads[0]: missing field 'port'",
    ),
    ("workload id bool", _set(("workloads", 0, "id"), True), "workloads[0].id: expected int"),
    (
        "workload namespace uppercase",
        _set(("workloads", 0, "namespace"), "Default"),
        "workloads[0].namespace: 'Default' is not a DNS label",
    ),
    (
        "workload service account with dot",
        _set(("workloads", 1, "service_account"), "a.b"),
        "workloads[1].service_account: 'a.b' is not a DNS label",
    ),
    (
        "workload namespace missing",
        _delete(("workloads", 0, "namespace")),
        "workloads[0]: missing field 'namespace'",
    ),
    (
        "duplicate local workload id",
        _duplicate_local_id,
        "workloads[1].id: duplicate workload id 1",
    ),
    (
        "trust domain uppercase",
        _set(("trust_domain",), "Cluster.Local"),
        "snapshot.trust_domain: trust domain 'Cluster.Local'",
    ),
    ("vip bad", _set(("services", 0, "vip"), "240.0.0"), "services[0].vip: '240.0.0' is not an IP"),
    (
        "service port 0",
        _set(("services", 0, "ports", 0, "port"), 0),
        "services[0].ports[0].port: 0 is not a port",
    ),
    (
        "target port 70000",
        _set(("services", 0, "ports", 0, "target_port"), 70000),
        "services[0].ports[0].target_port: 70000 is not a port",
    ),
    (
        "endpoint port string",
        _set(("services", 0, "endpoints", 0, "port"), "8080"),
        "services[0].endpoints[0].port: '8080' is not a port",
    ),
    (
        "endpoint port True",
        _set(("services", 0, "endpoints", 0, "port"), True),
        "services[0].endpoints[0].port: True is not a port",
    ),
    (
        "endpoint node ip bad",
        _set(("services", 0, "endpoints", 0, "node_ip"), "node2"),
        "services[0].endpoints[0].node_ip: 'node2' is not an IP",
    ),
    (
        "endpoint namespace uppercase",
        _set(("services", 0, "endpoints", 0, "namespace"), "API"),
        "services[0].endpoints[0].namespace: 'API' is not a DNS label",
    ),
    (
        "endpoints missing",
        _delete(("services", 0, "endpoints")),
        "services[0]: missing field 'endpoints'",
    ),
    (
        "service name not a string",
        _set(("services", 0, "name"), 5),
        "services[0].name: 5 is not a DNS label",
    ),
    (
        "zone split not a mapping",
        _set(("services", 0, "zone_split"), ["z1"]),
        "services[0].zone_split: expected dict",
    ),
    (
        "zone split zone not a label",
        _set(("services", 0, "zone_split"), {"Zone_A": 1}),
        "services[0].zone_split.Zone_A: 'Zone_A' is not a DNS label",
    ),
    (
        "zone split weight negative",
        _set(("services", 0, "zone_split"), {"z1": -1}),
        "services[0].zone_split.z1: weight must be an integer >= 0",
    ),
    (
        "zone split weight bool",
        _set(("services", 0, "zone_split"), {"z1": True}),
        "services[0].zone_split.z1: weight must be an integer >= 0",
    ),
    (
        "zone split all zero",
        _set(("services", 0, "zone_split"), {"z1": 0, "z2": 0}),
        "services[0].zone_split: the weights add up to 0",
    ),
    (
        "zone split misspelt",
        _set(("services", 0, "zones"), {"z1": 1}),
        "services[0]: unknown field 'zones'",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [pytest.param(m, msg, id=name) for name, m, msg in REJECTED],
)
def test_rejects_with_state_error_naming_the_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = good_snapshot()
    mutate(doc)
    with pytest.raises(StateError) as info:
        parse_snapshot(doc)
    assert message in str(info.value)


def test_state_error_is_a_value_error() -> None:
    assert issubclass(StateError, ValueError)


def test_duplicate_id_on_another_node_is_not_a_conflict() -> None:
    # workloads[2] (node2) reuses id 1 in the good snapshot: ids are per node.
    state = parse_snapshot(good_snapshot())
    assert state.find_local_workload(1).name == "web"


def test_parse_does_not_mutate_the_document() -> None:
    doc = good_snapshot()
    before = copy.deepcopy(doc)
    parse_snapshot(doc)
    assert doc == before


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(_set(("workloads", 0), 1), "workloads[0]", id="workload entry is an int"),
        pytest.param(
            _set(("services", 0, "ports", 0), 80), "services[0].ports[0]", id="port entry is an int"
        ),
        pytest.param(
            _set(("services", 0, "endpoints", 0), None),
            "services[0].endpoints[0]",
            id="endpoint entry is null",
        ),
    ],
)
def test_entries_that_are_not_objects_raise_state_error(
    mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    """The proxy's reload catches only StateError and keeps its previous state;
    any other exception type escapes it."""
    doc = good_snapshot()
    mutate(doc)
    with pytest.raises(StateError) as info:
        parse_snapshot(doc)
    assert field in str(info.value)


# -- zone split ---------------------------------------------------------------------------


def test_zone_split_reaches_the_service_with_remote_entries_in_their_zone() -> None:
    doc = good_snapshot()
    api = doc["services"][0]
    api["zone_split"] = {"z2": 80, "zone-b": 20, "z1": 0}
    api["remote"] = [
        {
            "zone": "zone-b",
            "ingress_ip": "203.0.113.2",
            "ingress_port": 15443,
            "namespace": "default",
            "service_account": "api",
            "port": 80,
        }
    ]
    state = parse_snapshot(doc)
    svc = state.find_service_by_vip("240.0.0.1")
    assert svc is not None
    assert svc.zone_split == (("z2", 80), ("zone-b", 20), ("z1", 0))  # document order
    assert svc.split == ()
    assert [(e.zone, e.remote) for e in svc.endpoints] == [("z2", False), ("zone-b", True)]
    assert state.dump()["services"][0]["zone_split"] == {"z2": 80, "zone-b": 20, "z1": 0}


def test_no_zone_split_is_an_empty_one() -> None:
    state = parse_snapshot(good_snapshot())
    svc = state.find_service_by_vip("240.0.0.1")
    assert svc is not None and svc.zone_split == ()
    assert state.dump()["services"][0]["zone_split"] == {}
    doc = good_snapshot()
    doc["services"][0]["zone_split"] = None  # null is the default, as for any field
    svc = parse_snapshot(doc).find_service_by_vip("240.0.0.1")
    assert svc is not None and svc.zone_split == ()
