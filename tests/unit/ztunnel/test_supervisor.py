"""The supervisor's pure parts (what an upgrade hands to the new image, worker socket
names per generation, merging the workers' reports) and a worker at boot."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from meshnode.ztunnel.supervisor import (
    GENERATION_ENV,
    RETIRE_ENV,
    inherited,
    merge_reports,
    worker_socket,
)


def test_a_fresh_start_inherits_nothing() -> None:
    assert inherited({}) == (0, [])


def test_an_upgrade_hands_over_the_generation_and_the_workers_to_retire() -> None:
    assert inherited({GENERATION_ENV: "2", RETIRE_ENV: "101,102"}) == (2, [101, 102])


def test_bad_or_dangerous_handover_values_are_ignored() -> None:
    # A garbled environment must never make the supervisor signal init or a process group.
    assert inherited({GENERATION_ENV: "x", RETIRE_ENV: "101"}) == (0, [])
    assert inherited({GENERATION_ENV: "-3", RETIRE_ENV: "0,1,-5,77"}) == (0, [77])


def test_each_generation_has_its_own_worker_sockets() -> None:
    run = Path("/run/x")
    first = {worker_socket(run, 0, i) for i in range(4)}
    second = {worker_socket(run, 1, i) for i in range(4)}
    assert len(first | second) == 8
    # The first generation keeps the names older versions used.
    assert worker_socket(run, 0, 1) == "/run/x/ztunnel-worker-1.sock"


def _endpoint(address: str, ejected: bool, ewma: float) -> dict[str, object]:
    return {
        "service": "default/api",
        "address": address,
        "node": "n2",
        "ejected": ejected,
        "ewma_ms": ewma,
    }


def _edge(connections: int) -> dict[str, object]:
    return {
        "source": "spiffe://td/ns/default/sa/web",
        "destination": "spiffe://td/ns/default/sa/api",
        "mtls": True,
        "connections": connections,
        "bytes_sent": 10 * connections,
        "bytes_received": 20 * connections,
    }


def test_reports_merge_ejections_and_add_up_edges() -> None:
    one = {"endpoints": [_endpoint("10.0.0.2:80", False, 1.0)], "edges": [_edge(3)]}
    two = {"endpoints": [_endpoint("10.0.0.2:80", True, 4.0)], "edges": [_edge(5)]}
    merged = merge_reports([one, two])
    assert merged["endpoints"] == [_endpoint("10.0.0.2:80", True, 4.0)]
    assert merged["edges"] == [_edge(8)]
    # The inputs are left as they were.
    assert one["endpoints"] == [_endpoint("10.0.0.2:80", False, 1.0)]


def test_a_proxy_started_before_the_agent_pinned_its_maps_serves_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At boot ztunnel can start before the agent has compiled and pinned its BPF maps:
    a worker must come up (and be retried by nothing but the next connection), never
    crash on the missing pin or log it at every connection."""
    from meshnode.ztunnel.proxy import OrigDstSource

    source = OrigDstSource()
    with caplog.at_level(logging.ERROR, logger="meshnode.ztunnel"):
        source.reopen(str(tmp_path / "not-pinned-yet"))
        for port in range(5):
            assert source.pop("127.0.0.1", 40000 + port, "240.0.0.1", 80) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "original-destination map" in errors[0].getMessage()
