"""One input for the zone ingress's decision path (ztunnel/ingress.py), checked:
what anyone who reaches the ingress port from another zone can send it.

`one_input(data)`: the first byte chooses how the rest is cut into reads; the
reads go to a `SniPeek` and, if it names a server, the name goes through
`route_server_name` and `connection_labels` against a small zone-b state. Raises
on a finding: an exception escaping them, a result of another type, more bytes
read than the cap, a route to anything but the HBONE port of a node of zone-b
that runs an endpoint of the named service, or metric labels the client chose
for a service this state does not have, or an exception handed to
``sys.unraisablehook`` (a traceback on stderr) other than the non-ASCII server
name that ztunnel quiets (tls.quiet_undecodable_server_names) as it does."""

from __future__ import annotations

import sys
from typing import Any

from meshnode.core.constants import HBONE_PORT
from meshnode.core.identity import ZoneSni
from meshnode.ztunnel.ingress import (
    IngressRoute,
    PeekError,
    Refusal,
    SniPeek,
    connection_labels,
    route_server_name,
)
from meshnode.ztunnel.state import parse_snapshot
from meshnode.ztunnel.tls import quiet_undecodable_server_names

UNRAISABLE: list[str] = []


def _record(unraisable: Any) -> None:
    UNRAISABLE.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value!r}")


sys.unraisablehook = _record
quiet_undecodable_server_names()  # as ztunnel's Proxy.start does

TD = "cluster.local"
MAX = 4096  # a smaller cap than the ingress's, so inputs reach it


def _endpoint(name: str, node: str, ip: str, zone: str, port: int = 8080) -> dict[str, object]:
    return {
        "workload": name,
        "namespace": "default",
        "service_account": "api",
        "node": node,
        "node_ip": ip,
        "address": ip,
        "port": port,
        "zone": zone,
    }


STATE = parse_snapshot(
    {
        "schema": 4,
        "version": 1,
        "node": {"name": "node3", "ip": "10.2.0.3", "zone": "zone-b"},
        "trust_domain": TD,
        "trust_bundle": "/nonexistent",
        "workloads": [],
        "services": [
            {
                "name": "api",
                "namespace": "default",
                "vip": "240.0.0.1",
                "ports": [{"port": 80, "target_port": 8080}],
                "endpoints": [
                    _endpoint("api-1", "node3", "10.2.0.3", "zone-b"),
                    _endpoint("api-2", "node4", "10.2.0.4", "zone-b"),
                    _endpoint("api-a", "node1", "10.1.0.1", "zone-a"),
                ],
                "remote": [
                    {
                        "zone": "zone-c",
                        "ingress_ip": "10.3.0.9",
                        "ingress_port": 15443,
                        "namespace": "default",
                        "service_account": "api",
                        "port": 80,
                    }
                ],
            }
        ],
    }
)
ALLOWED = {("10.2.0.3", HBONE_PORT), ("10.2.0.4", HBONE_PORT)}


def one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 64 + 1  # 1..64-byte reads, or (0) the rest in one read
    body = data[1:]
    reads = [body] if data[0] >= 192 else [body[i : i + step] for i in range(0, len(body), step)]
    peek = SniPeek(MAX)
    result: str | PeekError | None = None
    UNRAISABLE.clear()
    for chunk in reads:
        result = peek.feed(chunk)
        assert peek.size <= MAX, f"read {peek.size} bytes past the {MAX}-byte cap"
        if result is not None:
            break
    assert not UNRAISABLE, f"a traceback on stderr: {UNRAISABLE}"
    assert result is None or isinstance(result, str | PeekError), repr(result)
    if not isinstance(result, str):
        return
    route = route_server_name(STATE, result)
    assert isinstance(route, IngressRoute | Refusal), repr(route)
    sni: ZoneSni | None = None
    if isinstance(route, IngressRoute):
        sni = route.sni
        assert (sni.namespace, sni.service, sni.port, sni.zone) == ("default", "api", 80, "zone-b")
        assert route.targets and set(route.targets) <= ALLOWED, route.targets
    service, namespace, zone = connection_labels(STATE, sni)
    assert service in ("api", "unknown") and namespace in ("default", "unknown"), (service,)
    assert zone in ("zone-b", "other", "unknown"), zone
