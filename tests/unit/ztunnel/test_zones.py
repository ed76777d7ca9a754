"""Crossing zones on loopback, real TLS: node1 is in zone-a, node2 in zone-b.
node1 knows `api` only as a remote zone entry (zone-b, behind an ingress at
node2's HBONE port here: an ingress forwards raw bytes, so talking to the node
directly with the zone SNI is the same TLS conversation). The tunnel names the
service by its zone SNI; node2 picks the local endpoint, presents api's
certificate, checks the caller's identity and authorization as for any
tunnel."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meshnode.core.identity import SpiffeId, ZoneSni
from meshnode.core.logbudget import LogBudget
from meshnode.ztunnel import tls
from meshnode.ztunnel.hbone import split_authority
from meshnode.ztunnel.inbound import zone_endpoint
from meshnode.ztunnel.state import parse_snapshot
from meshnode.ztunnel.tls import zone_identities
from tests.support.mesh import TD, build_mesh, client_hello, connect_as, split_zones

N1, N2 = "127.0.0.2", "127.0.0.3"
API_SNI = ZoneSni("api", "default", 80, "zone-b", TD)
WEB = SpiffeId(TD, "default", "web")


def run(coro_fn: Callable[[Path], Awaitable[Any]], tmp: Path) -> Any:
    return uvloop.run(asyncio.wait_for(coro_fn(tmp), 60))


def _remote(port: int = 80, zone: str = "zone-b", ingress: str = N2) -> dict[str, Any]:
    return {
        "zone": zone,
        "ingress_ip": ingress,
        "ingress_port": 15008,
        "namespace": "default",
        "service_account": "api",
        "port": port,
        "endpoints": 1,
    }


async def _start(tmp: Path, handler: Any, port: int, **kw: Any) -> Any:
    server = await asyncio.start_server(handler, N2, port)
    nodes = build_mesh(tmp, port, base_port=26100 + (port % 50) * 40)
    split_zones(nodes, (N2, 15008), **kw)
    for n in nodes.values():
        await n.proxy.start()
    return server, nodes


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _stop(server: Any, nodes: Any) -> None:
    server.close()
    for n in nodes.values():
        await n.proxy.drain()


def _opened(pi: Any, reporter: str) -> dict[str, float]:
    """source principal -> connections opened, as `reporter` counted them."""
    out: dict[str, float] = {}
    for labels, v in pi.metrics.opened.values.items():
        if labels[0] == reporter:
            out[labels[3]] = out.get(labels[3], 0) + v
    return out


def test_a_call_crosses_zones_by_service_with_the_callers_proven_identity(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        server, nodes = await _start(tmp, _echo, 18251)
        r, w = await connect_as(nodes["node1"], 1)
        w.write(b"hello zone-b")
        assert await asyncio.wait_for(r.readexactly(12), 10) == b"hello zone-b"
        w.close()
        pool = nodes["node1"].proxy.pi.pool
        keys = list(pool._sessions)
        assert [k.server_name for k in keys] == [API_SNI.name]
        assert keys[0].peer == (N2, 15008)
        # node2 delivered it and saw web's certificate, not a claim.
        assert _opened(nodes["node2"].proxy.pi, "destination") == {WEB.uri: 1}
        await _stop(server, nodes)

    run(main, tmp_path)


def test_local_zone_first_then_failover_to_the_remote_zone(tmp_path: Path) -> None:
    """The zone-a endpoint is dead (nothing listens): the connection is retried
    on the remote zone and works; later ones go there at once (ejected)."""
    with socket.socket() as s:
        s.bind((N1, 0))
        dead_port = s.getsockname()[1]

    async def main(tmp: Path) -> None:
        server, nodes = await _start(tmp, _echo, 18252, local_api_port=dead_port)
        picker = nodes["node1"].proxy.pi.picker
        for i in range(5):
            r, w = await connect_as(nodes["node1"], 1)
            w.write(b"x%d" % i)
            assert await asyncio.wait_for(r.readexactly(2), 10) == b"x%d" % i
            w.close()
        health = picker.health(time.monotonic())
        assert any(ejected for (addr, _), (ejected, _) in health.items() if addr == N1)
        assert _opened(nodes["node2"].proxy.pi, "destination") == {WEB.uri: 5}
        await _stop(server, nodes)

    run(main, tmp_path)


def test_the_destination_still_enforces_authorization(tmp_path: Path) -> None:
    deny = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-web", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{"from": {"principals": [WEB.uri]}}]},
    }

    async def main(tmp: Path) -> None:
        server, nodes = await _start(tmp, _echo, 18253, policies=[deny])
        r, w = await connect_as(nodes["node1"], 1)
        w.write(b"x")
        with pytest.raises(ConnectionResetError):  # refused: the client gets a reset
            await asyncio.wait_for(r.read(), 10)
        w.close()
        assert _opened(nodes["node2"].proxy.pi, "destination") == {}
        assert nodes["node2"].proxy.pi.metrics.denied.get(("default/no-web", "api")) == 1
        await _stop(server, nodes)

    run(main, tmp_path)


def _tls_client_ctx(tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(tmp / "bundle.pem"))
    ctx.load_cert_chain(str(tmp / "web.pem"), str(tmp / "web-key.pem"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


@pytest.mark.parametrize(
    "sni",
    [
        ZoneSni("api", "default", 80, "zone-a", TD).name,  # node2 is in zone-b
        ZoneSni("nope", "default", 80, "zone-b", TD).name,  # no such service
        ZoneSni("api", "default", 81, "zone-b", TD).name,  # no such port
        "api.default.80.zone-b.mz.other.domain",  # another trust domain
    ],
)
def test_the_destination_refuses_a_zone_sni_it_does_not_serve(
    tmp_path: Path, sni: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "_REFUSALS", LogBudget())  # a fresh log budget
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    tls_log = logging.getLogger("meshnode.ztunnel.tls")
    tls_log.addHandler(handler)

    async def main(tmp: Path) -> None:
        server, nodes = await _start(tmp, _echo, 18254)
        ctx = _tls_client_ctx(tmp)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection(N2, 15008, ssl=ctx, server_hostname=sni)
        good = API_SNI.name  # the same client, with a zone SNI node2 serves: accepted
        _, w = await asyncio.open_connection(N2, 15008, ssl=ctx, server_hostname=good)
        w.close()
        await _stop(server, nodes)

    try:
        run(main, tmp_path)
    finally:
        tls_log.removeHandler(handler)
    refused = [m for m in seen if "TLS handshake refused" in m]
    assert refused == [
        f"inbound TLS handshake refused: no workload or service {sni!r} on this node"
    ]


# --- pure decisions -------------------------------------------------------------------


def _state(tmp: Path, zone: str = "zone-b", port: int = 8080) -> Any:
    (tmp / "api.pem").write_text("x")
    return parse_snapshot(
        {
            "schema": 4,
            "version": 1,
            "node": {"name": "node2", "ip": N2, "zone": zone},
            "trust_domain": TD,
            "trust_bundle": str(tmp / "bundle.pem"),
            "workloads": [
                {
                    "id": 1,
                    "name": "api",
                    "namespace": "default",
                    "service_account": "api",
                    "node": "node2",
                    "address": N2,
                    "port": port,
                    "service": "api",
                    "cert": str(tmp / "api.pem"),
                    "key": str(tmp / "api-key.pem"),
                }
            ],
            "services": [
                {
                    "name": "api",
                    "namespace": "default",
                    "vip": "240.0.0.1",
                    "ports": [{"port": 80, "target_port": port}],
                    "endpoints": [
                        {
                            "workload": "api",
                            "namespace": "default",
                            "service_account": "api",
                            "node": "node2",
                            "node_ip": N2,
                            "address": N2,
                            "port": port,
                            "zone": zone,
                        }
                    ],
                    "remote": [_remote(zone="zone-c", ingress="10.9.9.9"), _remote(zone=zone)],
                }
            ],
        }
    )


def test_remote_entries_become_endpoints_behind_their_ingress(tmp_path: Path) -> None:
    state = _state(tmp_path)
    eps = state.services_by_name[("default", "api")].endpoints
    remote = [e for e in eps if e.remote]
    # Our own zone's remote entry is dropped: a zone never reaches itself via an ingress.
    assert [(e.zone, e.node_ip, e.hop_port) for e in remote] == [("zone-c", "10.9.9.9", 15008)]
    assert remote[0].sni == ZoneSni("api", "default", 80, "zone-c", TD).name
    assert remote[0].address not in {a for a, _ in state.endpoints_by_addr}
    assert zone_identities(state) == {("default", "api", 80): SpiffeId(TD, "default", "api")}


def test_zone_endpoint_decision(tmp_path: Path) -> None:
    state = _state(tmp_path)

    class PI:
        pass

    pi: Any = PI()
    pi.state = state
    api = SpiffeId(TD, "default", "api")
    host, port = split_authority(ZoneSni("api", "default", 80, "zone-b", TD).authority)
    found = zone_endpoint(pi, host, port, api)
    assert not isinstance(found, str) and (found.address, found.port) == (N2, 8080)
    assert "not the port" in str(zone_endpoint(pi, host, 81, api))
    assert "identity" in str(zone_endpoint(pi, host, port, WEB))  # connection served web?
    other = ZoneSni("api", "default", 80, "zone-c", TD).name
    assert "zone 'zone-c'" in str(zone_endpoint(pi, other, 80, api))
    gone = ZoneSni("gone", "default", 80, "zone-b", TD).name
    assert "no service" in str(zone_endpoint(pi, gone, 80, api))


def test_hbone_takes_a_zone_sni_authority_and_nothing_else_by_name() -> None:
    from meshnode.ztunnel.hbone import _valid_authority

    assert _valid_authority(API_SNI.authority)
    assert _valid_authority("10.0.0.1:80")
    for bad in (
        "example.com:80",
        "api.default.x.zone-b.mz.td:80",
        "a.b.80.c.mz:80",
        "A.b.80.c.mz.td:80",
    ):
        assert not _valid_authority(bad), bad


def test_a_report_names_a_remote_zone_by_its_sni() -> None:
    from meshnode.core.contracts.report import EndpointHealth

    doc = EndpointHealth("default/api", API_SNI.authority, "ingress/zone-b", True, 1.5).to_dict()
    assert EndpointHealth.from_dict(doc).address == API_SNI.authority


def test_a_non_ascii_server_name_is_one_log_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: anyone who reaches node2's HBONE port sends ClientHellos whose SNI
    is not ASCII. CPython's SNI glue hands that decode error to
    sys.unraisablehook (a traceback on stderr per connection); ztunnel refuses
    the handshake and logs a line instead, and past a burst of 10 lines at most
    one a second."""
    import sys

    monkeypatch.setattr(tls, "_REFUSALS", LogBudget())

    stray: list[Any] = []
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    tls_log = logging.getLogger("meshnode.ztunnel.tls")
    tls_log.addHandler(handler)
    saved = sys.unraisablehook
    sys.unraisablehook = stray.append

    hello = client_hello("nope.default.cluster.local").replace(b"nope.default", b"nope.d\xfffault")

    async def main(tmp: Path) -> None:
        server, nodes = await _start(tmp, _echo, 18255)
        for _ in range(25):
            r, w = await asyncio.open_connection(N2, 15008)
            w.write(hello)
            await asyncio.wait_for(r.read(), 5)  # an alert, then the close
            w.close()
        r, w = await connect_as(nodes["node1"], 1)  # and the node still serves
        w.write(b"ok")
        assert await asyncio.wait_for(r.readexactly(2), 10) == b"ok"
        w.close()
        await _stop(server, nodes)

    try:
        run(main, tmp_path)
    finally:
        sys.unraisablehook = saved
        tls_log.removeHandler(handler)
    assert stray == []
    refused = [m for m in seen if "is not ASCII" in m]
    assert refused[0] == (
        "inbound TLS handshake refused: the server name (SNI) "
        "b'nope.d\\xfffault.cluster.local' is not ASCII"
    )
    assert 10 <= len(refused) <= 13, len(refused)  # not 25
