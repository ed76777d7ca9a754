"""The control plane's own metrics on their plain-HTTP listener (loopback)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.controlplane.metrics import parse_metrics_listen
from meshnode.controlplane.store import open_store
from meshnode.core.metrics import Sample, parse_exposition
from tests.support.controlplane import ThreadedControlPlane, enroll


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ThreadedControlPlane]:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data", metrics_listen="127.0.0.1:0").start()
    yield server
    server.stop()
    store.close()


def _scrape(cp: ThreadedControlPlane) -> list[Sample]:
    assert cp.cp.metrics.address is not None
    host, port = cp.cp.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_exposition(resp.read().decode())


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_requests_watchers_and_state_are_counted(cp: ThreadedControlPlane, tmp_path: Path) -> None:
    token = cp.admin().call("POST", "/v1/admin/tokens", {"node": "n1", "address": "198.18.0.11"})
    status, _, node = enroll(
        cp.url, cp.bundle(), token["token"], "n1", tmp_path / "n1", ip="198.18.0.11"
    )
    assert status == 200 and node is not None
    client = node.client(cp.url)
    rev = client.call("GET", "/v1/node/config")["revision"]
    waiting = threading.Thread(
        target=client.call, args=("GET", f"/v1/node/config?since={rev}&wait=3"), daemon=True
    )
    waiting.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        samples = _scrape(cp)
        if _value(samples, "meshnode_controlplane_watchers", kind="long_poll") == 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the long poll never showed in meshnode_controlplane_watchers")
    assert _value(samples, "meshnode_controlplane_watchers", kind="stream") == 0
    assert _value(samples, "meshnode_controlplane_nodes") == 1
    assert _value(samples, "meshnode_controlplane_store_revision") == rev
    count = "meshnode_controlplane_request_duration_seconds_count"
    assert _value(samples, count, method="POST", route="/v1/admin/tokens", status="200") == 1
    assert _value(samples, count, route="/v1/node/config", status="200") >= 1
    assert _value(samples, "process_resident_memory_bytes") > 0
    waiting.join(10)
    assert _value(_scrape(cp), "meshnode_controlplane_watchers", kind="long_poll") == 0


def test_the_listener_serves_metrics_alone(cp: ThreadedControlPlane) -> None:
    assert cp.cp.metrics.address is not None
    host, port = cp.cp.metrics.address
    for path in ("/v1/admin/nodes", "/v1/trust-bundle", "/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5)
        assert err.value.code == 404


def test_no_listener_unless_asked(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/cp.db")
    server = ThreadedControlPlane(store, tmp_path / "data").start()
    try:
        assert server.cp.metrics.address is None
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize("bad", ["15091", "localhost:15091", "127.0.0.1:", "127.0.0.1:99999"])
def test_a_bad_metrics_address_is_refused_saying_what_to_give(bad: str) -> None:
    with pytest.raises(ValueError, match="expected IP:PORT"):
        parse_metrics_listen(bad)
    assert parse_metrics_listen("[::1]:15091") == ("::1", 15091)
