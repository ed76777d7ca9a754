"""deploy/grafana/meshnode.json: every metric a panel queries is one that ztunnel or
the control plane exports -- names read from their real registries, so a renamed
metric fails here, not on an operator's empty graph."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from meshnode.controlplane.metrics import ControlPlaneMetrics
from meshnode.core.metrics import Histogram, Registry
from meshnode.ztunnel.dns import DnsMetrics
from meshnode.ztunnel.metrics import ProxyMetrics

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "meshnode.json"

# What PromQL spells with identifiers that are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
# Labels Prometheus adds to every series it scrapes, and a histogram's bucket bound.
SCRAPE_LABELS = {"instance", "job", "le"}


def _registries() -> list[Registry]:
    proxy = ProxyMetrics()
    DnsMetrics(proxy.registry)  # the proxy registers its DNS metrics in its registry
    return [proxy.registry, ControlPlaneMetrics().registry]


def exported() -> tuple[set[str], set[str]]:
    """(series names, label names) the two components export."""
    names: set[str] = set()
    labels = set(SCRAPE_LABELS)
    for registry in _registries():
        for m in registry.metrics:
            f = m.family
            labels |= set(f.label_names)
            if isinstance(m, Histogram):
                names |= {f"{f.name}_bucket", f"{f.name}_sum", f"{f.name}_count"}
            else:
                names.add(f.name)
    return names, labels


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, grouping label names) used in a PromQL expression."""
    grouped: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouped |= {g.strip() for g in clause.split(",") if g.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # string literals
    matchers = re.findall(r"\{([^}]*)\}", text)
    for m in matchers:
        grouped |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m))
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges ($__rate_interval)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS:
            continue  # a function, or a keyword
        names.add(word)
    return names, grouped


def _panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def _exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    found = [
        (p["title"], t["expr"]) for p in _panels(doc) for t in p.get("targets", []) if "expr" in t
    ]
    for var in doc["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if var.get("type") == "query" and isinstance(query, str):
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert inner is not None, f"variable {var['name']}: unexpected query {query!r}"
            found.append((f"variable {var['name']}", f"sum by ({inner[2]}) ({inner[1]})"))
    return found


def test_every_panel_queries_metrics_that_are_exported() -> None:
    names, labels = exported()
    exprs = _exprs()
    assert len(exprs) >= 20, "the dashboard lost its panels"
    problems = []
    used = set()
    for title, expr in exprs:
        metric_names, label_names = promql_names(expr)
        assert metric_names, f"{title}: no metric found in {expr!r}"
        used |= metric_names
        problems += [f"{title}: metric {n} is not exported" for n in metric_names - names]
        problems += [f"{title}: label {n} is on no exported metric" for n in label_names - labels]
    assert not problems, "\n".join(problems)
    # The three views the dashboard promises have data behind them.
    assert {"istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total"} <= used
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= used
    assert "meshnode_controlplane_request_duration_seconds_bucket" in used


def test_panels_have_unique_ids_and_the_data_source_is_chosen_at_import() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in _panels(doc)]
    assert len(ids) == len(set(ids))
    for p in _panels(doc):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        (
            'sum by (source_principal) (rate(istio_tcp_connections_opened_total{job=~"$j",'
            'reporter="source"}[$__rate_interval]))',
            {"istio_tcp_connections_opened_total"},
            {"source_principal", "job", "reporter"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket[5m]))) / b",
            {"a_seconds_bucket", "b"},
            {"le"},
        ),
    ],
)
def test_the_reader_finds_metric_and_label_names(
    expr: str, metrics: set[str], labels: set[str]
) -> None:
    assert promql_names(expr) == (metrics, labels)


def test_a_drifted_name_is_caught() -> None:
    names, _ = exported()
    found, _ = promql_names("rate(istio_tcp_connections_open_total[1m])")
    assert found - names == {"istio_tcp_connections_open_total"}
