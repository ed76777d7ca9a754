"""The control plane's book of node reports (controlplane/reports.py): staleness,
connection rates between reports, the per-node rate limit, forgetting."""

from __future__ import annotations

import pytest

from meshnode.controlplane.reports import STALE_AFTER, ReportBook
from meshnode.core.contracts import NodeReport, TrafficEdge

WEB = "spiffe://cluster.local/ns/default/sa/web"
API = "spiffe://cluster.local/ns/default/sa/api"
DB = "spiffe://cluster.local/ns/default/sa/db"


def _report(node: str = "node1", edges: tuple[TrafficEdge, ...] = ()) -> NodeReport:
    return NodeReport(node, True, True, 3, 2e9, (), (), edges, "0.1.0")


def _edge(src: str, dst: str, n: int, mtls: bool = True) -> TrafficEdge:
    return TrafficEdge(src, dst, mtls, n, 0, 0)


def test_stale_without_a_report_and_after_the_timeout() -> None:
    book = ReportBook()
    assert book.stale("node1", 1000.0)
    assert book.get("node1") is None
    book.put("node1", _report(), 1000.0)
    assert not book.stale("node1", 1000.0)
    assert not book.stale("node1", 1000.0 + STALE_AFTER)
    assert book.stale("node1", 1000.0 + STALE_AFTER + 0.1)
    assert book.stale("node2", 1000.0)  # another node's report says nothing of node2
    got = book.get("node1")
    assert got is not None and got.at == 1000.0 and got.report == _report()


def test_rates_between_reports() -> None:
    book = ReportBook()
    book.put("node1", _report(edges=(_edge(WEB, API, 10),)), 100.0)
    first = book.get("node1")
    assert first is not None and first.rates == {}
    edges = (_edge(WEB, API, 40), _edge(WEB, API, 5, mtls=False), _edge(WEB, DB, 6))
    book.put("node1", _report(edges=edges), 110.0)
    got = book.get("node1")
    assert got is not None
    # both WEB->API edges (mTLS or not) count: (40 + 5 - 10) / 10 s; DB is new
    assert got.rates == {(WEB, API): pytest.approx(3.5), (WEB, DB): pytest.approx(0.6)}


def test_a_counter_that_went_down_means_ztunnel_restarted() -> None:
    book = ReportBook()
    book.put("node1", _report(edges=(_edge(WEB, API, 500),)), 100.0)
    book.put("node1", _report(edges=(_edge(WEB, API, 20),)), 120.0)
    got = book.get("node1")
    assert got is not None and got.rates == {(WEB, API): pytest.approx(1.0)}


def test_one_report_per_node_per_interval() -> None:
    book = ReportBook(min_interval=1.0)
    assert book.retry_after("node1", 100.0) == 0
    book.put("node1", _report(), 100.0)
    assert book.retry_after("node1", 100.4) == pytest.approx(0.6)
    assert book.retry_after("node2", 100.4) == 0  # per node
    assert book.retry_after("node1", 101.0) == 0


def test_forget_and_keep_only() -> None:
    book = ReportBook()
    for n in ("node1", "node2", "node3"):
        book.put(n, _report(n), 50.0)
    book.forget("node2")
    book.forget("node9")  # unknown: nothing happens
    assert sorted(book.all()) == ["node1", "node3"]
    assert book.get("node2") is None and book.stale("node2", 50.0)
    book.keep_only({"node3"})
    assert list(book.all()) == ["node3"]
    # all() is a copy: the caller cannot change the book through it
    book.all().clear()
    assert list(book.all()) == ["node3"]
