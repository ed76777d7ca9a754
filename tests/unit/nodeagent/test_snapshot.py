"""The node agent's pure translation of its node config into ztunnel's snapshot,
workload ids and BPF capture destinations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.nodeagent.certs import CertFiles
from meshnode.nodeagent.config import LocalWorkload, NodeConfig
from meshnode.nodeagent.snapshot import (
    assign_workload_ids,
    capture_destinations,
    ztunnel_snapshot,
)
from meshnode.ztunnel.state import SCHEMA, parse_snapshot

SERVICES: list[dict[str, Any]] = [
    {
        "name": "api",
        "namespace": "default",
        "vip": "240.0.0.1",
        "ports": [{"port": 80, "target_port": 8080}, {"port": 443, "target_port": 8443}],
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
            {
                "workload": "api",
                "namespace": "default",
                "service_account": "api",
                "node": "node2",
                "node_ip": "198.18.0.12",
                "address": "198.18.0.12",
                "zone": "z2",
                "port": 8443,
            },
        ],
    },
    {
        "name": "web",
        "namespace": "default",
        "vip": "240.0.0.2",
        "ports": [{"port": 80, "target_port": 8080}],
        "endpoints": [
            {
                "workload": "web",
                "namespace": "default",
                "service_account": "web",
                "node": "node1",
                "node_ip": "198.18.0.11",
                "address": "198.18.0.11",
                "zone": "z1",
                "port": 8080,
            },
        ],
    },
    {
        "name": "db",
        "namespace": "data",
        "vip": "240.0.0.3",
        "ports": [{"port": 5432}],
        "endpoints": [],
    },
]


def node_config(workloads: list[LocalWorkload] | None = None) -> NodeConfig:
    return NodeConfig(
        version=12,
        name="node1",
        ip="198.18.0.11",
        zone="z1",
        trust_domain="cluster.local",
        cgroup_parent="/sys/fs/cgroup/meshnode/node1",
        state_dir=Path("/var/lib/meshnode/node1"),
        bpf_pin_dir="/sys/fs/bpf/meshnode/node1",
        workloads=workloads
        if workloads is not None
        else [
            LocalWorkload("web", "default", "web", "web", 8080, "/sys/fs/cgroup/m/web"),
            LocalWorkload("batch", "jobs", "batch-runner", "", 7000, "/sys/fs/cgroup/m/batch"),
        ],
        services=SERVICES,
    )


# --- assign_workload_ids ------------------------------------------------------------


def test_ids_start_at_one_in_name_order() -> None:
    assert assign_workload_ids({}, ["web", "batch", "cache"]) == {"web": 1, "batch": 2, "cache": 3}


def test_no_names_no_ids() -> None:
    assert assign_workload_ids({"web": 1}, []) == {}


def test_existing_names_keep_their_ids_across_changes() -> None:
    ids = assign_workload_ids({}, ["a", "b", "c"])
    assert ids == {"a": 1, "b": 2, "c": 3}
    # Reordered, one added: old ids stay, the new one gets the next free id.
    ids = assign_workload_ids(ids, ["c", "d", "a", "b"])
    assert ids == {"a": 1, "b": 2, "c": 3, "d": 4}
    # One removed: the others keep theirs.
    ids = assign_workload_ids(ids, ["a", "c", "d"])
    assert ids == {"a": 1, "c": 3, "d": 4}


def test_a_removed_name_is_dropped_and_its_id_not_handed_to_a_newcomer() -> None:
    known = {"a": 1, "b": 2, "c": 3}
    ids = assign_workload_ids(known, ["a", "b", "x"])
    assert ids == {"a": 1, "b": 2, "x": 4}
    assert "c" not in ids


def test_never_reuses_a_live_id() -> None:
    known = {"old": 7, "a": 2}
    ids = assign_workload_ids(known, ["n1", "a", "old", "n2"])
    assert ids == {"old": 7, "a": 2, "n1": 8, "n2": 9}
    assert len(set(ids.values())) == len(ids)


def test_ids_stay_unique_over_many_changes() -> None:
    ids: dict[str, int] = {}
    history: list[dict[str, int]] = []
    rounds = [["a", "b"], ["b", "c"], ["c", "d", "e"], ["a", "e"], ["f"], ["e", "f", "g"]]
    for names in rounds:
        before = ids
        ids = assign_workload_ids(ids, names)
        history.append(ids)
        assert sorted(ids) == sorted(set(names))
        assert len(set(ids.values())) == len(ids)
        for name in names:
            if name in before:
                assert ids[name] == before[name]
        assert min(ids.values(), default=1) >= 1
    # "e" was gone in the round before, so it comes back with a fresh id.
    assert history[-1] == {"f": 7, "e": 8, "g": 9}
    assert history[3] == {"a": 6, "e": 5}


def test_assign_does_not_mutate_known() -> None:
    known = {"a": 1}
    assign_workload_ids(known, ["b"])
    assert known == {"a": 1}


# --- capture_destinations -------------------------------------------------------------


def test_capture_destinations_are_vip_ports_and_endpoint_addresses() -> None:
    assert capture_destinations(node_config()) == {
        ("240.0.0.1", 80),
        ("240.0.0.1", 443),
        ("198.18.0.12", 8080),
        ("198.18.0.12", 8443),
        ("240.0.0.2", 80),
        ("198.18.0.11", 8080),
        ("240.0.0.3", 5432),
    }


def test_capture_destinations_do_not_include_target_ports_on_the_vip() -> None:
    dests = capture_destinations(node_config())
    assert ("240.0.0.1", 8080) not in dests
    assert ("240.0.0.1", 8443) not in dests


def test_capture_destinations_tolerates_missing_lists_and_string_ports() -> None:
    cfg = node_config()
    cfg.services = [
        {"name": "bare", "namespace": "default", "vip": "240.0.0.9"},
        {"name": "s", "namespace": "default", "vip": "240.0.0.8", "ports": [{"port": "81"}]},
    ]
    assert capture_destinations(cfg) == {("240.0.0.8", 81)}


def test_no_services_no_capture() -> None:
    cfg = node_config()
    cfg.services = []
    assert capture_destinations(cfg) == set()


# --- ztunnel_snapshot -----------------------------------------------------------------


def test_snapshot_document() -> None:
    cfg = node_config()
    ids = {"web": 3, "batch": 5}
    certs = {"web": CertFiles(Path("/certs/web.pem"), Path("/certs/web.key"))}
    doc = ztunnel_snapshot(cfg, ids, certs, "/certs/bundle.pem")
    assert doc["schema"] == SCHEMA
    assert doc["version"] == 12
    assert doc["node"] == {"name": "node1", "ip": "198.18.0.11", "zone": "z1"}
    assert doc["trust_domain"] == "cluster.local"
    assert doc["trust_bundle"] == "/certs/bundle.pem"
    assert doc["bpf_pin_dir"] == "/sys/fs/bpf/meshnode/node1"
    assert doc["workloads"] == [
        {
            "id": 3,
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
            "id": 5,
            "name": "batch",
            "namespace": "jobs",
            "service_account": "batch-runner",
            "node": "node1",
            "address": "198.18.0.11",
            "port": 7000,
            "service": "",
            "cert": None,
            "key": None,
        },
    ]
    # The services go out in their full form: defaults written (the contract's to_json).
    assert doc["services"] == [
        {
            **svc,
            "ports": [
                {"port": p["port"], "target_port": p.get("target_port", p["port"])}
                for p in svc["ports"]
            ],
            "endpoints": [{**e, "service_port": 0, "version": ""} for e in svc["endpoints"]],
        }
        for svc in SERVICES
    ]
    json.dumps(doc)  # written as JSON by the agent


def test_snapshot_parses_with_parse_snapshot() -> None:
    cfg = node_config()
    ids = assign_workload_ids({}, [w.name for w in cfg.workloads])
    certs = {
        "web": CertFiles(Path("/c/web.pem"), Path("/c/web.key")),
        "batch": CertFiles(Path("/c/batch.pem"), Path("/c/batch.key")),
    }
    state = parse_snapshot(json.loads(json.dumps(ztunnel_snapshot(cfg, ids, certs, "/c/b.pem"))))
    assert state.version == 12
    assert state.node.name == "node1"
    assert sorted(state.workloads_by_id) == [1, 2]
    web = state.find_local_workload(ids["web"])
    batch = state.find_local_workload(ids["batch"])
    assert web is not None and batch is not None
    assert web.identity == SpiffeId("cluster.local", "default", "web")
    assert batch.identity == SpiffeId("cluster.local", "jobs", "batch-runner")
    assert (web.address, web.port, web.cert_path, web.key_path) == (
        "198.18.0.11",
        8080,
        "/c/web.pem",
        "/c/web.key",
    )
    assert state.find_local_by_addr("198.18.0.11", 7000) == batch
    assert set(state.local_identities()) == {web.identity, batch.identity}
    assert sorted(state.services_by_vip) == ["240.0.0.1", "240.0.0.2", "240.0.0.3"]
    assert state.find_endpoint_by_addr("198.18.0.12", 8443) is not None


def test_snapshot_with_no_workloads_parses() -> None:
    cfg = node_config(workloads=[])
    state = parse_snapshot(ztunnel_snapshot(cfg, {}, {}, "/b.pem"))
    assert state.workloads_by_id == {}
    assert len(state.services_by_vip) == 3


def test_snapshot_needs_an_id_for_every_workload() -> None:
    with pytest.raises(KeyError):
        ztunnel_snapshot(node_config(), {"web": 1}, {}, "/b.pem")
