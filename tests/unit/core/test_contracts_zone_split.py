"""The zone split of a service document (ServiceDoc.zone_split, snapshot schema 4):
written only when there is one, read back unchanged, refused with the field's
path when it is not {zone label: integer >= 0} with a weight > 0."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from meshnode.core.contracts import (
    SNAPSHOT_SCHEMA,
    AddMessage,
    ContractError,
    EndpointDoc,
    NodeDoc,
    ServiceDoc,
    ServicePort,
    Snapshot,
    SnapshotMessage,
    parse_control_message,
)
from meshnode.core.contracts.documents import RemoteZoneDoc

ENDPOINT = EndpointDoc(
    workload="api",
    namespace="default",
    service_account="api",
    node="node2",
    node_ip="198.18.0.12",
    address="198.18.0.12",
    port=8080,
    zone="zone-a",
)
REMOTE = RemoteZoneDoc(
    zone="zone-b",
    ingress_ip="203.0.113.2",
    ingress_port=15443,
    namespace="default",
    service_account="api",
    port=80,
)
SERVICE = ServiceDoc(
    name="api",
    namespace="default",
    vip="240.0.0.1",
    ports=(ServicePort(80, 8080),),
    endpoints=(ENDPOINT,),
    split=(("v1", 90), ("v2", 10)),
    remote=(REMOTE,),
)
ZONED = replace(SERVICE, zone_split=(("zone-a", 80), ("zone-b", 20), ("zone-c", 0)))
SNAPSHOT = Snapshot(
    version=7,
    node=NodeDoc("node1", "198.18.0.11", "zone-a"),
    trust_domain="cluster.local",
    trust_bundle="/c/b.pem",
    services=(ZONED, replace(SERVICE, name="web", vip="240.0.0.2")),
)


def test_schema_is_4() -> None:
    assert SNAPSHOT.to_json()["schema"] == SNAPSHOT_SCHEMA == 4


def test_zone_split_is_written_in_order_and_read_back() -> None:
    doc = ZONED.to_json()
    assert doc["zone_split"] == {"zone-a": 80, "zone-b": 20, "zone-c": 0}
    assert list(doc["zone_split"]) == ["zone-a", "zone-b", "zone-c"]
    for value in (ZONED, SNAPSHOT, SnapshotMessage(7, SNAPSHOT), AddMessage(8, ZONED)):
        assert type(value).from_json(json.loads(json.dumps(value.to_json()))) == value
    assert parse_control_message(AddMessage(8, ZONED).to_json()) == AddMessage(8, ZONED)


def test_without_a_zone_split_the_document_is_todays() -> None:
    # Byte for byte what a service document was before zone splits existed.
    assert json.dumps(SERVICE.to_json()) == (
        '{"name": "api", "namespace": "default", "vip": "240.0.0.1", "ports": [{"port": 80, '
        '"target_port": 8080}], "endpoints": [{"workload": "api", "namespace": "default", '
        '"service_account": "api", "node": "node2", "node_ip": "198.18.0.12", "address": '
        '"198.18.0.12", "zone": "zone-a", "port": 8080, "service_port": 0, "version": ""}], '
        '"split": {"v1": 90, "v2": 10}, "remote": [{"zone": "zone-b", "ingress_ip": '
        '"203.0.113.2", "ingress_port": 15443, "namespace": "default", "service_account": '
        '"api", "port": 80, "version": "", "endpoints": 1}]}'
    )
    assert ServiceDoc.from_json(SERVICE.to_json()).zone_split == ()
    absent_forms: list[dict[str, Any]] = [{}, {"zone_split": None}, {"zone_split": {}}]
    for absent in absent_forms:
        assert ServiceDoc.from_json({**SERVICE.to_json(), **absent}) == SERVICE


def test_an_older_snapshot_is_refused_with_the_reason() -> None:
    doc = SNAPSHOT.to_json()
    doc["schema"] = 3
    with pytest.raises(ContractError, match="snapshot schema 3 is not 4; run the same meshnode"):
        Snapshot.from_json(doc)


@pytest.mark.parametrize(
    ("zone_split", "message"),
    [
        (["zone-a"], "service.zone_split: expected dict, got ['zone-a']"),
        ({"zone-a": -1}, "service.zone_split.zone-a: weight must be an integer >= 0"),
        ({"zone-a": 1.0}, "service.zone_split.zone-a: weight must be an integer >= 0"),
        ({"zone-a": False}, "service.zone_split.zone-a: weight must be an integer >= 0"),
        ({"zone-a": "1"}, "service.zone_split.zone-a: weight must be an integer >= 0"),
        ({"Zone-A": 1}, "service.zone_split.Zone-A: 'Zone-A' is not a DNS label"),
        (
            {"v1.2": 1},
            "service.zone_split.v1.2: 'v1.2' is not a DNS label",
        ),  # a version, not a zone
        ({"zone-a": 0, "zone-b": 0}, "service.zone_split: the weights add up to 0"),
    ],
)
def test_bad_zone_splits_are_refused_naming_the_field(zone_split: Any, message: str) -> None:
    with pytest.raises(ContractError) as info:
        ServiceDoc.from_json({**SERVICE.to_json(), "zone_split": zone_split})
    assert str(info.value) == message or str(info.value).startswith(message)


def test_a_misspelt_field_is_refused() -> None:
    with pytest.raises(ContractError, match="unknown field 'zone_splits'"):
        ServiceDoc.from_json({**SERVICE.to_json(), "zone_splits": {"zone-a": 1}})
