"""The node proxy's Prometheus metrics.

The TCP metrics carry Istio's names and labels (``istio_tcp_*``), so existing
dashboards work; meshnode's own (endpoint health, ejections, pool, handshakes,
authorization) are ``meshnode_*``; the process's memory and CPU are Prometheus'
standard ``process_*``. Pure bookkeeping: the proxy records, the admin server
renders. The exposition code itself is core/metrics.py (the control plane uses it
too); its names are re-exported here for the proxy's modules."""

from __future__ import annotations

from meshnode.core.metrics import (
    Counter,
    Gauge,
    Histogram,
    LabelValues,
    Metric,
    ProcessMetrics,
    Registry,
    Sample,
    parse_exposition,
)

__all__ = [
    "TCP_LABELS",
    "Counter",
    "Gauge",
    "Histogram",
    "LabelValues",
    "Metric",
    "ProxyMetrics",
    "Registry",
    "Sample",
    "parse_exposition",
]

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
        # The workers' own (a supervisor sums its workers' exposition: their total).
        self.process = ProcessMetrics(r)

    def render(self) -> str:
        return self.registry.render()

    def edges(self) -> dict[tuple[str, str, bool], tuple[int, int, int]]:
        """(source principal, destination principal, mutual TLS) -> (connections
        opened, bytes sent, bytes received), summed over the other labels, as
        this node's callers saw them (reporter "source": each connection once)."""
        src, dst, sec = (
            TCP_LABELS.index(n)
            for n in ("source_principal", "destination_principal", "connection_security_policy")
        )
        out: dict[tuple[str, str, bool], list[int]] = {}
        for counter, slot in ((self.opened, 0), (self.sent, 1), (self.received, 2)):
            for labels, value in counter.values.items():
                if labels[0] != "source":
                    continue
                key = (labels[src], labels[dst], labels[sec] == "mutual_tls")
                out.setdefault(key, [0, 0, 0])[slot] += int(value)
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}
