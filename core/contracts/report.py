"""A node's health report (agent -> control plane, ``POST /v1/node/report``),
schema ``REPORT_SCHEMA``; and its parts, which ztunnel's ``/report`` admin path
also serves (ztunnel -> agent).

The agent sends one every few seconds on its authenticated node channel; the
control plane keeps the latest per node (docs/protocol.md, "Node reports").
A report is bounded: at most ``MAX_ENDPOINTS`` endpoints, ``MAX_EDGES`` edges
and ``MAX_REPORT_BYTES`` of JSON. :func:`fit` trims a report to those bounds,
dropping the least useful entries; :meth:`NodeReport.from_dict` refuses
anything beyond them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from meshnode.core.contracts.validate import ContractError, Fields, check_ip, check_port
from meshnode.core.identity import IdentityError, SpiffeId, ZoneSni

__all__ = [
    "MAX_BPF_PROGRAMS",
    "MAX_EDGES",
    "MAX_ENDPOINTS",
    "MAX_REPORT_BYTES",
    "MIN_REPORT_INTERVAL",
    "REPORT_SCHEMA",
    "EndpointHealth",
    "NodeReport",
    "TrafficEdge",
    "ZTUNNEL_REPORT_PATH",
    "endpoint_address",
    "fit",
    "report_bytes",
]

REPORT_SCHEMA = 1
MAX_REPORT_BYTES = 64 * 1024  # the control plane refuses a larger body (413) before parsing
MAX_ENDPOINTS = 512
MAX_EDGES = 512
MAX_BPF_PROGRAMS = 32
# The control plane accepts one report per node per this many seconds (429
# beyond); an agent never reports more often than twice that.
MIN_REPORT_INTERVAL = 1.0
# ztunnel's admin path that serves its part of the report as
# {"endpoints": [EndpointHealth...], "edges": [TrafficEdge...]} (loopback only).
ZTUNNEL_REPORT_PATH = "/report"
_MAX_TEXT = 256  # service names, node names, program names, versions
_MAX_COUNT = 2**63 - 1


def endpoint_address(ip: str, port: int) -> str:
    """``10.0.0.1:80``, ``[fd00::1]:80``: how a report writes an endpoint (another
    zone's endpoints: ``<zone SNI>:<service port>``)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _address(value: object, path: str) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ContractError(f"{path}: {value!r} is not an endpoint address like 10.0.0.1:80")
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise ContractError(f"{path}: {value!r} has no port after the last ':'")
    if ZoneSni.shaped(host):  # another zone's endpoints, as one behind its ingress
        return f"{host}:{check_port(int(port), path)}"
    ip = check_ip(host[1:-1] if host.startswith("[") and host.endswith("]") else host, path)
    return endpoint_address(ip, check_port(int(port), path))


def _text(f: Fields, key: str, default: Any = None, *, empty: bool = True) -> str:
    value = f.string(key, default) if default is not None else f.string(key)
    if len(value) > _MAX_TEXT or (not empty and not value) or not value.isprintable():
        raise ContractError(
            f"{f.at(key)}: {value[:40]!r} must be printable text of "
            f"{'1' if not empty else '0'}-{_MAX_TEXT} characters"
        )
    return str(value)


def _count(f: Fields, key: str) -> int:
    value = f.integer(key)
    if not 0 <= value <= _MAX_COUNT:
        raise ContractError(f"{f.at(key)}: {value} must be a count >= 0")
    return int(value)


def _number(f: Fields, key: str) -> float:
    value = f.raw(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"{f.at(key)}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ContractError(f"{f.at(key)}: {value!r} must be a finite number >= 0")
    return float(value)


def _boolean(f: Fields, key: str) -> bool:
    return bool(f.typed(key, bool))


def _spiffe(f: Fields, key: str) -> str:
    value = f.string(key)
    try:
        return SpiffeId.parse(value).uri
    except IdentityError as exc:
        raise ContractError(f"{f.at(key)}: {exc}") from None


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """One endpoint as this node's balancer sees it."""

    service: str  # "namespace/name"
    address: str  # "ip:port" of the endpoint as this node's balancer knows it
    node: str  # the node the endpoint runs on ("" if unknown)
    ejected: bool  # outlier-ejected by this node's balancer right now
    ewma_ms: float  # peak-EWMA latency estimate in ms (0 if never used)

    FIELDS = ("service", "address", "node", "ejected", "ewma_ms")

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "address": self.address,
            "node": self.node,
            "ejected": self.ejected,
            "ewma_ms": self.ewma_ms,
        }

    @classmethod
    def from_dict(cls, d: object, path: str = "endpoint") -> EndpointHealth:
        f = Fields(d, path, cls.FIELDS)
        service = _text(f, "service", empty=False)
        ns, slash, name = service.partition("/")
        if not slash or not ns or not name or "/" in name:
            raise ContractError(f"{f.at('service')}: {service!r} is not namespace/name")
        return cls(
            service=service,
            address=_address(f.raw("address"), f.at("address")),
            node=_text(f, "node", ""),
            ejected=_boolean(f, "ejected"),
            ewma_ms=_number(f, "ewma_ms"),
        )


@dataclass(frozen=True, slots=True)
class TrafficEdge:
    """Connections from one identity to another through this node's ztunnel
    (counted where the caller is: each connection is reported once)."""

    source: str  # SPIFFE id of the caller
    destination: str  # SPIFFE id of the callee
    mtls: bool  # the hop was HBONE/mTLS
    connections: int  # connections opened, cumulative since this ztunnel started
    bytes_sent: int
    bytes_received: int

    FIELDS = ("source", "destination", "mtls", "connections", "bytes_sent", "bytes_received")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "mtls": self.mtls,
            "connections": self.connections,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    @classmethod
    def from_dict(cls, d: object, path: str = "edge") -> TrafficEdge:
        f = Fields(d, path, cls.FIELDS)
        return cls(
            source=_spiffe(f, "source"),
            destination=_spiffe(f, "destination"),
            mtls=_boolean(f, "mtls"),
            connections=_count(f, "connections"),
            bytes_sent=_count(f, "bytes_sent"),
            bytes_received=_count(f, "bytes_received"),
        )


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What a node says about itself, schema ``REPORT_SCHEMA``."""

    node: str
    agent_ready: bool
    ztunnel_ready: bool
    config_revision: int  # the slice revision the agent has applied
    cert_not_after: float  # unix seconds, the node certificate's expiry
    bpf_programs: tuple[str, ...]  # names of attached programs
    endpoints: tuple[EndpointHealth, ...]
    edges: tuple[TrafficEdge, ...]
    agent_version: str

    FIELDS = (
        "schema",
        "node",
        "agent_ready",
        "ztunnel_ready",
        "config_revision",
        "cert_not_after",
        "bpf_programs",
        "endpoints",
        "edges",
        "agent_version",
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "node": self.node,
            "agent_ready": self.agent_ready,
            "ztunnel_ready": self.ztunnel_ready,
            "config_revision": self.config_revision,
            "cert_not_after": self.cert_not_after,
            "bpf_programs": list(self.bpf_programs),
            "endpoints": [e.to_dict() for e in self.endpoints],
            "edges": [e.to_dict() for e in self.edges],
            "agent_version": self.agent_version,
        }

    @classmethod
    def from_dict(cls, d: object, path: str = "report") -> NodeReport:
        """Validated; ContractError (a ValueError) names the offending field.
        Lists longer than their bound are refused, not cut: the sender trims
        (:func:`fit`), so what arrives is what it meant."""
        f = Fields(d, path, cls.FIELDS)
        schema = f.obj.get("schema")
        if schema != REPORT_SCHEMA or isinstance(schema, bool):
            raise ContractError(
                f"{f.at('schema')}: report schema {schema!r} is not {REPORT_SCHEMA}; "
                "run the same meshnode version on the node and the control plane"
            )
        node = f.label("node")
        programs = _bounded(f, "bpf_programs", MAX_BPF_PROGRAMS)
        endpoints = _bounded(f, "endpoints", MAX_ENDPOINTS)
        edges = _bounded(f, "edges", MAX_EDGES)
        names = []
        for raw, p in programs:
            if not isinstance(raw, str) or not raw or len(raw) > _MAX_TEXT or not raw.isprintable():
                raise ContractError(f"{p}: {raw!r} is not a program name")
            names.append(raw)
        return cls(
            node=node,
            agent_ready=_boolean(f, "agent_ready"),
            ztunnel_ready=_boolean(f, "ztunnel_ready"),
            config_revision=_count(f, "config_revision"),
            cert_not_after=_number(f, "cert_not_after"),
            bpf_programs=tuple(names),
            endpoints=tuple(EndpointHealth.from_dict(e, p) for e, p in endpoints),
            edges=tuple(TrafficEdge.from_dict(e, p) for e, p in edges),
            agent_version=_text(f, "agent_version", ""),
        )


def _bounded(f: Fields, key: str, limit: int) -> list[tuple[Any, str]]:
    items = f.items(key, [])
    if len(items) > limit:
        raise ContractError(
            f"{f.at(key)}: {len(items)} entries, more than the {limit} a report may hold"
        )
    return items


def report_bytes(report: NodeReport) -> int:
    """The size of the report's JSON body as the node client sends it."""
    return len(json.dumps(report.to_dict()).encode())


def _endpoint_rank(e: EndpointHealth) -> tuple[bool, bool, float, str, str]:
    # ejected first, then the ones in use (slowest first), then by name
    return (not e.ejected, e.ewma_ms <= 0, -e.ewma_ms, e.service, e.address)


def _edge_rank(e: TrafficEdge) -> tuple[int, int, str, str]:
    return (-e.connections, -(e.bytes_sent + e.bytes_received), e.source, e.destination)


def fit(report: NodeReport, max_bytes: int = MAX_REPORT_BYTES) -> NodeReport:
    """`report` within every bound: endpoints ejected first, then in use, then
    the rest; edges busiest first; each list cut to its maximum, then both
    shortened from their least useful end until the JSON fits `max_bytes`."""
    endpoints = sorted(report.endpoints, key=_endpoint_rank)[:MAX_ENDPOINTS]
    edges = sorted(report.edges, key=_edge_rank)[:MAX_EDGES]
    out = replace(
        report,
        bpf_programs=report.bpf_programs[:MAX_BPF_PROGRAMS],
        endpoints=tuple(endpoints),
        edges=tuple(edges),
    )
    while report_bytes(out) > max_bytes and (out.endpoints or out.edges):
        out = replace(
            out,
            endpoints=out.endpoints[: len(out.endpoints) * 3 // 4],
            edges=out.edges[: len(out.edges) * 3 // 4],
        )
    return out
