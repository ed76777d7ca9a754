"""The node report contract (core/contracts/report.py): a round trip, the refusal
of bad and oversized input with a message naming the field, and fit()."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from meshnode.core.contracts import ContractError, EndpointHealth, NodeReport, TrafficEdge
from meshnode.core.contracts.report import (
    MAX_EDGES,
    MAX_ENDPOINTS,
    MAX_REPORT_BYTES,
    REPORT_SCHEMA,
    endpoint_address,
    fit,
    report_bytes,
)

WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/default/sa/api"


def _report(**kw: Any) -> NodeReport:
    base = NodeReport(
        node="node1",
        agent_ready=True,
        ztunnel_ready=True,
        config_revision=7,
        cert_not_after=1_900_000_000.5,
        bpf_programs=("mn_connect4", "mn_sockops"),
        endpoints=(
            EndpointHealth("default/api", "198.18.0.12:8080", "node2", False, 1.25),
            EndpointHealth("default/api", "[fd00::1]:8080", "", True, 0.0),
        ),
        edges=(TrafficEdge(WEB, API, True, 12, 3400, 5600),),
        agent_version="0.1.0",
    )
    return replace(base, **kw)


def test_round_trip_through_json() -> None:
    report = _report()
    wire = json.loads(json.dumps(report.to_dict()))
    assert wire["schema"] == REPORT_SCHEMA
    assert NodeReport.from_dict(wire) == report


def test_empty_lists_and_optional_fields() -> None:
    doc = _report(endpoints=(), edges=(), bpf_programs=()).to_dict()
    del doc["endpoints"], doc["edges"], doc["bpf_programs"], doc["agent_version"]
    back = NodeReport.from_dict(doc)
    assert back.endpoints == () and back.edges == () and back.agent_version == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(schema=2), "report.schema: report schema 2 is not 1"),
        (lambda d: d.update(schema=True), "report.schema"),
        (lambda d: d.update(node="Node_1"), "report.node: 'Node_1' is not a DNS label"),
        (lambda d: d.pop("agent_ready"), "missing field 'agent_ready'"),
        (lambda d: d.update(agent_ready="yes"), "report.agent_ready: expected bool"),
        (lambda d: d.update(config_revision=-1), "report.config_revision: -1 must be a count"),
        (lambda d: d.update(config_revision=1.5), "report.config_revision: expected int"),
        (lambda d: d.update(cert_not_after=float("nan")), "report.cert_not_after"),
        (lambda d: d.update(cert_not_after="soon"), "report.cert_not_after: expected a number"),
        (lambda d: d.update(extra=1), "report: unknown field 'extra'"),
        (lambda d: d.update(bpf_programs=[""]), "report.bpf_programs[0]"),
        (lambda d: d.update(endpoints={}), "report.endpoints: expected list"),
        (
            lambda d: d["endpoints"][1].update(address="fd00::1"),
            "report.endpoints[1].address",
        ),
        (
            lambda d: d["endpoints"][0].update(address="198.18.0.12:0"),
            "report.endpoints[0].address",
        ),
        (lambda d: d["endpoints"][0].update(service="api"), "is not namespace/name"),
        (lambda d: d["endpoints"][0].update(ewma_ms=-1), "report.endpoints[0].ewma_ms"),
        (lambda d: d["edges"][0].update(source="web"), "report.edges[0].source"),
        (lambda d: d["edges"][0].update(connections=-3), "report.edges[0].connections"),
        (lambda d: d["edges"][0].update(mtls=1), "report.edges[0].mtls: expected bool"),
        (lambda d: d.update(agent_version="x" * 300), "report.agent_version"),
    ],
)
def test_bad_reports_are_refused_naming_the_field(change: Any, message: str) -> None:
    doc = _report().to_dict()
    change(doc)
    with pytest.raises(ContractError, match=message.replace("[", r"\[").replace("]", r"\]")):
        NodeReport.from_dict(doc)


def test_not_an_object() -> None:
    for bad in (None, [], "report", 3):
        with pytest.raises(ValueError, match="report: expected dict"):
            NodeReport.from_dict(bad)


def test_lists_longer_than_their_bound_are_refused() -> None:
    doc = _report().to_dict()
    doc["edges"] = [doc["edges"][0]] * (MAX_EDGES + 1)
    with pytest.raises(ContractError, match=f"report.edges: {MAX_EDGES + 1} entries, more"):
        NodeReport.from_dict(doc)
    doc = _report().to_dict()
    doc["endpoints"] = [doc["endpoints"][0]] * (MAX_ENDPOINTS + 1)
    with pytest.raises(ContractError, match="report.endpoints: .* more than the 512"):
        NodeReport.from_dict(doc)


def test_endpoint_address_forms() -> None:
    assert endpoint_address("10.0.0.1", 80) == "10.0.0.1:80"
    assert endpoint_address("fd00::1", 80) == "[fd00::1]:80"
    ep = EndpointHealth.from_dict(
        {"service": "a/b", "address": "[FD00::1]:80", "node": "", "ejected": False, "ewma_ms": 0}
    )
    assert ep.address == "[fd00::1]:80"  # normalised


def _big(n_endpoints: int, n_edges: int) -> NodeReport:
    long_ns = "n" * 63
    endpoints = tuple(
        EndpointHealth(
            f"{long_ns}/{'s' * 60}{i % 10}",
            f"10.0.{i // 250}.{i % 250}:8080",
            "x" * 63,
            i % 97 == 0,  # a few ejected, scattered
            float(i % 13),
        )
        for i in range(n_endpoints)
    )
    edges = tuple(
        TrafficEdge(
            f"spiffe://cluster.local/ns/{long_ns}/sa/{'a' * 55}{i:05d}",
            f"spiffe://cluster.local/ns/{long_ns}/sa/{'b' * 55}{i:05d}",
            True,
            i,
            i * 10,
            i * 20,
        )
        for i in range(n_edges)
    )
    return _report(endpoints=endpoints, edges=edges)


def test_fit_keeps_within_bounds_and_keeps_the_most_useful() -> None:
    big = _big(2000, 2000)
    assert report_bytes(big) > MAX_REPORT_BYTES
    small = fit(big)
    assert report_bytes(small) <= MAX_REPORT_BYTES
    assert len(small.endpoints) <= MAX_ENDPOINTS and len(small.edges) <= MAX_EDGES
    assert small.endpoints and small.edges
    # every ejected endpoint comes before any healthy one, and survives first
    ejected = [e for e in big.endpoints if e.ejected]
    assert list(small.endpoints[: len(ejected)]) == sorted(
        ejected, key=lambda e: (-e.ewma_ms, e.service, e.address)
    )
    # the busiest edges are kept
    assert small.edges[0].connections == 1999
    assert min(e.connections for e in small.edges) > max(
        e.connections for e in big.edges if e not in small.edges
    )
    # and what fit() makes, the receiver takes
    assert NodeReport.from_dict(json.loads(json.dumps(small.to_dict()))) == small


def test_fit_leaves_a_small_report_alone() -> None:
    report = _report()
    assert fit(report).edges == report.edges
    assert set(fit(report).endpoints) == set(report.endpoints)
