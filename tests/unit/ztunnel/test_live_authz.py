"""Rules that change under live traffic (issue 10): established connections a
new policy denies are closed, a dropped trust root closes the HBONE connections
verified under it, a pooled tunnel is not reused past a certificate's expiry,
and the peer socket tells a workload only about its own connections.

Two real node proxies on loopback with real TLS (tests/support/mesh.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from cryptography.hazmat.primitives import serialization

from meshnode.controlplane.ca import CertificateAuthority
from meshnode.ztunnel import recheck
from meshnode.ztunnel.peer import (
    ConnKey,
    PeerIndex,
    PeerQueryError,
    PeerServer,
    ancestors,
    cgroup_of_pid_text,
    parse_query,
)
from meshnode.ztunnel.proxy import OriginalDst
from tests.support.mesh import build_mesh

N1, N2 = "127.0.0.2", "127.0.0.3"
WEB = "spiffe://cluster.local/ns/default/sa/web"


def run(coro_fn: Callable[[Path], Awaitable[Any]], tmp: Path) -> Any:
    return uvloop.run(asyncio.wait_for(coro_fn(tmp), 60))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


async def mesh(tmp: Path, port: int) -> tuple[asyncio.Server, Any]:
    server = await asyncio.start_server(echo, N2, port)
    nodes = build_mesh(tmp, port, base_port=31100 + (port % 50) * 40)
    for n in nodes.values():
        await n.proxy.start()
    return server, nodes


async def client(nodes: Any, local_port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    local_port = free_port("127.0.0.1")  # the argument only names the call site
    nodes["node1"].orig.records[("127.0.0.1", local_port)] = OriginalDst("240.0.0.1", 80, 1)
    return await asyncio.open_connection(N1, 15001, local_addr=("127.0.0.1", local_port))


async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(data)), 5)


def set_policies(node: Any, policies: list[dict[str, Any]]) -> None:
    doc = json.loads(node.snapshot.read_text())
    doc["version"] += 1
    doc["policies"] = policies
    node.snapshot.write_text(json.dumps(doc))
    node.proxy.reload()


def deny_from(name: str, sa: str) -> dict[str, Any]:
    return {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "action": "DENY",
            "rules": [{"from": {"principals": [f"spiffe://cluster.local/ns/default/sa/{sa}"]}}],
        },
    }


async def closed(r: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(r.read(1), 5) == b""
    except ConnectionError:
        return True


def test_a_policy_change_closes_the_connections_it_now_denies(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        server, nodes = await mesh(tmp, 18301)
        node2 = nodes["node2"]
        r, w = await client(nodes, 41301)
        assert await roundtrip(r, w, b"before") == b"before"
        # Control: a policy that denies someone else leaves the connection alone.
        set_policies(node2, [deny_from("deny-ops", "ops")])
        assert await roundtrip(r, w, b"still") == b"still"
        assert node2.proxy.pi.metrics.revoked.get(("policy",)) == 0
        # Now web is denied: its established connection is closed, promptly.
        set_policies(node2, [deny_from("deny-ops", "ops"), deny_from("deny-web", "web")])
        assert await closed(r)
        assert node2.proxy.pi.metrics.revoked.get(("policy",)) == 1
        assert not node2.proxy.pi.active
        # And a new connection is refused at the door.
        r2, w2 = await client(nodes, 41302)
        assert await closed(r2)
        w.close()
        w2.close()
        server.close()
        for n in nodes.values():
            await n.proxy.drain()

    run(main, tmp_path)


def test_a_dropped_root_closes_hbone_connections_an_added_one_does_not(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        server, nodes = await mesh(tmp, 18302)
        node1, node2 = nodes["node1"], nodes["node2"]
        r, w = await client(nodes, 41311)
        assert await roundtrip(r, w, b"x") == b"x"
        bundle = Path(json.loads(node1.snapshot.read_text())["trust_bundle"])
        old = bundle.read_bytes()
        other = CertificateAuthority.create("cluster.local").trust_bundle_pem()

        def reload_both() -> None:
            os.utime(bundle, (time.time() + 5, time.time() + 5))  # a new mtime, surely
            for n in (node1, node2):
                doc = json.loads(n.snapshot.read_text())
                doc["version"] += 1
                n.snapshot.write_text(json.dumps(doc))
                n.proxy.reload()

        bundle.write_bytes(old + other)  # a rotation's first half: a root added
        reload_both()
        assert await roundtrip(r, w, b"y") == b"y"
        assert node1.proxy.pi.metrics.revoked.get(("trust_bundle",)) == 0
        bundle.write_bytes(other)  # the root everything was verified under is gone
        reload_both()
        assert await closed(r)
        assert node1.proxy.pi.metrics.revoked.get(("trust_bundle",)) >= 1
        assert node1.proxy.pi.pool.size() == 0
        w.close()
        server.close()
        for n in nodes.values():
            await n.proxy.drain()

    run(main, tmp_path)


def test_a_deleted_nodes_tunnels_close_and_its_certificates_are_refused(tmp_path: Path) -> None:
    """Issue 10, attack 6 for nodes: node1 is deleted; node2's next snapshot
    revokes the certificates issued to it, which closes the live tunnel from it
    and refuses the next one. Before, they ran until the certificate expired."""

    async def main(tmp: Path) -> None:
        server, nodes = await mesh(tmp, 18304)
        node2 = nodes["node2"]
        r, w = await client(nodes, 41331)
        assert await roundtrip(r, w, b"a") == b"a"
        # Control: a revocation of another node changes nothing.
        doc = json.loads(node2.snapshot.read_text())
        doc["version"] += 1
        doc["revoked"] = [{"node": "node9", "issued_before": time.time() + 60}]
        node2.snapshot.write_text(json.dumps(doc))
        node2.proxy.reload()
        assert await roundtrip(r, w, b"b") == b"b"
        doc["version"] += 1
        doc["revoked"] = [{"node": "node1", "issued_before": time.time() + 60}]
        node2.snapshot.write_text(json.dumps(doc))
        node2.proxy.reload()
        assert await closed(r)
        assert node2.proxy.pi.metrics.revoked.get(("node_revoked",)) >= 1
        r2, w2 = await client(nodes, 41332)  # a new tunnel from node1: refused
        assert await closed(r2)
        for wr in (w, w2):
            wr.close()
        server.close()
        for n in nodes.values():
            await n.proxy.drain()

    run(main, tmp_path)


def test_revoked_by_compares_the_node_and_the_issue_time(tmp_path: Path) -> None:
    from cryptography import x509

    from meshnode.core.contracts import Revocation
    from tests.support.mesh import issue

    ca = CertificateAuthority.create("cluster.local")
    cert, _ = issue(ca, tmp_path, "web", "node1")
    der = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0].public_bytes(
        serialization.Encoding.DER
    )
    later, earlier = time.time() + 60, time.time() - 3600
    assert recheck.revoked_by(der, [Revocation("node1", later)]) is not None
    assert recheck.revoked_by(der, [Revocation("node1", earlier)]) is None  # issued after
    assert recheck.revoked_by(der, [Revocation("node2", later)]) is None
    assert recheck.revoked_by(der, []) is None and recheck.revoked_by(None, []) is None


def test_a_pooled_tunnel_is_not_reused_past_a_certificate_expiry(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        server, nodes = await mesh(tmp, 18303)
        pool = nodes["node1"].proxy.pi.pool
        r, w = await client(nodes, 41321)
        assert await roundtrip(r, w, b"a") == b"a"
        (first,) = pool.sessions()
        cert_expiry = first.valid_until
        assert time.time() + 3000 < cert_expiry < time.time() + 400 * 86400
        first.valid_until = time.time() - 1  # as if the certificate had expired
        r2, w2 = await client(nodes, 41322)
        assert await roundtrip(r2, w2, b"b") == b"b"
        assert pool.retired == 1
        assert first not in pool.sessions() and len(pool.sessions()) == 1
        # The stream already on the retired connection runs to its end.
        assert await roundtrip(r, w, b"c") == b"c"
        for wr in (w, w2):
            wr.close()
        server.close()
        for n in nodes.values():
            await n.proxy.drain()

    run(main, tmp_path)


# -- the peer socket ---------------------------------------------------------------


def test_parse_query_and_cgroup_helpers() -> None:
    assert parse_query("local=10.0.0.1:8080&remote=127.0.0.6:40000") == ConnKey(
        "10.0.0.1", 8080, "127.0.0.6", 40000
    )
    assert parse_query("local=[::ffff:10.0.0.1]:1&remote=127.0.0.6:2").local_ip == "10.0.0.1"
    for bad, why in [
        ("local=10.0.0.1:80", "remote"),
        ("local=x:1&remote=127.0.0.6:2", "IP"),
        ("local=10.0.0.1:0&remote=127.0.0.6:2", "range"),
        ("local=1.1.1.1:1&local=1.1.1.1:2&remote=127.0.0.6:2", "once"),
    ]:
        with pytest.raises(PeerQueryError, match=why):
            parse_query(bad)
    assert cgroup_of_pid_text("12:cpu:/x\n0::/mesh/web.service/sub\n") == "/mesh/web.service/sub"
    with pytest.raises(PeerQueryError):
        cgroup_of_pid_text("1:name=systemd:/x\n")
    assert list(ancestors("/a/b/c")) == ["/a/b/c", "/a/b", "/a"]
    assert len(list(ancestors("/" + "/".join("x" * 20)))) == 16


def test_peer_index_answers_only_the_workload_that_holds_the_connection() -> None:
    idx = PeerIndex()
    key = ConnKey("10.0.0.1", 8080, "127.0.0.6", 40000)
    idx.add(key, WEB, workload_id=3)
    assert idx.answer(key, 3) == (
        200,
        {"local": "10.0.0.1:8080", "remote": "127.0.0.6:40000", "identity": WEB},
    )
    status, body = idx.answer(key, 4)  # another workload: same answer as no connection
    assert (status, body) == PeerIndex().answer(key, 4)
    # Only the full 4-tuple: the same client port towards another address is not it.
    assert idx.answer(ConnKey("10.0.0.2", 8080, "127.0.0.6", 40000), 3)[0] == 404
    idx.discard(key)
    assert idx.answer(key, 3)[0] == 404 and len(idx) == 0


def test_peer_server_uses_the_kernels_word_for_who_asks(tmp_path: Path) -> None:
    """Over a real Unix socket: the server learns the asker's pid from
    SO_PEERCRED (this process) and answers by the workload that pid is in."""
    idx = PeerIndex()
    key = ConnKey("10.0.0.1", 8080, "127.0.0.6", 40000)
    idx.add(key, WEB, workload_id=7)
    seen: list[int] = []
    member: dict[int, int] = {}

    def workload_of(pid: int) -> int | None:
        seen.append(pid)
        return member.get(pid)

    async def lookup(k: ConnKey, wid: int) -> tuple[int, dict[str, Any]]:
        return idx.answer(k, wid)

    async def main() -> list[tuple[int, dict[str, Any]]]:
        path = str(tmp_path / "peer.sock")
        server = PeerServer(workload_of, lookup)
        await server.listen(path)
        assert os.stat(path).st_mode & 0o777 == 0o666
        out = []
        q = "/v1/peer?local=10.0.0.1:8080&remote=127.0.0.6:40000"
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as s:
            for target, as_workload in [
                (q, None),
                (q, 8),
                (q, 7),
                ("/v1/peer?local=1", 7),
                ("/peer?addr=10.0.0.1:8080", 7),
            ]:
                member.clear()
                if as_workload is not None:
                    member[os.getpid()] = as_workload
                async with s.get(f"http://localhost{target}") as resp:
                    out.append((resp.status, await resp.json()))
        await server.close()
        return out

    results = uvloop.run(main())
    assert set(seen) == {os.getpid()}
    assert [status for status, _ in results] == [403, 404, 200, 400, 404]
    assert results[2][1]["identity"] == WEB
    assert "not in a meshed cgroup" in results[0][1]["error"]


def test_the_proxy_indexes_delivered_connections_by_their_full_4_tuple(tmp_path: Path) -> None:
    async def main(tmp: Path) -> None:
        server, nodes = await mesh(tmp, 18304)
        node2 = nodes["node2"]
        r, w = await client(nodes, 41331)
        assert await roundtrip(r, w, b"q") == b"q"
        (conn,) = [c for c in node2.proxy.pi.active if getattr(c, "conn_key", None)]
        key = conn.conn_key
        assert (key.local_ip, key.local_port) == (N2, 18304)
        assert node2.proxy.pi.peers.answer(key, 1) == (
            200,
            {
                "local": f"{N2}:18304",
                "remote": f"{key.remote_ip}:{key.remote_port}",
                "identity": WEB,
            },
        )
        assert node2.proxy.pi.peers.answer(key, 2)[0] == 404  # ops, on the same node
        # The loopback admin port no longer answers for an address.
        admin = node2.proxy.config.admin
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://{admin[0]}:{admin[1]}/peer?addr={key.remote_ip}:{key.remote_port}"
            ) as resp,
        ):
            assert resp.status == 404
        w.close()
        await asyncio.sleep(0.2)
        assert len(node2.proxy.pi.peers) == 0
        server.close()
        for n in nodes.values():
            await n.proxy.drain()

    run(main, tmp_path)


def test_root_fingerprints_and_removal() -> None:
    a = CertificateAuthority.create("cluster.local").trust_bundle_pem()
    b = CertificateAuthority.create("cluster.local").trust_bundle_pem()
    fa, fb, fab = (recheck.root_fingerprints(x) for x in (a, b, a + b))
    assert len(fab) == 2 and fa | fb == fab
    assert not recheck.roots_removed(fa, fab)  # added
    assert recheck.roots_removed(fab, fb)  # dropped
    assert recheck.root_fingerprints(b"not pem") == frozenset()
