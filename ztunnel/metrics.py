"""Prometheus metrics, in the text exposition format, without a client library.

The TCP metrics carry Istio's names and labels (``istio_tcp_*``), so existing
dashboards work; meshnode's own (endpoint health, ejections, pool, handshakes,
authorization) are ``meshnode_*``. Pure bookkeeping: the proxy records, the
admin server renders."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

LabelValues = tuple[str, ...]

# Istio's standard TCP labels, in a fixed order.
TCP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_canonical_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


@dataclass
class _Family:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    label_names: tuple[str, ...]


class Counter:
    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        self.family = _Family(name, help, "counter", tuple(label_names))
        self.values: dict[LabelValues, float] = {}

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, labels: LabelValues = ()) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        f = self.family
        for labels, value in self.values.items():
            yield f"{f.name}{_labels(f.label_names, labels)} {_num(value)}"


class Gauge(Counter):
    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help, label_names)
        self.family.kind = "gauge"

    def set(self, labels: LabelValues, value: float) -> None:
        self.values[labels] = value

    def replace(self, values: dict[LabelValues, float]) -> None:
        self.values = dict(values)


class Histogram:
    def __init__(
        self, name: str, help: str, buckets: Sequence[float], label_names: Sequence[str] = ()
    ) -> None:
        self.family = _Family(name, help, "histogram", tuple(label_names))
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, labels: LabelValues = ()) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        # Buckets are cumulative: every bucket whose bound is >= value counts it.
        for i in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> Iterable[str]:
        f = self.family
        for labels, s in self.series.items():
            for i, bound in enumerate(self.buckets):
                le = 'le="' + _num(bound) + '"'
                yield f"{f.name}_bucket{_labels(f.label_names, labels, le)} {_num(s[i])}"
            inf = 'le="+Inf"'
            yield f"{f.name}_bucket{_labels(f.label_names, labels, inf)} {_num(s[-1])}"
            yield f"{f.name}_sum{_labels(f.label_names, labels)} {_num(s[-2])}"
            yield f"{f.name}_count{_labels(f.label_names, labels)} {_num(s[-1])}"


Metric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            f = m.family
            lines.append(f"# HELP {f.name} {f.help}")
            lines.append(f"# TYPE {f.name} {f.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class ProxyMetrics:
    """Every metric the node proxy exports."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.opened = Counter(
            "istio_tcp_connections_opened_total", "TCP connections opened", TCP_LABELS
        )
        self.closed = Counter(
            "istio_tcp_connections_closed_total", "TCP connections closed", TCP_LABELS
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes_total",
            "Bytes sent by the client side, per connection at its close",
            TCP_LABELS,
        )
        self.received = Counter(
            "istio_tcp_received_bytes_total",
            "Bytes received by the client side, per connection at its close",
            TCP_LABELS,
        )
        for m in (self.opened, self.closed, self.sent, self.received):
            r.add(m)
        self.failed = r.add(
            Counter(
                "meshnode_connections_failed_total",
                "Connections that failed, by direction and reason class",
                ("direction", "reason"),
            )
        )
        self.denied = r.add(
            Counter(
                "meshnode_authz_denied_total",
                "Inbound connections refused by L4 authorization, by deciding policy",
                ("policy", "destination_service"),
            )
        )
        self.revoked = r.add(
            Counter(
                "meshnode_connections_revoked_total",
                "Established connections closed because the rules changed: a policy now "
                "denies them, or the trust bundle dropped the root they were verified under",
                ("reason",),
            )
        )
        self.endpoint_healthy = r.add(
            Gauge(
                "meshnode_endpoint_healthy",
                "1 if the endpoint is not ejected",
                ("service", "endpoint"),
            )
        )
        self.endpoint_ewma = r.add(
            Gauge(
                "meshnode_endpoint_latency_ewma_seconds",
                "Peak-EWMA of connect latency",
                ("service", "endpoint"),
            )
        )
        self.endpoint_inflight = r.add(
            Gauge(
                "meshnode_endpoint_inflight",
                "Connections in flight to the endpoint",
                ("service", "endpoint"),
            )
        )
        self.ejections = r.add(
            Counter("meshnode_endpoint_ejections_total", "Outlier ejections", ("endpoint",))
        )
        self.retries = r.add(
            Counter(
                "meshnode_connect_retries_total",
                "Connect attempts retried on another endpoint",
                ("service",),
            )
        )
        self.pool_connections = r.add(
            Gauge("meshnode_hbone_pool_connections", "Pooled outbound HBONE connections")
        )
        self.handshake = r.add(
            Histogram(
                "meshnode_hbone_handshake_seconds",
                "TCP + TLS handshake to a peer node",
                (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            )
        )

    def render(self) -> str:
        return self.registry.render()


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """A strict reader of the text format (for tests and `meshnode` tools):
    raises ValueError on any line it cannot parse."""
    out: list[Sample] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        name_end = len(line)
        for i, ch in enumerate(line):
            if ch in "{ ":
                name_end = i
                break
        name = line[:name_end]
        rest = line[name_end:]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            close = rest.index("}")
            body = rest[1:close]
            rest = rest[close + 1 :]
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq]
                if body[eq + 1] != '"':
                    raise ValueError(f"line {n}: label {key} not quoted")
                j = eq + 2
                val = []
                while body[j] != '"':
                    if body[j] == "\\":
                        j += 1
                        val.append({"n": "\n"}.get(body[j], body[j]))
                    else:
                        val.append(body[j])
                    j += 1
                labels[key] = "".join(val)
                i = j + 1
                if i < len(body) and body[i] == ",":
                    i += 1
        value_text = rest.strip().split(" ")[0]
        if not name or not value_text:
            raise ValueError(f"line {n}: cannot parse {line!r}")
        out.append(Sample(name, labels, float(value_text)))
    return out
