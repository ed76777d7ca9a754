"""The zone sync contract (core/contracts/zone.py): a zone's ZoneState up to the
global, the global's ZoneConfig / ZoneUnchanged down to a zone.

Every document survives to_json -> JSON text -> from_json unchanged; every
refusal names the field's path; a zone without an ingress publishes nothing; the
services come out in one order whatever the sender's; and the answer of the long
poll is told apart by its shape."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from meshnode.core.contracts import ContractError
from meshnode.core.contracts.documents import RemoteZoneDoc
from meshnode.core.contracts.zone import (
    MAX_ZONE_SERVICES,
    ZoneConfig,
    ZoneService,
    ZoneState,
    ZoneUnchanged,
    parse_zone_answer,
)
from meshnode.core.resources import AuthorizationPolicy, IdentityGrant, Rule, Source

API = ZoneService("default", "api", 80, "api", 2)
WEB = ZoneService("default", "web", 8080, "web-sa", 1)
DB = ZoneService("other", "db", 5432, "db", 3)
STATE = ZoneState("zone-b", 42, "203.0.113.2", 15443, (API, WEB, DB))
POLICY = AuthorizationPolicy(
    name="deny-bad",
    namespace="default",
    action="DENY",
    rules=(Rule(from_=Source(principals=("spiffe://cluster.local/ns/default/sa/bad",))),),
)
GRANT = IdentityGrant(name="zone-b-api", zones=("zone-b",), identities=("default/api",))
CONFIG = ZoneConfig(
    revision=7,
    trust_domain="cluster.local",
    trust_bundle="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    resources=(POLICY, GRANT),
    zones=(
        ZoneState("zone-b", 42, "203.0.113.2", 15443, (API, WEB)),
        ZoneState("zone-c", 0, "", 0, ()),
    ),
)


def _through_text(doc: dict[str, Any]) -> Any:
    return json.loads(json.dumps(doc))


# --- round trips ----------------------------------------------------------------------


def test_zone_state_round_trips() -> None:
    back = ZoneState.from_json(_through_text(STATE.to_json()))
    # from_json sorts the services by (namespace, name): API, WEB (default), DB (other).
    assert back == ZoneState("zone-b", 42, "203.0.113.2", 15443, (API, WEB, DB))
    assert back.to_json() == STATE.to_json()
    assert ZoneState.from_json(_through_text(back.to_json())) == back


def test_zone_state_without_services_round_trips() -> None:
    state = ZoneState("zone-c", 0, "", 0)
    assert state.to_json()["services"] == []
    assert ZoneState.from_json(_through_text(state.to_json())) == state
    # `services` absent or null: none.
    doc = state.to_json()
    del doc["services"]
    assert ZoneState.from_json(doc) == state
    assert ZoneState.from_json({**state.to_json(), "services": None}) == state


def test_zone_config_round_trips_with_resources() -> None:
    text = json.dumps(CONFIG.to_json())
    back = ZoneConfig.from_json(json.loads(text))
    assert back == CONFIG
    assert back.resources[0] == POLICY and isinstance(back.resources[0], AuthorizationPolicy)
    assert back.resources[1] == GRANT and isinstance(back.resources[1], IdentityGrant)
    assert back.to_json() == CONFIG.to_json()
    # parse_zone_answer is the same reader for a config.
    assert parse_zone_answer(json.loads(text)) == CONFIG


def test_zone_unchanged_round_trips() -> None:
    answer = ZoneUnchanged(12)
    assert answer.to_json() == {"revision": 12, "unchanged": True}
    assert ZoneUnchanged.from_json(_through_text(answer.to_json())) == answer
    assert parse_zone_answer(_through_text(answer.to_json())) == answer


def test_ingress_ip_is_normalised() -> None:
    doc = {**STATE.to_json(), "ingress_ip": "FD00::0001"}
    state = ZoneState.from_json(doc)
    assert state.ingress_ip == "fd00::1"
    assert {e.ingress_ip for e in state.remote_entries().values()} == {"fd00::1"}


# --- refusals -----------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


def _drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return mutate


def _too_many(doc: dict[str, Any]) -> None:
    doc["services"] = [{}] * (MAX_ZONE_SERVICES + 1)  # refused before any is read


def _twice(doc: dict[str, Any]) -> None:
    doc["services"].append(copy.deepcopy(doc["services"][0]))


STATE_REFUSED = [
    ("unknown field", _set(("region",), "eu"), "state: unknown field 'region'"),
    (
        "unknown service field",
        _set(("services", 1, "weight"), 3),
        "state.services[1]: unknown field 'weight'",
    ),
    ("missing zone", _drop(("zone",)), "state: missing field 'zone'"),
    ("negative generation", _set(("generation",), -1), "state.generation: -1 is negative"),
    ("generation type", _set(("generation",), "1"), "state.generation: expected int, got '1'"),
    ("generation bool", _set(("generation",), True), "state.generation: expected int, got True"),
    (
        "ingress port too high",
        _set(("ingress_port",), 65536),
        "state.ingress_port: 65536 is outside 0-65535",
    ),
    (
        "ingress port negative",
        _set(("ingress_port",), -1),
        "state.ingress_port: -1 is outside 0-65535",
    ),
    (
        "bad ingress ip with a port",
        _set(("ingress_ip",), "zone-b.example"),
        "state.ingress_ip: 'zone-b.example' is not an IP address",
    ),
    (
        "empty ingress ip with a port",
        _set(("ingress_ip",), ""),
        "state.ingress_ip: '' is not an IP address",
    ),
    ("zone label", _set(("zone",), "Zone_B"), "state.zone: 'Zone_B' is not a DNS label"),
    ("services type", _set(("services",), {}), "state.services: expected list, got {}"),
    (
        "too many services",
        _too_many,
        f"state.services: {MAX_ZONE_SERVICES + 1} services, more than {MAX_ZONE_SERVICES}",
    ),
    ("duplicate service", _twice, "state.services: a service is listed twice"),
    (
        "no endpoints",
        _set(("services", 0, "endpoints"), 0),
        "state.services[0].endpoints: 0 is not a count of endpoints >= 1",
    ),
    (
        "negative endpoints",
        _set(("services", 2, "endpoints"), -4),
        "state.services[2].endpoints: -4 is not a count of endpoints >= 1",
    ),
    (
        "endpoints type",
        _set(("services", 0, "endpoints"), 1.5),
        "state.services[0].endpoints: expected int, got 1.5",
    ),
    (
        "service name label",
        _set(("services", 1, "name"), "Web"),
        "state.services[1].name: 'Web' is not a DNS label",
    ),
    (
        "namespace label",
        _set(("services", 2, "namespace"), "-other"),
        "state.services[2].namespace: '-other' is not a DNS label",
    ),
    (
        "service account label",
        _set(("services", 0, "service_account"), "api/sa"),
        "state.services[0].service_account: 'api/sa' is not a DNS label",
    ),
    (
        "service port",
        _set(("services", 0, "port"), 0),
        "state.services[0].port: 0 is not a port (an integer 1-65535)",
    ),
    ("service not an object", _set(("services", 0), "api"), "state.services[0]: expected dict"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [pytest.param(m, msg, id=name) for name, m, msg in STATE_REFUSED]
)
def test_zone_state_refusals_name_the_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = STATE.to_json()
    ZoneState.from_json(copy.deepcopy(doc))  # the unchanged document is fine
    mutate(doc)
    with pytest.raises(ContractError) as info:
        ZoneState.from_json(doc)
    assert message in str(info.value)


def test_exactly_max_zone_services_is_accepted() -> None:
    services = [
        ZoneService("default", f"s{i}", 80, "sa", 1).to_json() for i in range(MAX_ZONE_SERVICES)
    ]
    doc = {**STATE.to_json(), "services": services}
    assert len(ZoneState.from_json(doc).services) == MAX_ZONE_SERVICES


def test_zone_service_refusal_keeps_the_path_given() -> None:
    with pytest.raises(ContractError) as info:
        ZoneService.from_json({**API.to_json(), "endpoints": 0}, "x.services[3]")
    assert str(info.value).startswith("x.services[3].endpoints: 0 is not a count")


CONFIG_REFUSED = [
    ("unknown field", _set(("mode",), "global"), "config: unknown field 'mode'"),
    ("negative revision", _set(("revision",), -1), "config.revision: -1 is negative"),
    ("missing revision", _drop(("revision",)), "config: missing field 'revision'"),
    ("trust domain", _set(("trust_domain",), "Cluster Local"), "config.trust_domain: "),
    ("trust domain type", _set(("trust_domain",), 5), "config.trust_domain: expected str, got 5"),
    ("trust bundle type", _set(("trust_bundle",), ["pem"]), "config.trust_bundle: expected str"),
    (
        "resource kind",
        _set(("resources", 1, "kind"), "RemoteZone"),
        'config.resources[1]: kind: unknown kind "RemoteZone"',
    ),
    (
        "resource spec",
        _set(("resources", 0, "spec", "action"), "MAYBE"),
        'config.resources[0]: spec.action: "MAYBE" is not one of ALLOW, DENY',
    ),
    (
        "grant without a node or zone",
        _drop(("resources", 1, "spec", "zones")),
        "config.resources[1]: spec: name at least one node or zone the grant is for",
    ),
    (
        "a zone's state",
        _set(("zones", 0, "services", 0, "endpoints"), 0),
        "config.zones[0].services[0].endpoints: 0 is not a count of endpoints >= 1",
    ),
    (
        "a zone's ingress",
        _set(("zones", 0, "ingress_port"), 70000),
        "config.zones[0].ingress_port: 70000 is outside 0-65535",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [pytest.param(m, msg, id=name) for name, m, msg in CONFIG_REFUSED]
)
def test_zone_config_refusals_name_the_field(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = CONFIG.to_json()
    mutate(doc)
    with pytest.raises(ContractError) as info:
        ZoneConfig.from_json(doc)
    assert message in str(info.value)
    with pytest.raises(ContractError) as again:
        parse_zone_answer(doc)
    assert message in str(again.value)


def test_a_valid_trust_domain_is_kept_as_given() -> None:
    doc = {**CONFIG.to_json(), "trust_domain": "mesh.example.org"}
    assert ZoneConfig.from_json(doc).trust_domain == "mesh.example.org"


# --- ingress and remote entries -----------------------------------------------------


@pytest.mark.parametrize("ip", ["203.0.113.2", "", "not an address"])
def test_no_ingress_port_means_no_ingress_ip_and_no_remote_entries(ip: str) -> None:
    doc = {**STATE.to_json(), "ingress_ip": ip, "ingress_port": 0}
    state = ZoneState.from_json(doc)
    assert state.ingress_ip == ""
    assert state.ingress_port == 0
    assert len(state.services) == 3  # still listed, only not reachable
    assert state.remote_entries() == {}


def test_ingress_ip_may_be_absent_without_a_port() -> None:
    doc = {**STATE.to_json(), "ingress_port": 0}
    del doc["ingress_ip"]
    assert ZoneState.from_json(doc).ingress_ip == ""


def test_remote_entries_one_per_service_with_the_zones_ingress() -> None:
    entries = STATE.remote_entries()
    assert entries == {
        ("default", "api"): RemoteZoneDoc(
            zone="zone-b",
            ingress_ip="203.0.113.2",
            ingress_port=15443,
            namespace="default",
            service_account="api",
            port=80,
            endpoints=2,
        ),
        ("default", "web"): RemoteZoneDoc(
            zone="zone-b",
            ingress_ip="203.0.113.2",
            ingress_port=15443,
            namespace="default",
            service_account="web-sa",
            port=8080,
            endpoints=1,
        ),
        ("other", "db"): RemoteZoneDoc(
            zone="zone-b",
            ingress_ip="203.0.113.2",
            ingress_port=15443,
            namespace="other",
            service_account="db",
            port=5432,
            endpoints=3,
        ),
    }
    # Each is a valid remote entry of a service document, as a node reads it.
    for entry in entries.values():
        assert RemoteZoneDoc.from_json(_through_text(entry.to_json())) == entry
        assert entry.version == ""


def test_services_come_out_sorted_whatever_the_input_order() -> None:
    services = [
        ZoneService("zeta", "a", 80, "a", 1),
        ZoneService("alpha", "zz", 80, "zz", 1),
        ZoneService("alpha", "b", 80, "b", 1),
        ZoneService("beta", "a", 80, "a", 1),
        ZoneService("alpha", "a-1", 80, "a", 1),
    ]
    want = [("alpha", "a-1"), ("alpha", "b"), ("alpha", "zz"), ("beta", "a"), ("zeta", "a")]
    for order in (services, services[::-1], services[2:] + services[:2]):
        doc = {**STATE.to_json(), "services": [s.to_json() for s in order]}
        state = ZoneState.from_json(doc)
        assert [s.key for s in state.services] == want
        assert list(state.remote_entries()) == want
        assert ZoneState.from_json(state.to_json()) == state  # sorted stays sorted


# --- the long poll's answer ---------------------------------------------------------


def test_parse_zone_answer_tells_unchanged_from_config() -> None:
    assert isinstance(parse_zone_answer({"revision": 3, "unchanged": True}), ZoneUnchanged)
    assert parse_zone_answer({"revision": 3, "unchanged": True}) == ZoneUnchanged(3)
    config = parse_zone_answer(CONFIG.to_json())
    assert isinstance(config, ZoneConfig) and config.revision == 7
    # An empty config is a config (every list optional), not an unchanged answer.
    empty = {"revision": 0, "trust_domain": "cluster.local", "trust_bundle": ""}
    assert parse_zone_answer(empty) == ZoneConfig(0, "cluster.local", "", (), ())


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"revision": 3, "unchanged": False}, "config.unchanged: expected true"),
        ({"revision": 3, "unchanged": 1}, "config.unchanged: expected true"),
        ({"revision": -2, "unchanged": True}, "config.revision: -2 is negative"),
        ({"unchanged": True}, "config: missing field 'revision'"),
        (
            {"revision": 3, "unchanged": True, "zones": []},
            "config: unknown field 'zones'",
        ),
        ({**CONFIG.to_json(), "unchanged": True}, "config: unknown field 'resources'"),
        ({"revision": 3}, "config: missing field 'trust_domain'"),
        ([], "config: expected dict, got []"),
    ],
)
def test_parse_zone_answer_refusals(doc: Any, message: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_zone_answer(doc)
    assert message in str(info.value)


def test_parse_zone_answer_uses_the_path_given() -> None:
    with pytest.raises(ContractError) as info:
        parse_zone_answer({"revision": -1, "unchanged": True}, "answer")
    assert str(info.value).startswith("answer.revision: -1 is negative")
