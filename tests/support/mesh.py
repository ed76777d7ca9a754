"""Two node proxies in one process on loopback (127.0.0.2 and 127.0.0.3), with
real TLS certificates from the mesh CA. Only the BPF original-destination
lookup is replaced: tests hand the proxy the record the kernel would have."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnode.controlplane.ca import CertificateAuthority
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import SpiffeId
from meshnode.core.pki import generate_private_key, make_csr, write_private_key
from meshnode.ztunnel.config import ZtunnelConfig
from meshnode.ztunnel.proxy import OriginalDst, Proxy

TD = "cluster.local"


class FakeOrigDst:
    """Stands in for the pinned BPF map: records keyed by the client's address."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], OriginalDst] = {}

    def reopen(self, pin_dir: str | None) -> None:
        pass

    def pop(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> OriginalDst | None:
        return self.records.pop((src_ip, src_port), None)


@dataclass
class Node:
    name: str
    ip: str
    proxy: Proxy
    orig: FakeOrigDst
    snapshot: Path


def issue(ca: CertificateAuthority, d: Path, sa: str, node: str = "") -> tuple[str, str]:
    key = generate_private_key()
    ident = SpiffeId(TD, "default", sa)
    chain = ca.issue_workload_certificate(make_csr(key, ident), ident, node=node)
    write_private_key(d / f"{sa}-key.pem", key)
    write_file_atomic(d / f"{sa}.pem", chain, 0o644)
    return str(d / f"{sa}.pem"), str(d / f"{sa}-key.pem")


def build_mesh(
    tmp: Path,
    server_port: int,
    *,
    node_ips: tuple[str, str] = ("127.0.0.2", "127.0.0.3"),
    base_port: int = 25100,
) -> dict[str, Node]:
    """node1 hosts workload `web` (id 1, client); node2 hosts `api` listening on
    node2's IP at server_port, behind VIP 240.0.0.1:80, and `ops` (id 2), a
    client on the same node as api."""
    ca = CertificateAuthority.create(TD)
    bundle = tmp / "bundle.pem"
    bundle.write_bytes(ca.trust_bundle_pem())
    n1, n2 = node_ips
    web_cert, web_key = issue(ca, tmp, "web", "node1")
    api_cert, api_key = issue(ca, tmp, "api", "node2")
    ops_cert, ops_key = issue(ca, tmp, "ops", "node2")
    services = [
        {
            "name": "api",
            "namespace": "default",
            "vip": "240.0.0.1",
            "ports": [{"port": 80, "target_port": server_port}],
            "endpoints": [
                {
                    "workload": "api",
                    "namespace": "default",
                    "service_account": "api",
                    "node": "node2",
                    "node_ip": n2,
                    "address": n2,
                    "port": server_port,
                }
            ],
        }
    ]
    nodes = {}
    for i, (name, ip, wls) in enumerate(
        [
            (
                "node1",
                n1,
                [
                    {
                        "id": 1,
                        "name": "web",
                        "namespace": "default",
                        "service_account": "web",
                        "node": "node1",
                        "address": n1,
                        "port": 9000,
                        "service": "web",
                        "cert": web_cert,
                        "key": web_key,
                    }
                ],
            ),
            (
                "node2",
                n2,
                [
                    {
                        "id": 1,
                        "name": "api",
                        "namespace": "default",
                        "service_account": "api",
                        "node": "node2",
                        "address": n2,
                        "port": server_port,
                        "service": "api",
                        "cert": api_cert,
                        "key": api_key,
                    },
                    {
                        "id": 2,
                        "name": "ops",
                        "namespace": "default",
                        "service_account": "ops",
                        "node": "node2",
                        "address": n2,
                        "port": 9001,
                        "service": "ops",
                        "cert": ops_cert,
                        "key": ops_key,
                    },
                ],
            ),
        ]
    ):
        snap = tmp / f"{name}.json"
        snap.write_text(
            json.dumps(
                {
                    "schema": 4,
                    "version": 1,
                    "node": {"name": name, "ip": ip},
                    "trust_domain": TD,
                    "trust_bundle": str(bundle),
                    "bpf_pin_dir": None,
                    "workloads": wls,
                    "services": services,
                }
            )
        )
        cfg = ZtunnelConfig(
            snapshot=snap,
            outbound=(ip, 15001),
            inbound=(ip, 15008),
            admin=("127.0.0.1", base_port + i),
            readiness=("127.0.0.1", base_port + 10 + i),
            metrics=("127.0.0.1", base_port + 20 + i),
            control_socket=str(tmp / f"{name}.sock"),
            peer_socket=str(tmp / f"{name}-peer.sock"),
            drain_timeout=1.0,
        )
        proxy = Proxy(cfg)
        orig = FakeOrigDst()
        proxy.pi.orig_dst = orig  # type: ignore[assignment]
        nodes[name] = Node(name, ip, proxy, orig, snap)
    return nodes


async def connect_as(
    node: Node, workload_id: int, dst: tuple[str, int] = ("240.0.0.1", 80)
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `node`'s outbound port as its workload `workload_id`, to
    `dst`, with the record the kernel would have left. The kernel picks the
    client port (a fixed one can collide with another connection's)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    node.orig.records[sock.getsockname()] = OriginalDst(dst[0], dst[1], workload_id)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (node.ip, 15001))
    return await asyncio.open_connection(sock=sock)


def split_zones(
    nodes: dict[str, Node],
    ingress: tuple[str, int],
    *,
    local_api_port: int | None = None,
    policies: Sequence[dict[str, Any]] = (),
) -> None:
    """Put node1 in zone-a and node2 in zone-b, and reload them: node1 then knows
    api (node2's) only as a remote zone entry behind zone-b's `ingress`. With
    `local_api_port`, node1 also has a zone-a endpoint of api, on itself at that
    port (for failover). `policies` go to node2."""
    for name, zone in (("node1", "zone-a"), ("node2", "zone-b")):
        node = nodes[name]
        doc = json.loads(node.snapshot.read_text())
        doc["node"]["zone"] = zone
        doc["version"] += 1
        for svc in doc["services"]:
            for e in svc["endpoints"]:
                e["zone"] = "zone-b"
            if name == "node1":
                svc["endpoints"] = []
                svc["remote"] = [
                    {
                        "zone": "zone-b",
                        "ingress_ip": ingress[0],
                        "ingress_port": ingress[1],
                        "namespace": "default",
                        "service_account": "api",
                        "port": 80,
                        "endpoints": 1,
                    }
                ]
                if local_api_port is not None:
                    svc["endpoints"].append(
                        {
                            "workload": "api-a",
                            "namespace": "default",
                            "service_account": "api",
                            "node": "node1",
                            "node_ip": node.ip,
                            "address": node.ip,
                            "port": local_api_port,
                            "service_port": 80,
                            "zone": "zone-a",
                        }
                    )
        if name == "node2" and policies:
            doc["policies"] = list(policies)
        node.snapshot.write_text(json.dumps(doc))
        node.proxy.reload()


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl, OpenSSL)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = out.read()
    assert data[0] == 0x16 and data[5] == 0x01  # one handshake record: a ClientHello
    return data
