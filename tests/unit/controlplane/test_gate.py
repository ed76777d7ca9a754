"""The control plane spends nothing before authenticating (issue 10, attack 8):
connection caps per peer and in total, counted before any TLS work, and
deadlines for the handshake and the request head. Pure limits first, then a
real control plane over real sockets."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.controlplane.api.gate import ConnectionLimits
from meshnode.controlplane.store import open_store
from meshnode.core.cpclient import ClientError
from tests.support.controlplane import ThreadedControlPlane


def test_limits_per_peer_and_in_total() -> None:
    limits = ConnectionLimits(per_peer=2, total=3)
    assert limits.admit("10.0.0.1") == "" and limits.admit("10.0.0.1") == ""
    assert "cap per peer" in limits.admit("10.0.0.1")
    assert limits.admit("10.0.0.2") == ""
    assert "total cap" in limits.admit("10.0.0.3")
    assert limits.refused == 2 and limits.count == 3
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.3") == ""
    limits.release("10.0.0.9")  # never admitted: nothing to give back
    assert limits.count == 3
    with pytest.raises(ValueError):
        ConnectionLimits(0, 10)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(
        store,
        tmp_path / "data",
        max_connections_per_peer=3,
        handshake_timeout=1.0,
        header_timeout=1.0,
    ).start()
    yield server
    server.stop()
    store.close()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Did the server close `sock` (EOF or reset) within `within` seconds?"""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_flood_of_idle_connections_is_capped_and_timed_out(cp: ThreadedControlPlane) -> None:
    # The attack: hold connections open without a byte, to starve the server.
    idle = [socket.create_connection(("127.0.0.1", cp.cp.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        # Past the cap: closed at once, and a real client is refused meanwhile.
        extra = socket.create_connection(("127.0.0.1", cp.cp.port))
        assert _closed_by_server(extra, 2.0)
        extra.close()
        with pytest.raises(ClientError):
            cp.admin().call("GET", "/v1/admin/nodes", timeout=3)
        assert cp.cp.limits.refused >= 2
        # Nothing arrives within the handshake deadline: each idle one is closed...
        assert all(_closed_by_server(s, 3.0) for s in idle)
    finally:
        for s in idle:
            s.close()
    # ... and the slots are free again (the control case).
    time.sleep(0.2)
    assert cp.admin().call("GET", "/v1/admin/nodes")["items"] == []
    assert cp.cp.limits.count <= 1


def test_a_request_head_that_never_ends_is_cut_off(cp: ThreadedControlPlane) -> None:
    ctx = ssl.create_default_context(cadata=cp.bundle().decode())
    raw = socket.create_connection(("127.0.0.1", cp.cp.port))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /v1/trust-bundle HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        started = time.monotonic()
        tls.settimeout(5.0)
        try:
            got = tls.recv(1)
        except (ConnectionResetError, ssl.SSLError):
            got = b""
        assert got == b"" and time.monotonic() - started < 4.0
    # Control: a whole request is answered.
    assert "trust_bundle" in cp.admin().call("GET", "/v1/trust-bundle")
