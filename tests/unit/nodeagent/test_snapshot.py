"""The node agent's pure translation of its node config into ztunnel's snapshot,
workload ids and BPF capture destinations."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.core.resources import ResourceError
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


# --- traffic splits in the snapshot ----------------------------------------------------


def _split(name: str, service: str, **spec: Any) -> dict[str, Any]:
    return {
        "kind": "TrafficSplit",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"service": service, **spec},
    }


def _split_config(resources: list[dict[str, Any]]) -> NodeConfig:
    """node_config(), api with a v1 endpoint and a remote zone entry, and `resources`."""
    cfg = node_config()
    services = copy.deepcopy(SERVICES)
    services[0]["endpoints"][0]["version"] = "v1"
    services[0]["remote"] = [
        {
            "zone": "z3",
            "ingress_ip": "203.0.113.3",
            "ingress_port": 15443,
            "namespace": "default",
            "service_account": "api",
            "port": 80,
            "version": "v1",
            "endpoints": 2,
        }
    ]
    cfg.services = services
    cfg.resources = resources
    return cfg


def _snapshot_of(cfg: NodeConfig) -> dict[str, Any]:
    certs = {"web": CertFiles(Path("/c/web.pem"), Path("/c/web.key"))}
    return ztunnel_snapshot(cfg, {"web": 3, "batch": 5}, certs, "/c/b.pem")


# What the agent wrote for _split_config([a version split of api]) before zone splits
# existed, byte for byte (then under schema 3).
BEFORE_ZONE_SPLITS = (
    '{"schema": 3, "version": 12, "node": {"name": "node1", "zone": "z1", '
    '"ip": "198.18.0.11"}, "trust_domain": "cluster.local", "trust_bundle": "/c/b.pem", '
    '"bpf_pin_dir": "/sys/fs/bpf/meshnode/node1", "workloads": [{"id": 3, "name": "web", '
    '"namespace": "default", "service_account": "web", "node": "node1", '
    '"address": "198.18.0.11", "port": 8080, "service": "web", "cert": "/c/web.pem", '
    '"key": "/c/web.key"}, {"id": 5, "name": "batch", "namespace": "jobs", '
    '"service_account": "batch-runner", "node": "node1", "address": "198.18.0.11", '
    '"port": 7000, "service": "", "cert": null, "key": null}], '
    '"services": [{"name": "api", "namespace": "default", "vip": "240.0.0.1", '
    '"ports": [{"port": 80, "target_port": 8080}, {"port": 443, "target_port": 8443}], '
    '"endpoints": [{"workload": "api", "namespace": "default", "service_account": "api", '
    '"node": "node2", "node_ip": "198.18.0.12", "address": "198.18.0.12", "zone": "z2", '
    '"port": 8080, "service_port": 0, "version": "v1"}, {"workload": "api", '
    '"namespace": "default", "service_account": "api", "node": "node2", '
    '"node_ip": "198.18.0.12", "address": "198.18.0.12", "zone": "z2", "port": 8443, '
    '"service_port": 0, "version": ""}], "split": {"v1": 90, "v2": 10}, '
    '"remote": [{"zone": "z3", "ingress_ip": "203.0.113.3", "ingress_port": 15443, '
    '"namespace": "default", "service_account": "api", "port": 80, "version": "v1", '
    '"endpoints": 2}]}, {"name": "web", "namespace": "default", "vip": "240.0.0.2", '
    '"ports": [{"port": 80, "target_port": 8080}], "endpoints": [{"workload": "web", '
    '"namespace": "default", "service_account": "web", "node": "node1", '
    '"node_ip": "198.18.0.11", "address": "198.18.0.11", "zone": "z1", "port": 8080, '
    '"service_port": 0, "version": ""}]}, {"name": "db", "namespace": "data", '
    '"vip": "240.0.0.3", "ports": [{"port": 5432, "target_port": 5432}], '
    '"endpoints": []}], "policies": [], "authorization_default": "ALLOW", "revoked": [], '
    '"dns_domain": "mesh"}'
)


def test_without_a_zone_split_the_snapshot_is_byte_identical_to_before() -> None:
    cfg = _split_config([_split("api-canary", "api", weights={"v1": 90, "v2": 10})])
    text = json.dumps(_snapshot_of(cfg))
    assert "zone_split" not in text
    # The one difference is the schema number a new field comes with.
    assert text == BEFORE_ZONE_SPLITS.replace('"schema": 3,', f'"schema": {SCHEMA},', 1)


def test_a_zone_split_reaches_its_service_in_the_snapshot() -> None:
    zones = {"z2": 80, "z3": 20, "z1": 0}
    cfg = _split_config([_split("api-zones", "api", zones=zones)])
    doc = _snapshot_of(cfg)
    api, web, db = doc["services"]
    assert api["zone_split"] == zones and list(api["zone_split"]) == ["z2", "z3", "z1"]
    assert "split" not in api  # no version split: none written
    assert "zone_split" not in web and "zone_split" not in db
    # Nothing else of the service changes.
    before = json.loads(BEFORE_ZONE_SPLITS)["services"][0]
    del before["split"]
    assert {k: v for k, v in api.items() if k != "zone_split"} == before
    # ztunnel reads it back: the weights, and the remote entry in its zone.
    state = parse_snapshot(json.loads(json.dumps(doc)))
    svc = state.find_service_by_vip("240.0.0.1")
    assert svc is not None
    assert svc.zone_split == (("z2", 80), ("z3", 20), ("z1", 0))
    assert svc.split == ()
    assert {(e.zone, e.remote) for e in svc.endpoints} == {("z2", False), ("z3", True)}
    web_svc = state.find_service_by_vip("240.0.0.2")
    assert web_svc is not None and web_svc.zone_split == ()


def test_a_zone_split_applies_to_its_namespace_only_and_unknown_services_are_ignored() -> None:
    other_ns = _split("api-zones", "api", zones={"z2": 1})
    other_ns["metadata"]["namespace"] = "shop"
    cfg = _split_config([other_ns, _split("ghost-zones", "ghost", zones={"z2": 1})])
    assert all("zone_split" not in s for s in _snapshot_of(cfg)["services"])


def test_a_bad_zone_split_resource_is_refused_naming_it() -> None:
    cfg = _split_config([_split("api-zones", "api", zones={"Z2": 1})])
    with pytest.raises(ResourceError) as info:
        _snapshot_of(cfg)
    assert str(info.value).startswith(
        "node config: resources[0] (TrafficSplit api-zones): spec.zones.Z2: "
    )
