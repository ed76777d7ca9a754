"""The zone ingress (ztunnel/ingress.py): the SNI peek on real ClientHellos, the
pure routing decision, and the shell on loopback -- a real TLS client through the
ingress to a fake node's HBONE port that is a real (mutual) TLS server, refusals
that close cleanly and are counted, failover to the next node, back-pressure,
half-close, drain -- and, last, the wiring: a zone-a node proxy calling through a
zone-b ztunnel's ingress to its HBONE port. Loopback addresses 127.0.0.40-49;
every port is the kernel's choice."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshnode.core.identity import ZoneSni
from meshnode.ztunnel.config import ConfigError, ZtunnelConfig
from meshnode.ztunnel.ingress import (
    MAX_HELLO,
    REASONS,
    IngressMetrics,
    IngressRoute,
    LogBudget,
    PeekError,
    Refusal,
    RoundRobin,
    SniPeek,
    ZoneIngress,
    connection_labels,
    route_server_name,
    route_zone_sni,
)
from meshnode.ztunnel.metrics import Registry, parse_exposition
from meshnode.ztunnel.state import ProxyState, parse_snapshot
from tests.support.mesh import client_hello

TD = "cluster.local"
ING = "127.0.0.40"
N1, N2, N3 = "127.0.0.41", "127.0.0.42", "127.0.0.43"
API = ZoneSni("api", "default", 80, "zone-b", TD)
LOG = "meshnode.ztunnel.ingress"


# --- ClientHellos ------------------------------------------------------------------


def _records(hello: bytes) -> bytes:
    """The handshake bytes of a flight of TLS records."""
    out, i = b"", 0
    while i < len(hello):
        size = int.from_bytes(hello[i + 3 : i + 5], "big")
        out += hello[i + 5 : i + 5 + size]
        i += 5 + size
    return out


def _frame(handshake: bytes, version: bytes, size: int) -> bytes:
    return b"".join(
        b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (handshake[i : i + size] for i in range(0, len(handshake), size))
    )


def reframe(hello: bytes, size: int) -> bytes:
    """The same ClientHello, its handshake message split over TLS records of
    `size` bytes each (as a TLS stack may send it)."""
    return _frame(_records(hello), hello[1:3], size)


def with_extension(hello: bytes, size: int) -> bytes:
    """A valid ClientHello made `size` bytes longer by an unknown extension
    (ignored by servers), over as many records as it takes."""
    msg = _records(hello)
    body = msg[4:]
    i = 2 + 32  # legacy_version, random
    i += 1 + body[i]  # session id
    i += 2 + int.from_bytes(body[i : i + 2], "big")  # cipher suites
    i += 1 + body[i]  # compression methods
    ext_len = int.from_bytes(body[i : i + 2], "big")
    assert i + 2 + ext_len == len(body)
    extra = (0x7A7A).to_bytes(2, "big") + (size - 4).to_bytes(2, "big") + b"\0" * (size - 4)
    body = body[:i] + (ext_len + size).to_bytes(2, "big") + body[i + 2 :] + extra
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return _frame(msg, hello[1:3], 16384)


HELLO = client_hello(API.name)


# --- SniPeek -------------------------------------------------------------------------


def test_peek_reads_the_zone_sni_of_a_real_client_hello() -> None:
    peek = SniPeek()
    assert peek.feed(HELLO) == API.name
    assert peek.feed(b"anything after") == API.name  # the result stays
    assert peek.size == len(HELLO)


def test_peek_across_tcp_reads_at_every_byte_boundary() -> None:
    for i in range(1, len(HELLO)):
        peek = SniPeek()
        assert peek.feed(HELLO[:i]) is None, i
        assert peek.feed(HELLO[i:]) == API.name, i
    for i in range(1, len(HELLO) - 1, 11):  # three reads
        for j in range(i + 1, len(HELLO), 37):
            peek = SniPeek()
            assert peek.feed(HELLO[:i]) is None and peek.feed(HELLO[i:j]) is None
            assert peek.feed(HELLO[j:]) == API.name, (i, j)
    peek = SniPeek()  # one byte per read
    assert [peek.feed(HELLO[k : k + 1]) for k in range(len(HELLO))][-2:] == [None, API.name]


@pytest.mark.parametrize("size", [1, 7, 64, 300])
def test_peek_across_tls_records(size: int) -> None:
    fragmented = reframe(HELLO, size)
    assert len(fragmented) > len(HELLO)  # really several records
    assert SniPeek().feed(fragmented) == API.name
    for i in range(1, len(fragmented), 5):  # and across reads as well
        peek = SniPeek()
        assert peek.feed(fragmented[:i]) is None
        assert peek.feed(fragmented[i:]) == API.name


def test_a_hello_without_sni_is_refused() -> None:
    result = SniPeek().feed(client_hello(None))
    assert isinstance(result, PeekError) and result.reason == "no_sni"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: api.default.mesh\r\n\r\n",
        b"\x00" * 64,
        os.urandom(8) + b"\xff" * 100,
        b"\x17\x03\x03\x00\x05hello",  # application data, not a handshake
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello where a ClientHello goes
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_bytes_that_are_not_a_client_hello(data: bytes) -> None:
    result = SniPeek().feed(data)
    assert isinstance(result, PeekError) and result.reason == "not_tls", result


def test_an_oversized_hello_hits_the_cap() -> None:
    big = with_extension(HELLO, 20000)
    assert len(big) > MAX_HELLO
    # A valid hello (a larger cap reads its name) ...
    assert SniPeek(64 << 10).feed(big) == API.name
    # ... refused at the default cap, at once or read by read.
    result = SniPeek().feed(big)
    assert isinstance(result, PeekError) and result.reason == "too_large"
    peek = SniPeek()
    results = [peek.feed(big[i : i + 1000]) for i in range(0, len(big), 1000)]
    assert results[MAX_HELLO // 1000 - 1] is None
    assert isinstance(results[MAX_HELLO // 1000], PeekError) and peek.size == MAX_HELLO
    # The cap is exact.
    assert SniPeek(len(HELLO)).feed(HELLO) == API.name
    late = SniPeek(len(HELLO) - 1).feed(HELLO)
    assert isinstance(late, PeekError) and late.reason == "too_large"


# --- routing -------------------------------------------------------------------------


def ep(
    node_ip: str,
    port: int = 8080,
    *,
    service_port: int = 0,
    zone: str = "zone-b",
    sa: str = "api",
) -> dict[str, Any]:
    return {
        "workload": f"api-{node_ip.rsplit('.', 1)[1]}-{port}",
        "namespace": "default",
        "service_account": sa,
        "node": f"node-{node_ip.rsplit('.', 1)[1]}",
        "node_ip": node_ip,
        "address": node_ip,
        "port": port,
        "service_port": service_port,
        "zone": zone,
    }


def remote(zone: str) -> dict[str, Any]:
    return {
        "zone": zone,
        "ingress_ip": "10.9.9.9",
        "ingress_port": 15443,
        "namespace": "default",
        "service_account": "api",
        "port": 80,
        "endpoints": 3,
    }


def make_state(
    endpoints: list[dict[str, Any]],
    *,
    zone: str = "zone-b",
    remotes: tuple[str, ...] = (),
    name: str = "api",
) -> ProxyState:
    node: dict[str, Any] = {"name": "gateway", "ip": ING}
    if zone:
        node["zone"] = zone
    return parse_snapshot(
        {
            "schema": 4,
            "version": 1,
            "node": node,
            "trust_domain": TD,
            "trust_bundle": "/nonexistent/bundle.pem",
            "workloads": [],
            "services": [
                {
                    "name": name,
                    "namespace": "default",
                    "vip": "240.0.0.1",
                    "ports": [{"port": 80, "target_port": 8080}],
                    "endpoints": endpoints,
                    "remote": [remote(z) for z in remotes],
                }
            ],
        }
    )


def refusal(decision: IngressRoute | Refusal) -> str:
    assert isinstance(decision, Refusal), decision
    return decision.reason


def targets(decision: IngressRoute | Refusal) -> tuple[tuple[str, int], ...]:
    assert isinstance(decision, IngressRoute), decision
    return decision.targets


def test_routing_refuses_another_zone() -> None:
    state = make_state([ep(N1)])
    decision = route_zone_sni(state, ZoneSni("api", "default", 80, "zone-c", TD))
    assert refusal(decision) == "wrong_zone" and "zone-c" in decision.detail  # type: ignore[union-attr]
    # A node without a zone serves no zone SNI.
    assert refusal(route_zone_sni(make_state([ep(N1, zone="")], zone=""), API)) == "wrong_zone"


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "api.default.cluster.local",  # a workload SNI
        "api.default.80.zone-b.mz.other.domain",  # another trust domain
        "api.default.http.zone-b.mz.cluster.local",
        "",
    ],
)
def test_routing_refuses_what_is_not_a_zone_sni(name: str) -> None:
    assert refusal(route_server_name(make_state([ep(N1)]), name)) == "bad_sni"


def test_routing_refuses_an_unknown_service() -> None:
    state = make_state([ep(N1)])
    for sni in (
        ZoneSni("web", "default", 80, "zone-b", TD),
        ZoneSni("api", "prod", 80, "zone-b", TD),
    ):
        assert refusal(route_zone_sni(state, sni)) == "unknown_service"


def test_routing_needs_an_endpoint_on_that_port_in_this_zone() -> None:
    state = make_state([ep(N1), ep(N2, 7000, service_port=90)])
    assert refusal(route_zone_sni(state, ZoneSni("api", "default", 81, "zone-b", TD))) == (
        "no_endpoint"
    )
    # An endpoint naming its service port serves that one only.
    assert targets(route_zone_sni(state, ZoneSni("api", "default", 90, "zone-b", TD))) == (
        (N2, 15008),
    )
    assert targets(route_zone_sni(state, API)) == ((N1, 15008),)
    assert refusal(route_zone_sni(make_state([]), API)) == "no_endpoint"


def test_routing_ignores_other_zones_endpoints() -> None:
    # Only remote entries (other zones, behind their ingress): nothing here.
    only_remote = make_state([], remotes=("zone-c", "zone-d"))
    assert [e.remote for e in only_remote.services_by_name[("default", "api")].endpoints] == [
        True,
        True,
    ]
    assert refusal(route_zone_sni(only_remote, API)) == "no_endpoint"
    # Local and remote: the local node only.
    assert targets(route_zone_sni(make_state([ep(N1)], remotes=("zone-c",)), API)) == ((N1, 15008),)
    # A remote endpoint is never a candidate, even one labelled with our zone
    # (the state drops such entries; the decision does not rely on it).
    state = make_state([], remotes=("zone-c",))
    svc = state.services_by_name[("default", "api")]
    (far,) = svc.endpoints
    state.services_by_name[("default", "api")] = dataclasses.replace(
        svc, endpoints=(dataclasses.replace(far, zone="zone-b"),)
    )
    assert refusal(route_zone_sni(state, API)) == "no_endpoint"
    # An endpoint listed by address but labelled with another zone: its node
    # would refuse our zone's SNI.
    assert targets(route_zone_sni(make_state([ep(N1, zone="zone-c"), ep(N2)]), API)) == (
        (N2, 15008),
    )


def test_routing_lists_each_node_once() -> None:
    state = make_state([ep(N1), ep(N2), ep(N1, 8080, service_port=80), ep(N3)])
    assert targets(route_zone_sni(state, API, hbone_port=15999)) == (
        (N1, 15999),
        (N2, 15999),
        (N3, 15999),
    )


def test_routing_keeps_to_the_first_identity_by_name() -> None:
    """The caller expects one identity per zone: nodes that could only present
    another would fail its handshake."""
    state = make_state([ep(N1, sa="zzz"), ep(N2, sa="api"), ep(N3, sa="api")])
    assert targets(route_zone_sni(state, API)) == ((N2, 15008), (N3, 15008))


def test_labels_name_only_what_is_served_here() -> None:
    state = make_state([ep(N1)])
    assert connection_labels(state, API) == ("api", "default", "zone-b")
    assert connection_labels(state, ZoneSni("x", "y", 80, "zone-b", TD)) == (
        "unknown",
        "unknown",
        "zone-b",
    )
    assert connection_labels(state, ZoneSni("api", "default", 80, "zone-q", TD)) == (
        "api",
        "default",
        "other",
    )
    assert connection_labels(state, None) == ("unknown", "unknown", "unknown")


def test_round_robin_per_service_bounded_by_attempts() -> None:
    rr = RoundRobin()
    t = [(N1, 1), (N2, 1), (N3, 1)]
    assert rr.order(API, t, 3) == [(N1, 1), (N2, 1), (N3, 1)]
    assert rr.order(API, t, 3) == [(N2, 1), (N3, 1), (N1, 1)]
    assert rr.order(API, t, 2) == [(N3, 1), (N1, 1)]
    other = ZoneSni("web", "default", 80, "zone-b", TD)
    assert rr.order(other, t, 1) == [(N1, 1)]  # its own rotation
    assert rr.order(API, t[:1], 5) == [(N1, 1)]
    assert rr.order(API, [], 3) == []


def test_log_budget() -> None:
    budget = LogBudget(per_second=1.0, burst=3)
    assert [budget.take("timeout", 100.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("not_tls", 100.0) == 0  # each reason its own
    assert budget.take("timeout", 100.5) is None
    assert budget.take("timeout", 101.1) == 3  # what it left out, said once
    assert budget.take("timeout", 102.2) == 0


def test_every_reason_is_in_the_metric_help() -> None:
    help_text = IngressMetrics(Registry()).refused.family.help
    assert all(reason in help_text for reason in REASONS)


# --- the shell on loopback -----------------------------------------------------------


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return uvloop.run(asyncio.wait_for(main(), 30))


class Holder:
    def __init__(self, state: ProxyState) -> None:
        self.state = state


async def start_ingress(
    state: ProxyState | Holder, hbone_port: int, **kw: Any
) -> tuple[ZoneIngress, IngressMetrics]:
    holder = state if isinstance(state, Holder) else Holder(state)
    metrics = IngressMetrics(Registry())
    kw.setdefault("hello_timeout", 2.0)
    kw.setdefault("connect_timeout", 2.0)
    ingress = ZoneIngress(lambda: holder.state, metrics, hbone_port=hbone_port, **kw)
    await ingress.start(ING, 0)
    return ingress, metrics


async def listen_same_port(
    ips: tuple[str, ...], handler: Callable[..., Awaitable[None]], **kw: Any
) -> tuple[list[asyncio.Server], int]:
    """One server per address, all on one kernel-chosen port (the HBONE port)."""
    for _ in range(20):
        first = await asyncio.start_server(handler, ips[0], 0, **kw)
        port = first.sockets[0].getsockname()[1]
        servers = [first]
        try:
            for ip in ips[1:]:
                servers.append(await asyncio.start_server(handler, ip, port, **kw))
        except OSError:
            for s in servers:
                s.close()
            continue
        return servers, port
    raise RuntimeError("no port free on all of " + ", ".join(ips))


def free_port_on(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out waiting"
        await asyncio.sleep(0.01)


class Recorder:
    """A fake node HBONE port over plain TCP: records what each connection
    brought (until EOF), then answers, then closes."""

    def __init__(self, answer: bytes = b"") -> None:
        self.accepted: list[str] = []
        self.received: list[bytes] = []
        self.answer = answer

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted.append(w.get_extra_info("sockname")[0])
        data = await r.read()  # until the client's EOF came through
        self.received.append(data)
        w.write(self.answer or hashlib.sha256(data).digest())
        await w.drain()
        w.close()


def counted(metrics: IngressMetrics) -> dict[str, float]:
    return {labels[-1]: v for labels, v in metrics.connections.values.items()}


def make_certificate(tmp: Path, names: list[str]) -> tuple[str, str]:
    """A self-signed certificate (its own CA) for `names`, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "node.pem", tmp / "node-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_a_tls_client_completes_mutual_tls_with_the_node_through_the_ingress(
    tmp_path: Path,
) -> None:
    """The node is a real TLS server that requires a client certificate; the
    ingress has no key. The client checks the node's certificate for the zone
    SNI; the node sees that SNI and the client's certificate: the handshake
    went through untouched."""
    cert, key = make_certificate(tmp_path, [API.name])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.load_verify_locations(cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen_sni: list[str | None] = []

    def on_sni(obj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        seen_sni.append(name)

    server_ctx.sni_callback = on_sni
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname: on
    client_ctx.load_verify_locations(cert)
    client_ctx.load_cert_chain(cert, key)
    client_certs: list[Any] = []

    async def node(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        client_certs.append(w.get_extra_info("peercert"))
        while data := await r.read(65536):
            w.write(data.upper())
            await w.drain()
        w.close()

    async def main() -> None:
        servers, port = await listen_same_port((N1,), node, ssl=server_ctx)
        ingress, metrics = await start_ingress(make_state([ep(N1)]), port)
        r, w = await asyncio.open_connection(
            *ingress.address, ssl=client_ctx, server_hostname=API.name
        )
        assert w.get_extra_info("peercert")["subjectAltName"] == (("DNS", API.name),)
        payload = os.urandom(300_000).hex().encode()
        w.write(payload)
        assert await asyncio.wait_for(r.readexactly(len(payload)), 10) == payload.upper()
        w.close()
        await until(lambda: ingress.active == 0)
        assert seen_sni == [API.name] and client_certs and client_certs[0]
        assert metrics.connections.values == {("api", "default", "zone-b", "forwarded"): 1}
        assert metrics.refused.values == {}
        up = metrics.bytes.get(("api", "default", "client_to_node"))
        down = metrics.bytes.get(("api", "default", "node_to_client"))
        assert up > len(payload) and down > len(payload)  # the TLS records, both ways
        await ingress.drain(1)
        for s in servers:
            s.close()

    run(main)


def test_bytes_go_through_untouched_with_half_close_both_ways() -> None:
    async def main() -> None:
        events: list[str] = []

        async def node(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            first = await r.readexactly(len(HELLO))
            events.append("hello" if first == HELLO else "mangled")
            # The node half-closes first; the client keeps sending after it.
            w.write(b"node done")
            w.write_eof()
            rest = await r.read()  # until the client's EOF
            events.append(f"got {len(rest)} after own eof")
            w.close()

        servers, port = await listen_same_port((N1,), node)
        ingress, metrics = await start_ingress(make_state([ep(N1)]), port)
        r, w = await asyncio.open_connection(*ingress.address)
        w.write(HELLO)
        assert await asyncio.wait_for(r.read(), 5) == b"node done"  # EOF from the node
        w.write(b"x" * 100_000)  # still flows the other way
        w.write_eof()
        await until(lambda: ingress.active == 0)
        assert events == ["hello", "got 100000 after own eof"]
        assert counted(metrics) == {"forwarded": 1}
        assert metrics.bytes.get(("api", "default", "client_to_node")) == len(HELLO) + 100_000
        assert metrics.bytes.get(("api", "default", "node_to_client")) == len(b"node done")
        w.close()

        # And the other order: the client half-closes first, the node answers after.
        recorder = Recorder()
        servers2, port2 = await listen_same_port((N2,), recorder)
        ingress2, _ = await start_ingress(make_state([ep(N2)]), port2)
        r, w = await asyncio.open_connection(*ingress2.address)
        tail = os.urandom(50_000)
        w.write(HELLO[:10])
        await asyncio.sleep(0.02)
        w.write(HELLO[10:] + tail)
        w.write_eof()
        answer = await asyncio.wait_for(r.read(), 5)
        assert recorder.received == [HELLO + tail]
        assert answer == hashlib.sha256(HELLO + tail).digest()
        w.close()
        for i in (ingress, ingress2):
            await i.drain(1)
        for s in servers + servers2:
            s.close()

    run(main)


async def exchange(
    ingress: ZoneIngress, data: bytes, *, eof: bool = False, me: list[str] | None = None
) -> bytes:
    """Send `data`, read until the ingress closes; a reset raises. `me` gets
    the client's own address."""
    r, w = await asyncio.open_connection(*ingress.address)
    if me is not None:
        host, port = w.get_extra_info("sockname")[:2]
        me.append(f"{host}:{port}")
    try:
        w.write(data)
        if eof:
            w.write_eof()
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


REFUSALS = {
    "http": (b"GET / HTTP/1.1\r\nHost: api\r\n\r\n", "not_tls", logging.INFO),
    "garbage": (b"\x00\x01\x02" * 40, "not_tls", logging.INFO),
    "no_sni": (client_hello(None), "no_sni", logging.INFO),
    "bad_sni": (client_hello("api.default.svc.example.com"), "bad_sni", logging.INFO),
    "wrong_zone": (
        client_hello(API.name.replace("zone-b", "zone-c")),
        "wrong_zone",
        logging.WARNING,
    ),
    "unknown_service": (
        client_hello(API.name.replace("api.", "web.", 1)),
        "unknown_service",
        logging.WARNING,
    ),
    "no_endpoint": (client_hello(API.name.replace(".80.", ".81.")), "no_endpoint", logging.WARNING),
    # Exactly the cap: everything sent is read, so the close is a FIN for sure.
    "too_large": (with_extension(HELLO, 20000)[:MAX_HELLO], "too_large", logging.INFO),
    "silent": (b"", "timeout", logging.INFO),
    "half_a_hello": (HELLO[:100], "timeout", logging.INFO),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_not_forwarded_is_closed_cleanly_counted_and_logged_once(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, reason, level = REFUSALS[case]
    caplog.set_level(logging.INFO, logger=LOG)
    recorder = Recorder()
    me: list[str] = []

    async def main() -> None:
        servers, port = await listen_same_port((N1,), recorder)
        ingress, metrics = await start_ingress(make_state([ep(N1)]), port, hello_timeout=0.3)
        assert await exchange(ingress, data, me=me) == b""  # a FIN, no reset, no bytes
        await until(lambda: ingress.active == 0)
        assert counted(metrics) == {reason: 1}
        assert metrics.refused.values == {(reason,): 1}
        assert recorder.accepted == []  # nothing reached a node
        await ingress.drain(1)
        for s in servers:
            s.close()

    run(main)
    records = [r for r in caplog.records if r.name == LOG and "not forwarded" in r.message]
    assert len(records) == 1 and records[0].levelno == level
    assert f"from {me[0]} " in records[0].message and f"({reason})" in records[0].message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_client_that_leaves_before_its_hello_is_counted() -> None:
    async def main() -> None:
        ingress, metrics = await start_ingress(make_state([ep(N1)]), free_port_on(N1))
        assert await exchange(ingress, HELLO[:50], eof=True) == b""
        await until(lambda: ingress.active == 0)
        assert counted(metrics) == {"client_closed": 1}
        await ingress.drain(1)

    run(main)


def test_a_failed_node_is_skipped_for_the_next() -> None:
    """The first candidate (N1) has nothing on the HBONE port: the buffered
    ClientHello goes to the second (N2), whole."""

    async def main() -> None:
        recorder = Recorder()
        servers, port = await listen_same_port((N2,), recorder)
        ingress, metrics = await start_ingress(make_state([ep(N1), ep(N2)]), port)
        answer = await exchange(ingress, HELLO + b"more", eof=True)
        assert answer == hashlib.sha256(HELLO + b"more").digest()
        assert recorder.accepted == [N2] and recorder.received == [HELLO + b"more"]
        assert metrics.connect_failures.values == {("refused",): 1}
        await until(lambda: ingress.active == 0)
        assert counted(metrics) == {"forwarded": 1}
        await ingress.drain(1)
        for s in servers:
            s.close()

    run(main)


def test_no_node_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)

    async def main() -> None:
        port = free_port_on(N1)
        ingress, metrics = await start_ingress(
            make_state([ep(N1), ep(N2), ep(N3)]), port, connect_attempts=2
        )
        assert await exchange(ingress, HELLO) == b""
        await until(lambda: ingress.active == 0)
        assert counted(metrics) == {"unreachable": 1}
        assert metrics.connect_failures.values == {("refused",): 2}  # bounded attempts
        await ingress.drain(1)

    run(main)
    [record] = [r for r in caplog.records if "not forwarded" in r.message]
    assert record.levelno == logging.WARNING and "connection refused" in record.message


def test_connections_take_turns_over_the_nodes_and_read_the_current_state() -> None:
    async def main() -> None:
        recorder = Recorder()
        servers, port = await listen_same_port((N1, N2, N3), recorder)
        holder = Holder(make_state([]))
        ingress, metrics = await start_ingress(holder, port)
        assert await exchange(ingress, HELLO, eof=True) == b""  # no endpoint yet
        holder.state = make_state([ep(N1), ep(N2)])  # a new snapshot
        for _ in range(4):
            await exchange(ingress, HELLO, eof=True)
        assert sorted(recorder.accepted) == [N1, N1, N2, N2]
        holder.state = make_state([ep(N3)])
        await exchange(ingress, HELLO, eof=True)
        assert recorder.accepted[-1] == N3
        await until(lambda: ingress.active == 0)
        assert counted(metrics) == {"no_endpoint": 1, "forwarded": 5}
        await ingress.drain(1)
        for s in servers:
            s.close()

    run(main)


def test_over_the_connection_cap_is_refused() -> None:
    async def main() -> None:
        ingress, metrics = await start_ingress(
            make_state([ep(N1)]), free_port_on(N1), max_connections=2
        )
        held = [await asyncio.open_connection(*ingress.address) for _ in range(2)]
        await until(lambda: ingress.active == 2)
        assert await exchange(ingress, HELLO) == b""
        assert metrics.refused.values == {("overload",): 1}
        for _, w in held:
            w.close()
        await until(lambda: ingress.active == 0)
        await ingress.drain(1)

    run(main)


def test_an_error_on_one_side_resets_the_other() -> None:
    async def main() -> None:
        node_writers: list[asyncio.StreamWriter] = []
        lost = asyncio.Event()

        async def node(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            node_writers.append(w)
            try:
                await r.readexactly(len(HELLO))
                await r.read()
            except ConnectionResetError:
                lost.set()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            w.close()

        servers, port = await listen_same_port((N1,), node)
        ingress, _ = await start_ingress(make_state([ep(N1)]), port)
        # The node fails (RST): the client gets a reset, not an end.
        r, w = await asyncio.open_connection(*ingress.address)
        w.write(HELLO)
        await until(lambda: len(node_writers) == 1)
        sock = node_writers[0].get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        node_writers[0].transport.abort()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        # The client fails: the node gets a reset.
        r, w = await asyncio.open_connection(*ingress.address)
        w.write(HELLO)
        await until(lambda: len(node_writers) == 2)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        w.transport.abort()
        await asyncio.wait_for(lost.wait(), 5)
        await until(lambda: ingress.active == 0)
        await ingress.drain(1)
        for s in servers:
            s.close()

    run(main)


def test_back_pressure_holds_a_fast_sender_to_a_slow_node() -> None:
    """The node does not read for a while: the ingress stops reading the client
    instead of buffering what it sends. Then everything arrives, intact."""
    total = 64 << 20

    async def main() -> None:
        reading = asyncio.Event()
        digest: list[str] = []

        async def node(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await reading.wait()
            h = hashlib.sha256()
            while data := await r.read(1 << 20):
                h.update(data)
            digest.append(h.hexdigest())
            w.close()

        servers, port = await listen_same_port((N1,), node)
        ingress, _ = await start_ingress(make_state([ep(N1)]), port)
        r, w = await asyncio.open_connection(*ingress.address)
        chunk = os.urandom(1 << 20)
        sent = hashlib.sha256()
        w.write(HELLO)
        sent.update(HELLO)
        written = 0

        async def send() -> None:
            nonlocal written
            while written < total:
                w.write(chunk)
                sent.update(chunk)
                written += len(chunk)
                await w.drain()
            w.write_eof()

        sender = asyncio.get_running_loop().create_task(send())
        await asyncio.sleep(0.4)
        before = written
        await asyncio.sleep(0.2)
        [conn] = ingress.conns
        assert conn.node is not None and conn.node.transport is not None
        held = conn.node.transport.get_write_buffer_size()
        # The sender is stalled (the kernel's buffers are full), and the
        # ingress holds little: it stopped reading the client.
        assert written == before < total and held < 1 << 20, (written, held)
        reading.set()
        await asyncio.wait_for(sender, 20)
        await until(lambda: bool(digest), 20)
        assert digest == [sent.hexdigest()]
        w.close()
        await ingress.drain(1)
        for s in servers:
            s.close()

    run(main)


def test_close_stops_accepting_and_drain_resets_what_is_left() -> None:
    async def main() -> None:
        async def node(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while await r.read(65536):
                    pass
            w.close()

        servers, port = await listen_same_port((N1,), node)
        ingress, metrics = await start_ingress(make_state([ep(N1)]), port)
        r, w = await asyncio.open_connection(*ingress.address)
        w.write(HELLO)
        await until(lambda: counted(metrics) == {"forwarded": 1})
        ingress.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*ingress.address)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await ingress.drain(0.3)
        assert 0.25 < loop.time() - start < 2 and ingress.active == 0
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        for s in servers:
            s.close()

    run(main)


def test_metrics_are_exposed_with_the_rest(tmp_path: Path) -> None:
    from meshnode.ztunnel.metrics import ProxyMetrics

    pm = ProxyMetrics()
    m = IngressMetrics(pm.registry)
    m.connections.inc(("api", "default", "zone-b", "forwarded"))
    m.bytes.inc(("api", "default", "client_to_node"), 10)
    m.refused.inc(("timeout",))
    m.connect_failures.inc(("refused",))
    m.active.inc()
    samples = {s.name: s for s in parse_exposition(pm.render())}
    assert samples["meshnode_ingress_connections_total"].labels == {
        "service": "api",
        "namespace": "default",
        "zone": "zone-b",
        "result": "forwarded",
    }
    assert samples["meshnode_ingress_bytes_total"].value == 10
    assert samples["meshnode_ingress_refused_total"].labels == {"reason": "timeout"}
    assert samples["meshnode_ingress_connect_failures_total"].labels == {"reason": "refused"}
    assert samples["meshnode_ingress_connections_active"].value == 1
    assert "istio_tcp_connections_opened_total" in pm.registry.names()  # one registry


# --- wiring: config, CLI, workers, the proxy -----------------------------------------


def test_config_allows_any_address_but_not_a_shared_port(tmp_path: Path) -> None:
    snap = tmp_path / "s.json"
    assert ZtunnelConfig(snap, ingress=("0.0.0.0", 15443)).validate().ingress == ("0.0.0.0", 15443)
    assert ZtunnelConfig(snap, ingress=("10.1.2.3", 15443)).validate().dump()["ingress"] == (
        "10.1.2.3",
        15443,
    )
    assert ZtunnelConfig(snap).validate().ingress is None
    for clash in (("0.0.0.0", 15008), ("10.1.2.3", 15008), ("127.0.0.1", 15001)):
        with pytest.raises(ConfigError, match="port of its own"):
            ZtunnelConfig(snap, ingress=clash).validate()
    # The same port on another address than a specific listener's is fine.
    ZtunnelConfig(snap, ingress=("10.1.2.3", 15001)).validate()


def test_the_cli_flag_reaches_the_config_and_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshnode.cli.main import cli
    from meshnode.ztunnel import proxy
    from meshnode.ztunnel.supervisor import Worker

    got: list[ZtunnelConfig] = []
    monkeypatch.setattr(proxy, "run_ztunnel", got.append)
    snap = str(tmp_path / "s.json")
    base = ["ztunnel", "run", "--snapshot", snap, "--workers", "2"]
    result = CliRunner().invoke(cli, [*base, "--ingress-listen", "0.0.0.0:15443"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, [*base, "--ingress-listen", ":15444"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 0, result.output
    assert [c.ingress for c in got] == [("0.0.0.0", 15443), ("0.0.0.0", 15444), None]
    result = CliRunner().invoke(cli, [*base, "--ingress-listen", "0.0.0.0:15008"])
    assert result.exit_code != 0 and "port of its own" in result.output
    command = Worker(0, got[0], "/run/w.sock").command()
    assert command[command.index("--ingress-listen") + 1] == "0.0.0.0:15443"
    assert "--ingress-listen" not in Worker(0, got[2], "/run/w.sock").command()


def test_a_zone_a_node_calls_through_a_zone_b_ztunnels_ingress(tmp_path: Path) -> None:
    """Two real node proxies: node1 (zone-a) knows api only as a remote entry
    behind zone-b's ingress, which node2's ztunnel runs (--ingress-listen); the
    ingress forwards to node2's own HBONE port, where api runs."""
    from tests.support.mesh import build_mesh, connect_as, split_zones

    a, b = "127.0.0.44", "127.0.0.45"

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async def main() -> None:
        api = await asyncio.start_server(echo, b, 0)
        nodes = build_mesh(
            tmp_path, api.sockets[0].getsockname()[1], node_ips=(a, b), base_port=29100
        )
        gateway = nodes["node2"].proxy
        gateway.config.ingress = (b, 0)
        for n in nodes.values():
            await n.proxy.start()
        assert gateway.ingress is not None
        ingress_port = gateway.ingress.address[1]
        split_zones(nodes, (b, ingress_port))
        r, w = await connect_as(nodes["node1"], 1)
        w.write(b"across zones")
        assert await asyncio.wait_for(r.readexactly(12), 10) == b"across zones"
        w.close()
        text = gateway.pi.metrics.render()
        forwarded = [
            s
            for s in parse_exposition(text)
            if s.name == "meshnode_ingress_connections_total" and s.labels["result"] == "forwarded"
        ]
        assert [(s.labels["service"], s.labels["zone"], s.value) for s in forwarded] == [
            ("api", "zone-b", 1.0)
        ]
        api.close()
        for n in nodes.values():
            await n.proxy.drain()
        assert gateway.ingress.active == 0

    run(main)
