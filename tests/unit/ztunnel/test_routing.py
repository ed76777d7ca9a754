"""Table tests of the outbound routing decision, on in-memory state (no sockets)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from meshnode.core.identity import SpiffeId
from meshnode.ztunnel.routing import (
    Chooser,
    RoundRobin,
    Route,
    RouteError,
    build_route,
    format_authority,
)
from meshnode.ztunnel.state import HBONE_PORT, Endpoint, ProxyState, Service, parse_snapshot

TD = "cluster.local"


def _endpoint(
    workload: str,
    node: str,
    node_ip: str,
    address: str,
    port: int,
    namespace: str = "default",
    sa: str | None = None,
) -> dict[str, Any]:
    return {
        "workload": workload,
        "namespace": namespace,
        "service_account": sa or workload,
        "node": node,
        "node_ip": node_ip,
        "address": address,
        "port": port,
        "zone": "z",
    }


SNAPSHOT: dict[str, Any] = {
    "schema": 4,
    "version": 3,
    "node": {"name": "node1", "ip": "198.18.0.11", "zone": "z1"},
    "trust_domain": TD,
    "trust_bundle": "/bundle.pem",
    "bpf_pin_dir": None,
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
            "cert": "/web.pem",
            "key": "/web.key",
        },
        {
            "id": 2,
            "name": "batch",
            "namespace": "jobs",
            "service_account": "batch",
            "node": "node1",
            "address": "198.18.0.11",
            "port": 7000,
            "service": "",
        },
    ],
    "services": [
        {
            "name": "api",
            "namespace": "default",
            "vip": "240.0.0.1",
            "ports": [{"port": 80, "target_port": 8080}],
            "endpoints": [
                _endpoint("api-a", "node2", "198.18.0.12", "198.18.0.12", 8080, sa="api"),
                _endpoint("api-b", "node3", "198.18.0.13", "198.18.0.13", 8080, sa="api"),
                _endpoint("api-c", "node1", "198.18.0.11", "198.18.0.11", 8080, sa="api-local"),
            ],
        },
        {
            "name": "db",
            "namespace": "data",
            "vip": "240.0.0.2",
            "ports": [{"port": 5432}],
            "endpoints": [],
        },
        {
            "name": "split",
            "namespace": "default",
            "vip": "240.0.0.3",
            "ports": [{"port": 80, "target_port": 8080}, {"port": 81, "target_port": 9090}],
            "endpoints": [
                _endpoint("split-a", "node2", "198.18.0.12", "198.18.0.12", 8080),
            ],
        },
        {
            "name": "v6",
            "namespace": "default",
            "vip": "fd00::240:1",
            "ports": [{"port": 443, "target_port": 8443}],
            "endpoints": [
                _endpoint("v6-a", "node4", "fd00::14", "fd00::1:14", 8443),
            ],
        },
        {
            "name": "solo",
            "namespace": "shop",
            "vip": "240.0.0.4",
            "ports": [{"port": 80, "target_port": 3000}],
            "endpoints": [
                _endpoint("cart", "node2", "198.18.0.12", "198.18.0.12", 3000, namespace="shop"),
            ],
        },
    ],
}


@pytest.fixture
def state() -> ProxyState:
    return parse_snapshot(SNAPSHOT)


def first(_service: Service, endpoints: Sequence[Endpoint]) -> Endpoint:
    return endpoints[0]


def pick(workload: str) -> Chooser:
    def choose(_service: Service, endpoints: Sequence[Endpoint]) -> Endpoint:
        return next(e for e in endpoints if e.workload == workload)

    return choose


# (case, workload id, dst ip, dst port, chooser, expected service name or None,
#  authority, next hop, identity (ns, sa), same node)
ROUTES = [
    (
        "vip to remote endpoint",
        1,
        "240.0.0.1",
        80,
        pick("api-a"),
        "api",
        "198.18.0.12:8080",
        ("198.18.0.12", 15008),
        ("default", "api"),
        False,
    ),
    (
        "vip to another remote node",
        2,
        "240.0.0.1",
        80,
        pick("api-b"),
        "api",
        "198.18.0.13:8080",
        ("198.18.0.13", 15008),
        ("default", "api"),
        False,
    ),
    (
        "vip to same-node endpoint",
        1,
        "240.0.0.1",
        80,
        pick("api-c"),
        "api",
        "198.18.0.11:8080",
        ("198.18.0.11", 15008),
        ("default", "api-local"),
        True,
    ),
    (
        "vip with target port mapping",
        1,
        "240.0.0.4",
        80,
        first,
        "solo",
        "198.18.0.12:3000",
        ("198.18.0.12", 15008),
        ("shop", "cart"),
        False,
    ),
    (
        "multi-port vip, port with endpoints",
        1,
        "240.0.0.3",
        80,
        first,
        "split",
        "198.18.0.12:8080",
        ("198.18.0.12", 15008),
        ("default", "split-a"),
        False,
    ),
    (
        "workload address dialled directly",
        1,
        "198.18.0.13",
        8080,
        first,
        None,
        "198.18.0.13:8080",
        ("198.18.0.13", 15008),
        ("default", "api"),
        False,
    ),
    (
        "same-node workload dialled directly",
        2,
        "198.18.0.11",
        8080,
        first,
        None,
        "198.18.0.11:8080",
        ("198.18.0.11", 15008),
        ("default", "api-local"),
        True,
    ),
    (
        "ipv6 vip and endpoint",
        1,
        "fd00::240:1",
        443,
        first,
        "v6",
        "[fd00::1:14]:8443",
        ("fd00::14", 15008),
        ("default", "v6-a"),
        False,
    ),
]


@pytest.mark.parametrize(
    (
        "workload_id",
        "dst_ip",
        "dst_port",
        "choose",
        "service",
        "authority",
        "next_hop",
        "identity",
        "same_node",
    ),
    [pytest.param(*row[1:], id=row[0]) for row in ROUTES],
)
def test_build_route(
    state: ProxyState,
    workload_id: int,
    dst_ip: str,
    dst_port: int,
    choose: Any,
    service: str | None,
    authority: str,
    next_hop: tuple[str, int],
    identity: tuple[str, str],
    same_node: bool,
) -> None:
    route = build_route(state, workload_id, dst_ip, dst_port, choose)
    assert isinstance(route, Route)
    assert route.source is state.workloads_by_id[workload_id]
    assert (route.service.name if route.service else None) == service
    assert route.authority == authority
    assert route.next_hop == next_hop
    assert route.expected_identity == SpiffeId(TD, *identity)
    assert route.expected_identity == route.endpoint.identity
    assert route.same_node is same_node
    assert route.authority == format_authority(route.endpoint.address, route.endpoint.port)


def test_hbone_port_is_15008() -> None:
    assert HBONE_PORT == 15008


@pytest.mark.parametrize(
    ("workload_id", "dst_ip", "dst_port", "message"),
    [
        pytest.param(
            99,
            "240.0.0.1",
            80,
            "workload id 99 is not a workload of node node1",
            id="unknown workload id",
        ),
        pytest.param(
            1,
            "10.9.9.9",
            80,
            "10.9.9.9:80 is neither a service VIP nor a mesh workload",
            id="unknown destination",
        ),
        pytest.param(
            1,
            "198.18.0.12",
            9999,
            "198.18.0.12:9999 is neither a service VIP nor a mesh workload",
            id="known workload ip, unknown port",
        ),
        pytest.param(
            1,
            "240.0.0.1",
            8080,
            "service api.default.mesh (240.0.0.1) has no port 8080",
            id="vip with wrong port (target port is not a service port)",
        ),
        pytest.param(
            1,
            "240.0.0.2",
            5432,
            "service db.data.mesh has no endpoints on port 5432",
            id="service without endpoints",
        ),
        pytest.param(
            1,
            "240.0.0.3",
            81,
            "service split.default.mesh has no endpoints on port 9090",
            id="no endpoint on the mapped target port",
        ),
    ],
)
def test_no_route(
    state: ProxyState, workload_id: int, dst_ip: str, dst_port: int, message: str
) -> None:
    calls: list[str] = []

    def choose(service: Service, endpoints: Sequence[Endpoint]) -> Endpoint:
        calls.append(service.name)
        return endpoints[0]

    with pytest.raises(RouteError) as info:
        build_route(state, workload_id, dst_ip, dst_port, choose)
    assert str(info.value) == message
    assert calls == []


def test_chooser_sees_only_endpoints_on_the_target_port(state: ProxyState) -> None:
    seen: list[tuple[str, list[str]]] = []

    def choose(service: Service, endpoints: Sequence[Endpoint]) -> Endpoint:
        seen.append((service.name, [e.workload for e in endpoints]))
        return endpoints[-1]

    route = build_route(state, 1, "240.0.0.1", 80, choose)
    assert seen == [("api", ["api-a", "api-b", "api-c"])]
    assert route.endpoint.workload == "api-c"


def test_round_robin_spreads_evenly_over_three_endpoints(state: ProxyState) -> None:
    rr = RoundRobin()
    picks = [build_route(state, 1, "240.0.0.1", 80, rr).endpoint.workload for _ in range(300)]
    assert Counter(picks) == {"api-a": 100, "api-b": 100, "api-c": 100}
    assert picks[:6] == ["api-a", "api-b", "api-c", "api-a", "api-b", "api-c"]


def test_round_robin_counts_per_service(state: ProxyState) -> None:
    rr = RoundRobin()
    assert build_route(state, 1, "240.0.0.1", 80, rr).endpoint.workload == "api-a"
    # Another service does not advance api's counter.
    assert build_route(state, 1, "240.0.0.4", 80, rr).endpoint.workload == "cart"
    assert build_route(state, 1, "240.0.0.4", 80, rr).endpoint.workload == "cart"
    assert build_route(state, 1, "240.0.0.1", 80, rr).endpoint.workload == "api-b"


@pytest.mark.parametrize(
    ("ip", "port", "expected"),
    [
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("198.18.0.12", 65535, "198.18.0.12:65535"),
        ("::1", 80, "[::1]:80"),
        ("fd00::1:14", 8443, "[fd00::1:14]:8443"),
        ("2001:db8::ffff:10.0.0.1", 15008, "[2001:db8::ffff:10.0.0.1]:15008"),
    ],
)
def test_format_authority(ip: str, port: int, expected: str) -> None:
    assert format_authority(ip, port) == expected
