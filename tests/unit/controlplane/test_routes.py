"""The control-plane route table and the HTTP layer (aiohttp) over real TLS on
loopback: declared auth on every route, auth before the body, body and header
limits, chunked bodies, repeated headers; and the one client's node calls
(replicas, the control plane's SPIFFE ID checked before anything is sent)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshnode.controlplane.api import Auth
from meshnode.controlplane.api.routes import MAX_BODY, ROUTES
from meshnode.controlplane.store import open_store
from meshnode.core import api
from meshnode.core.contracts import EndpointHealth, NodeReport, TrafficEdge
from meshnode.core.contracts.report import MAX_REPORT_BYTES, MIN_REPORT_INTERVAL
from meshnode.core.cpclient import ClientError, NodeClient, tls_context
from meshnode.core.identity import controlplane_uri
from tests.support.controlplane import EnrolledNode, ThreadedControlPlane, enroll


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data").start()
    (tmp_path / "data" / "admin-token").chmod(0o600)
    yield server
    server.stop()
    store.close()


def _admin_token(cp: ThreadedControlPlane) -> str:
    return (cp.data_dir / "admin-token").read_text().strip()


# --- the table (pure) ----------------------------------------------------------------


def test_every_route_declares_its_auth_once() -> None:
    seen = set()
    for r in ROUTES:
        assert isinstance(r.auth, Auth)
        assert (r.method, r.path) not in seen
        seen.add((r.method, r.path))
        if r.path.startswith("/v1/node/"):
            assert r.auth is Auth.NODE, r
        elif r.path.startswith("/v1/admin/"):
            assert r.auth is Auth.ADMIN, r
        elif r.path == api.ZONE_ENROLL:
            assert r.auth is Auth.TOKEN, r
        elif r.path.startswith("/v1/zone/"):
            assert r.auth is Auth.ZONE, r
        else:
            assert r.auth in (Auth.PUBLIC, Auth.TOKEN), r
        assert (r.max_body > 0) == (r.method in ("POST", "PUT")), r
    assert (("POST", api.ENROLL) in seen) and (("GET", api.TRUST_BUNDLE) in seen)


# --- the HTTP layer ---------------------------------------------------------------------


def _raw_head(cp: ThreadedControlPlane, head: bytes, body: bytes = b"") -> tuple[bytes, float]:
    """Send a request head (and part of a body) over verified TLS; the first bytes of
    the answer and how long it took. Used where no HTTP client would send this."""
    ctx = tls_context(cp.bundle())
    with (
        socket.create_connection(("127.0.0.1", cp.cp.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        started = time.monotonic()
        tls.sendall(head + body)
        answer = b""
        while len(answer) < 12:
            chunk = tls.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - started


def test_auth_before_the_body_is_read(cp: ThreadedControlPlane) -> None:
    huge = 1 << 30  # announced; only 4 KiB is ever sent
    for path in (api.NODE_WORKLOADS, api.ADMIN_TOKENS):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
            f"Content-Length: {huge}\r\n\r\n"
        ).encode()
        answer, took = _raw_head(cp, head, b"{" + b" " * 4096)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert took < 5


def test_body_larger_than_the_route_takes(cp: ThreadedControlPlane) -> None:
    token = _admin_token(cp)
    head = (
        f"POST {api.ADMIN_TOKENS} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {MAX_BODY * 4}\r\n\r\n"
    ).encode()
    answer, _ = _raw_head(cp, head, b"{}")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _request(cp: ThreadedControlPlane, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(ssl=tls_context(cp.bundle()))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, cp.url + path, **kw) as resp,
    ):
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, (await resp.json() if "json" in ctype else await resp.text())


def test_chunked_body_is_read(cp: ThreadedControlPlane) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"node": '
        yield b'"chunky"}'

    status, data = _run(
        _request(
            cp,
            "POST",
            api.ADMIN_TOKENS,
            data=chunks(),
            headers={
                "Authorization": f"Bearer {_admin_token(cp)}",
                "Content-Type": "application/json",
            },
        )
    )
    assert status == 200 and data["node"] == "chunky", data


def test_repeated_authorization_is_refused(cp: ThreadedControlPlane) -> None:
    token = _admin_token(cp)
    head = (
        f"GET {api.ADMIN_NODES} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    answer, _ = _raw_head(cp, head)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    ok = _run(_request(cp, "GET", api.ADMIN_NODES, headers={"Authorization": f"Bearer {token}"}))
    assert ok[0] == 200


def test_oversized_header_is_refused(cp: ThreadedControlPlane) -> None:
    head = (f"GET {api.TRUST_BUNDLE} HTTP/1.1\r\nHost: cp\r\nX-Big: {'a' * 20000}\r\n\r\n").encode()
    answer, _ = _raw_head(cp, head)
    assert answer[8:13] in (b" 400 ", b" 431 "), answer[:200]


def test_unknown_path_and_method_answer_json(cp: ThreadedControlPlane) -> None:
    status, data = _run(_request(cp, "GET", "/v1/nope"))
    assert status == 404 and "no such endpoint /v1/nope" in data["error"]
    status, data = _run(_request(cp, "DELETE", api.TRUST_BUNDLE))
    assert status == 405 and "DELETE is not allowed" in data["error"]


# --- the one client's node calls ---------------------------------------------------------


def _free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{s.getsockname()[1]}"


def test_node_client_replicas_and_server_identity(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    admin = cp.admin(_admin_token(cp))
    grant = {"node": "n1", "identities": ["default/web"]}
    token = admin.call("POST", api.ADMIN_TOKENS, grant)["token"]
    status, data, node = enroll(cp.url, cp.bundle(), token, "n1", tmp_path / "n1")
    assert status == 200 and node is not None, data
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(node.bundle)
    body = {"name": "web", "namespace": "default", "service": "web", "port": 8080}

    # Not the control plane's SPIFFE ID: refused in the handshake, nothing sent.
    impostor = NodeClient(
        [cp.url], bundle, node.cert_path, node.key_path, "spiffe://cluster.local/ns/default/sa/web"
    )
    with pytest.raises(ClientError, match="not spiffe://cluster.local/ns/default/sa/web"):
        impostor.request("POST", api.NODE_WORKLOADS, body)
    assert admin.call("GET", api.ADMIN_WORKLOADS)["items"] == []

    # A dead replica first: the live one answers and is tried first from then on.
    dead = _free_url()
    client = NodeClient(
        [dead, cp.url], bundle, node.cert_path, node.key_path, controlplane_uri("cluster.local")
    )
    assert client.request("POST", api.NODE_WORKLOADS, body)["workload"]["name"] == "web"
    assert client.order == [cp.url, dead]
    # An answered 4xx is final.
    with pytest.raises(ClientError) as err:
        client.request(
            "POST",
            api.NODE_CERTIFICATES,
            {"namespace": "other", "service_account": "x", "csr": "-"},
        )
    assert err.value.status == 403 and "not granted identity other/x" in err.value.message
    assert [w["name"] for w in admin.call("GET", api.ADMIN_WORKLOADS)["items"]] == ["web"]


def test_node_client_without_any_control_plane(tmp_path: Path, cp: ThreadedControlPlane) -> None:
    admin = cp.admin(_admin_token(cp))
    token = admin.call("POST", api.ADMIN_TOKENS, {"node": "n2"})["token"]
    _, _, node = enroll(cp.url, cp.bundle(), token, "n2", tmp_path / "n2")
    assert node is not None
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(node.bundle)
    client = NodeClient(
        [_free_url()],
        bundle,
        node.cert_path,
        node.key_path,
        controlplane_uri("cluster.local"),
        timeout=3,
    )
    with pytest.raises(ClientError, match="no control plane reachable.*connection refused"):
        client.request("GET", api.NODE_CONFIG)


def test_tls_context_is_tls13_and_verifies() -> None:
    ctx = tls_context(None)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.verify_mode == ssl.CERT_NONE


# --- node reports (POST /v1/node/report) ------------------------------------------------


def _report_doc(node: str) -> dict[str, Any]:
    return NodeReport(
        node=node,
        agent_ready=True,
        ztunnel_ready=True,
        config_revision=1,
        cert_not_after=2e9,
        bpf_programs=("mn_connect4",),
        endpoints=(EndpointHealth("default/api", "198.18.0.12:8080", "n2", True, 2.5),),
        edges=(
            TrafficEdge(
                "spiffe://cluster.local/ns/default/sa/web",
                "spiffe://cluster.local/ns/default/sa/api",
                True,
                3,
                10,
                20,
            ),
        ),
        agent_version="test",
    ).to_dict()


def _enrolled(cp: ThreadedControlPlane, tmp_path: Path, name: str) -> EnrolledNode:
    token = cp.admin().call("POST", api.ADMIN_TOKENS, {"node": name})["token"]
    status, data, node = enroll(cp.url, cp.bundle(), token, name, tmp_path / name)
    assert status == 200 and node is not None, data
    return node


async def _node_post(
    cp: ThreadedControlPlane, node: EnrolledNode | None, body: bytes
) -> tuple[int, Any, dict[str, str]]:
    ctx = tls_context(
        cp.bundle(),
        cert_file=str(node.cert_path) if node else None,
        key_file=str(node.key_path) if node else None,
    )
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.post(
            cp.url + api.NODE_REPORT, data=body, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        return resp.status, await resp.json(), dict(resp.headers)


def test_node_report_is_kept_and_listed(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    n1, _n2 = _enrolled(cp, tmp_path, "n1"), _enrolled(cp, tmp_path, "n2")
    status, data, _ = _run(_node_post(cp, n1, json.dumps(_report_doc("n1")).encode()))
    assert status == 200 and data["node"] == "n1", data
    got = cp.cp.reports.get("n1")
    assert got is not None and got.report.edges[0].connections == 3
    items = {n["name"]: n for n in cp.admin().call("GET", api.ADMIN_NODES)["items"]}
    assert items["n1"]["stale"] is False and items["n1"]["last_report"] == got.at
    assert items["n1"]["cert_not_after"] == 2e9 and items["n1"]["agent_version"] == "test"
    assert items["n1"]["config_revision"] == 1 and items["n1"]["ztunnel_ready"] is True
    assert items["n1"]["ejected_endpoints"] == 1 and "report" not in items["n1"]
    # a node that never reported is listed, stale, with nothing known
    assert items["n2"]["stale"] is True and items["n2"]["last_report"] is None
    full = cp.admin().call("GET", api.ADMIN_NODES + "?report=1")["items"]
    assert full[0]["report"] == _report_doc("n1") and full[1]["report"] is None
    # a deleted node's report goes with it
    cp.admin().call("DELETE", api.path(api.ADMIN_NODE, name="n1"))
    assert cp.cp.reports.get("n1") is None


def test_node_report_for_another_node_is_refused(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    n1, _n2 = _enrolled(cp, tmp_path, "n1"), _enrolled(cp, tmp_path, "n2")
    status, data, _ = _run(_node_post(cp, n1, json.dumps(_report_doc("n2")).encode()))
    assert status == 403 and "n1 may report only for itself, not for 'n2'" in data["error"]
    assert cp.cp.reports.get("n2") is None and cp.cp.reports.get("n1") is None


def test_node_report_needs_a_node_certificate(cp: ThreadedControlPlane) -> None:
    status, data, _ = _run(_node_post(cp, None, json.dumps(_report_doc("n1")).encode()))
    assert status == 401 and "client certificate" in data["error"]
    # the admin token is not a node's certificate either
    status, data = _run(
        _request(
            cp,
            "POST",
            api.NODE_REPORT,
            json=_report_doc("n1"),
            headers={"Authorization": f"Bearer {_admin_token(cp)}"},
        )
    )
    assert status == 401, data
    assert cp.cp.reports.all() == {}


def test_node_report_bad_json_and_schema(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    n1 = _enrolled(cp, tmp_path, "n1")
    status, data, _ = _run(_node_post(cp, n1, b"{not json"))
    assert status == 400 and "not valid JSON" in data["error"]
    doc = _report_doc("n1")
    doc["edges"][0]["connections"] = -1
    status, data, _ = _run(_node_post(cp, n1, json.dumps(doc).encode()))
    assert status == 400 and "report.edges[0].connections" in data["error"], data
    status, data, _ = _run(_node_post(cp, n1, b"[" * 30000 + b"]" * 30000))
    assert status == 400, data  # deep nesting within the cap: refused, never a 500
    assert cp.cp.reports.get("n1") is None


def test_node_report_oversized_is_refused_before_parsing(
    cp: ThreadedControlPlane, tmp_path: Path
) -> None:
    n1 = _enrolled(cp, tmp_path, "n1")
    # announced larger than the cap: 413 at once, with only a few bytes sent
    ctx = tls_context(cp.bundle(), cert_file=str(n1.cert_path), key_file=str(n1.key_path))
    head = (
        f"POST {api.NODE_REPORT} HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_REPORT_BYTES + 1}\r\n\r\n"
    ).encode()
    with (
        socket.create_connection(("127.0.0.1", cp.cp.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head + b"{")
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    # chunked, without a length: cut off at the cap, even though it is valid JSON
    doc = _report_doc("n1")
    doc["agent_version"] = "x" * 200
    doc["padding"] = "y" * MAX_REPORT_BYTES

    async def chunks() -> AsyncIterator[bytes]:
        body = json.dumps(doc).encode()
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    async def post() -> int:
        connector = aiohttp.TCPConnector(ssl=ctx)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(cp.url + api.NODE_REPORT, data=chunks()) as resp,
        ):
            return resp.status

    assert _run(post()) == 413
    assert cp.cp.reports.get("n1") is None


def test_node_report_rate_limit(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    n1, n2 = _enrolled(cp, tmp_path, "n1"), _enrolled(cp, tmp_path, "n2")
    body = json.dumps(_report_doc("n1")).encode()
    first, _, _ = _run(_node_post(cp, n1, body))
    status, data, headers = _run(_node_post(cp, n1, body))
    assert first == 200 and status == 429, data
    assert headers["Retry-After"] == "1" and data["retry_after"] == 1
    assert "send the next report in 1s" in data["error"]
    # another node is not held back by n1
    assert _run(_node_post(cp, n2, json.dumps(_report_doc("n2")).encode()))[0] == 200
    time.sleep(MIN_REPORT_INTERVAL + 0.05)
    assert _run(_node_post(cp, n1, body))[0] == 200
