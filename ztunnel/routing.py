"""The outbound routing decision, free of I/O: given who connected (the source
workload, from the BPF record) and where to (the original destination), decide
which endpoint, which peer node, which inner authority and which identity the
peer must prove. Table-tested in tests/unit/ztunnel/test_routing.py."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import SpiffeId
from meshnode.ztunnel.hbone import format_authority
from meshnode.ztunnel.state import HBONE_PORT, Endpoint, ProxyState, Service, Workload


class RouteError(MeshnodeError):
    """No route for this connection; the message says why (logged, client closed)."""


@dataclass(frozen=True, slots=True)
class Route:
    source: Workload
    service: Service | None  # None when the client dialled a workload address directly
    endpoint: Endpoint
    authority: str  # CONNECT :authority, "ip:port" of the destination workload
    next_hop: tuple[str, int]  # the destination node's HBONE listener
    expected_identity: SpiffeId
    same_node: bool
    sni: str = ""  # TLS SNI when it is not the expected identity's (a zone SNI)


Chooser = Callable[[Service, Sequence[Endpoint]], Endpoint]


class RoundRobin:
    """A plain endpoint choice, per service. (Latency-aware ZeroLB selection is
    its own module; this is the fallback and the reference.)"""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def __call__(self, service: Service, endpoints: Sequence[Endpoint]) -> Endpoint:
        counter = self._counters.setdefault(service.vip, itertools.count())
        return endpoints[next(counter) % len(endpoints)]


def build_route(
    state: ProxyState, workload_id: int, dst_ip: str, dst_port: int, choose: Chooser
) -> Route:
    source = state.find_local_workload(workload_id)
    if source is None:
        raise RouteError(f"workload id {workload_id} is not a workload of node {state.node.name}")
    service = state.find_service_by_vip(dst_ip)
    if service is not None:
        target_port = service.target_port(dst_port)
        if target_port is None:
            raise RouteError(f"service {service.hostname} ({dst_ip}) has no port {dst_port}")
        candidates = [
            e
            for e in service.endpoints
            if (e.service_port == dst_port if e.service_port else e.port == target_port)
        ]
        if not candidates:
            raise RouteError(f"service {service.hostname} has no endpoints on port {target_port}")
        endpoint = choose(service, candidates)
    else:
        found = state.find_endpoint_by_addr(dst_ip, dst_port)
        if found is None:
            raise RouteError(f"{dst_ip}:{dst_port} is neither a service VIP nor a mesh workload")
        endpoint = found
    if endpoint.remote:  # another zone: through its ingress, the tunnel names the service
        return Route(
            source=source,
            service=service,
            endpoint=endpoint,
            authority=f"{endpoint.sni}:{endpoint.port}",
            next_hop=(endpoint.node_ip, endpoint.hop_port),
            expected_identity=endpoint.identity,
            same_node=False,
            sni=endpoint.sni,
        )
    return Route(
        source=source,
        service=service,
        endpoint=endpoint,
        authority=format_authority(endpoint.address, endpoint.port),
        next_hop=(endpoint.node_ip, HBONE_PORT),
        expected_identity=endpoint.identity,
        same_node=endpoint.node == state.node.name,
    )
