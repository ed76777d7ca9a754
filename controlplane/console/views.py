"""What each console page shows, as plain dicts and lists. Pure: it reads the
registry, the node reports and the CA's roots it is given, at the `now` it is
given, and touches no socket, file or clock (tests fill a report book directly).

Node reports come from the report book (controlplane/reports.py; the report is
core/contracts/report.py). Only fresh reports (not stale) count for endpoint
health and traffic: a stale node's balancer view is history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from meshnode.controlplane.grants import TOKEN_GRANT_PREFIX
from meshnode.controlplane.registry import (
    GRANT_KIND,
    INTERNAL_KINDS,
    REMOTE_ZONE_KIND,
    ZONE_KIND,
    ZONE_SYNC_KIND,
    Registry,
)
from meshnode.controlplane.reports import Received, ReportBook
from meshnode.core.contracts.report import endpoint_address
from meshnode.core.resources import DEFAULT_DNS_DOMAIN, MeshConfig

__all__ = [
    "CERT_WARNING",
    "Root",
    "graph",
    "identities",
    "nodes",
    "overview",
    "policies",
    "services",
    "zones",
]

CERT_WARNING = 24 * 3600.0  # a certificate that ends sooner than this is a problem...
# ...or, for a node certificate of a shorter life, one with less than this share of
# its life left: the agent renews at half-life, so it is late (24 h certificates,
# the default, would otherwise always be "expiring").
RENEWAL_LATE = 0.4


def cert_warning_after(cert_ttl: float) -> float:
    """Seconds left below which a node certificate is a problem."""
    return min(CERT_WARNING, RENEWAL_LATE * cert_ttl)


@dataclass(frozen=True, slots=True)
class Root:
    """A trusted CA root: its pin and when it ends (unix time)."""

    pin: str
    not_after: float


# --- helpers ------------------------------------------------------------------------


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h 10m``, ``2d 4h``; negative: ``-5m`` (in the past)."""
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m"
    if s < 86400:
        return f"{sign}{s // 3600}h {s % 3600 // 60}m"
    return f"{sign}{s // 86400}d {s % 86400 // 3600}h"


def _ago(at: object, now: float) -> str:
    """``42s ago`` for a unix time, ``never`` without one (a time ahead of `now`,
    another replica's clock, counts as now)."""
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "never"
    return f"{age(max(now - at, 0.0))} ago"


def _ingress(ip: object, port: object) -> str:
    """``IP:PORT`` (``[v6]:PORT``) of a zone's ingress; empty without one."""
    if not ip or not isinstance(port, int) or not port:
        return ""
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"{host}:{port}"


def _refusals(lines: Iterable[object]) -> list[dict[str, str]]:
    """What the global left out of a zone's state: ``<ns>/<name>: <reason>`` lines
    (the global's words, text from the wire at a zone) as service and reason."""
    out = []
    for line in lines:
        text = str(line)
        service, sep, reason = text.partition(": ")
        if not sep or not service or " " in service:
            service, reason = "", text
        out.append({"service": service, "reason": reason})
    return out


def _fresh(reports: ReportBook | None, now: float) -> dict[str, Received]:
    if reports is None:
        return {}
    return {n: r for n, r in sorted(reports.all().items()) if not reports.stale(n, now)}


def dns_domain(registry: Registry) -> str:
    """The mesh DNS domain: MeshConfig's ``spec.dns.domain``, else the default."""
    for (kind, _, _), doc in registry.resources.items():
        if kind == MeshConfig.kind:
            domain = doc.get("spec", {}).get("dns", {}).get("domain")
            if isinstance(domain, str) and domain:
                return domain
    return DEFAULT_DNS_DOMAIN


def _identity_labels(registry: Registry, trust_domain: str) -> dict[str, str]:
    """SPIFFE ID -> the services its workloads serve (``ns/name, ...``), for the graph."""
    served: dict[str, set[str]] = {}
    for wl in registry.workloads.values():
        uri = f"spiffe://{trust_domain}/ns/{wl.namespace}/sa/{wl.service_account}"
        if wl.service:
            served.setdefault(uri, set()).add(f"{wl.namespace}/{wl.service}")
        else:
            served.setdefault(uri, set())
    return {uri: ", ".join(sorted(s)) for uri, s in served.items()}


def short_identity(uri: str) -> str:
    """``spiffe://td/ns/x/sa/y`` -> ``x/y``; anything else unchanged."""
    parts = uri.split("/")
    if len(parts) == 7 and parts[3] == "ns" and parts[5] == "sa":
        return f"{parts[4]}/{parts[6]}"
    return uri


# --- pages --------------------------------------------------------------------------


def nodes(
    registry: Registry, reports: ReportBook | None, now: float, cert_ttl: float = CERT_WARNING
) -> list[dict[str, Any]]:
    """One row per registered node, with what its last report said (`cert_ttl`: the
    life of the node certificates the control plane signs, seconds)."""
    rows = []
    for name, rec in sorted(registry.nodes.items()):
        got = reports.get(name) if reports is not None else None
        row: dict[str, Any] = {
            "name": name,
            "zone": rec.zone,
            "address": rec.ip,
            "workloads": len(registry.workloads_of(name)),
            "reported": got is not None,
            "stale": True if reports is None else (got is None or reports.stale(name, now)),
            "agent_version": "",
            "last_report": "never",
            "last_report_seconds": None,
            "config_revision": None,
            "behind": False,
            "cert_expiry": "",
            "cert_seconds_left": None,
            "cert_warning": False,
            "agent_ready": None,
            "ztunnel_ready": None,
            "bpf_programs": [],
            "ejected": 0,
        }
        if got is not None:
            r = got.report
            left = r.cert_not_after - now
            row.update(
                agent_version=r.agent_version,
                last_report=f"{age(now - got.at)} ago",
                last_report_seconds=now - got.at,
                config_revision=r.config_revision,
                behind=r.config_revision < registry.revision,
                cert_expiry=f"in {age(left)}" if left >= 0 else f"expired {age(-left)} ago",
                cert_seconds_left=left,
                cert_warning=left < cert_warning_after(cert_ttl),
                agent_ready=r.agent_ready,
                ztunnel_ready=r.ztunnel_ready,
                bpf_programs=sorted(r.bpf_programs),
                ejected=sum(1 for e in r.endpoints if e.ejected),
            )
        rows.append(row)
    return rows


def services(registry: Registry, reports: ReportBook | None, now: float) -> list[dict[str, Any]]:
    """Every service with its VIP, DNS name and endpoints, each endpoint with its
    health as the fresh reports' balancers see it."""
    domain = dns_domain(registry)
    # (service, address) -> [(node, ejected, ewma_ms)] over fresh reports
    seen: dict[tuple[str, str], list[tuple[str, bool, float]]] = {}
    for node, got in _fresh(reports, now).items():
        for e in got.report.endpoints:
            seen.setdefault((e.service, e.address), []).append((node, e.ejected, e.ewma_ms))
    out = []
    for (ns, name), doc in registry.service_docs().items():
        key = f"{ns}/{name}"
        endpoints = []
        for ep in doc.endpoints:
            address = endpoint_address(ep.address, ep.port)
            views = seen.get((key, address), [])
            ejected_by = sorted(n for n, ejected, _ in views if ejected)
            ewmas = [ms for _, _, ms in views if math.isfinite(ms) and ms >= 0]
            if reports is None:
                health, state = "no reports yet", "unknown"
            elif not views:
                health, state = "no balancer has reported it", "unknown"
            elif ejected_by:
                health = f"ejected by {len(ejected_by)} of {len(views)} reporting nodes"
                state = "ejected"
            else:
                health, state = f"healthy on {len(views)} reporting nodes", "healthy"
            endpoints.append(
                {
                    "workload": ep.workload,
                    "node": ep.node,
                    "zone": ep.zone,
                    "address": address,
                    "version": ep.version,
                    "identity": f"{ep.namespace}/{ep.service_account}",
                    "health": health,
                    "state": state,
                    "ejected_by": ejected_by,
                    "reporting": len(views),
                    "ewma_ms": round(sum(ewmas) / len(ewmas), 2) if ewmas else None,
                }
            )
        out.append(
            {
                "key": key,
                "name": name,
                "namespace": ns,
                "vip": doc.vip,
                "ports": [p.port for p in doc.ports],
                "dns": f"{name}.{ns}.{domain}" if domain else "",
                "endpoints": endpoints,
                "ejected": sum(1 for e in endpoints if e["state"] == "ejected"),
                "remote": [
                    {
                        "zone": r.zone,
                        "ingress": _ingress(r.ingress_ip, r.ingress_port),
                        "identity": f"{r.namespace}/{r.service_account}",
                        "port": r.port,
                        "endpoints": r.endpoints,
                    }
                    for r in doc.remote
                ],
            }
        )
    return out


def identities(registry: Registry, trust_domain: str) -> dict[str, Any]:
    """Identity grants (from resources and from join tokens), and every identity in
    use with the nodes hosting it and the grant that allows each."""
    grants = []
    for name, g in sorted(registry.grants.grants.items()):
        grants.append(
            {
                "name": name,
                "source": "join token" if name.startswith(TOKEN_GRANT_PREFIX) else "IdentityGrant",
                "nodes": list(g.nodes),
                "zones": list(g.zones),
                "identities": list(g.identities),
            }
        )
    used: dict[tuple[str, str], dict[str, Any]] = {}
    for (node, _), wl in sorted(registry.workloads.items()):
        ident = used.setdefault(
            (wl.namespace, wl.service_account),
            {
                "identity": f"{wl.namespace}/{wl.service_account}",
                "spiffe": f"spiffe://{trust_domain}/ns/{wl.namespace}/sa/{wl.service_account}",
                "hosts": [],
            },
        )
        decision = registry.granted(node, wl.namespace, wl.service_account)
        ident["hosts"].append(
            {
                "node": node,
                "workload": wl.name,
                "service": f"{wl.namespace}/{wl.service}" if wl.service else "",
                "granted": decision.allowed,
                "grant": decision.grant or "",
            }
        )
    return {"grants": grants, "identities": [used[k] for k in sorted(used)]}


def policies(registry: Registry) -> list[dict[str, Any]]:
    """The applied resources other than identity grants, each as YAML (escaped by
    the template, like every value). The control plane's internal rows (multi-zone
    state) are not applied resources: the Zones page shows them."""
    out = []
    for (kind, ns, name), doc in sorted(registry.resources.items()):
        if kind == GRANT_KIND or kind in INTERNAL_KINDS:
            continue
        out.append(
            {
                "kind": kind,
                "namespace": ns,
                "name": name,
                "yaml": yaml.safe_dump(doc, sort_keys=False, default_flow_style=False),
            }
        )
    return out


def graph(
    registry: Registry, reports: ReportBook | None, now: float, trust_domain: str
) -> dict[str, Any]:
    """Who talks to whom, from the fresh reports' traffic counters: one edge per
    (source, destination) identity pair, summed over the reporting nodes (each
    connection is counted once, on the caller's node), mTLS only when every report
    of it says so; and a circle layout for the SVG."""
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    for node, got in _fresh(reports, now).items():
        for e in got.report.edges:
            key = (e.source, e.destination)
            edge = edges.setdefault(
                key, {"connections": 0, "rate": 0.0, "mtls": True, "reporters": []}
            )
            edge["connections"] += e.connections
            edge["rate"] += float(got.rates.get(key, 0.0))
            edge["mtls"] = edge["mtls"] and e.mtls
            edge["reporters"].append(node)
    labels = _identity_labels(registry, trust_domain)
    ids = sorted({i for pair in edges for i in pair})
    positions = _circle(len(ids))
    vertex: dict[str, dict[str, Any]] = {}
    for uri, (x, y) in zip(ids, positions, strict=True):
        vertex[uri] = {
            "id": uri,
            "identity": short_identity(uri),
            "services": labels.get(uri, ""),
            "label": labels.get(uri) or short_identity(uri),
            "x": x,
            "y": y,
        }
    rows = []
    for (src, dst), summed in sorted(edges.items()):
        a, b = vertex[src], vertex[dst]
        rows.append(
            {
                "source": a["label"],
                "destination": b["label"],
                "source_id": src,
                "destination_id": dst,
                "mtls": summed["mtls"],
                "connections": summed["connections"],
                "rate": round(summed["rate"], 2),
                "reporters": sorted(summed["reporters"]),
                **_segment(a["x"], a["y"], b["x"], b["y"]),
            }
        )
    return {"vertices": [vertex[i] for i in ids], "edges": rows, "size": SVG_SIZE}


def zones(
    registry: Registry,
    mode: str,
    zone: str,
    status: dict[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    """The zones page (docs/multizone.md), by the control plane's `mode`:

    - ``global``: one row per enrolled zone (``Zone`` rows): its ingress, how many
      services the global publishes of it (those granted to the zone), the
      generation and age of the state it last published, and what was left out
      and why;
    - ``zone``: how this zone's sync with the global stands (the ``ZoneSync`` row,
      and `status`, this replica's ``ZoneSync.status.to_json()``, None when it
      has no sync running), and one row per other zone (``RemoteZone`` rows);
    - anything else (``single``): nothing but the mode.
    """
    if mode == "global":
        states = registry.zone_states()
        rows = []
        for name, spec in registry.internal(ZONE_KIND).items():
            state, refused = states.get(name, (None, []))
            rows.append(
                {
                    "zone": name,
                    "ingress": _ingress(state.ingress_ip, state.ingress_port) if state else "",
                    "published": state is not None,
                    "services": len(state.services) if state else 0,
                    "generation": state.generation if state else None,
                    "enrolled": _ago(spec.get("enrolled_at"), now),
                    "last_sync": _ago(spec.get("received_at"), now),
                    "refused": _refusals(refused),
                }
            )
        return {"mode": "global", "zone": "", "rows": rows, "sync": None}
    if mode == "zone":
        synced = registry.internal(ZONE_SYNC_KIND).get("global", {})
        revision = synced.get("revision")
        sync: dict[str, Any] = {
            "running": status is not None,
            "connected": bool(status.get("connected")) if status is not None else None,
            "last_contact": _ago(status.get("last_contact"), now) if status else "never",
            "last_error": str(status.get("last_error") or "") if status else "",
            "published_generation": status.get("published_generation") if status else None,
            "refused": _refusals(status.get("refused") or ()) if status else [],
            "global": str(synced.get("global") or ""),
            "revision": revision if isinstance(revision, int) else None,
            "synced_at": _ago(synced.get("synced_at"), now),
        }
        rows = []
        for name, spec in registry.internal(REMOTE_ZONE_KIND).items():
            services = spec.get("services")
            rows.append(
                {
                    "zone": name,
                    "ingress": _ingress(spec.get("ingress_ip"), spec.get("ingress_port")),
                    "services": len(services) if isinstance(services, list) else 0,
                    "generation": spec.get("generation"),
                }
            )
        return {"mode": "zone", "zone": zone, "rows": rows, "sync": sync}
    return {"mode": "single", "zone": "", "rows": [], "sync": None}


SVG_SIZE = 640
_RADIUS = 230
_VERTEX_R = 26


def _circle(n: int) -> list[tuple[float, float]]:
    c = SVG_SIZE / 2
    if n == 1:
        return [(c, c)]
    return [
        (
            round(c + _RADIUS * math.cos(2 * math.pi * i / n - math.pi / 2), 1),
            round(c + _RADIUS * math.sin(2 * math.pi * i / n - math.pi / 2), 1),
        )
        for i in range(n)
    ]


def _segment(x1: float, y1: float, x2: float, y2: float) -> dict[str, float]:
    """A line from circle to circle (not centre to centre), its midpoint for the
    label; a self-edge becomes a short loop above the vertex."""
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy)
    if length < 1e-6:
        return {
            "x1": x1 - 10,
            "y1": y1 - _VERTEX_R,
            "x2": x1 + 10,
            "y2": y1 - _VERTEX_R,
            "mx": x1,
            "my": y1 - _VERTEX_R - 22,
            "loop": 1,
        }
    ux, uy = dx / length, dy / length
    ax, ay = x1 + ux * _VERTEX_R, y1 + uy * _VERTEX_R
    bx, by = x2 - ux * (_VERTEX_R + 6), y2 - uy * (_VERTEX_R + 6)
    return {
        "x1": round(ax, 1),
        "y1": round(ay, 1),
        "x2": round(bx, 1),
        "y2": round(by, 1),
        "mx": round((ax + bx) / 2, 1),
        "my": round((ay + by) / 2 - 6, 1),
        "loop": 0,
    }


def overview(
    registry: Registry,
    reports: ReportBook | None,
    now: float,
    roots: Iterable[Root],
    trust_domain: str,
    cert_ttl: float = CERT_WARNING,
) -> dict[str, Any]:
    """Counts, and what is wrong now (each item says what and where)."""
    node_rows = nodes(registry, reports, now, cert_ttl)
    svc_rows = services(registry, reports, now)
    problems: list[dict[str, str]] = []
    if reports is None:
        problems.append(
            {
                "what": "no node reports",
                "detail": "this control plane does not receive node reports yet: "
                "node health, endpoint health and the graph are empty",
                "link": "nodes",
            }
        )
    for n in node_rows if reports is not None else ():
        if not n["reported"]:
            problems.append(
                {
                    "what": f"node {n['name']} has never reported",
                    "detail": "its agent is not running or cannot reach the control plane",
                    "link": "nodes",
                }
            )
        elif n["stale"]:
            problems.append(
                {
                    "what": f"node {n['name']} is stale",
                    "detail": f"last report {n['last_report']}",
                    "link": "nodes",
                }
            )
        if n["reported"] and n["cert_warning"]:
            problems.append(
                {
                    "what": f"certificate of node {n['name']} expires {n['cert_expiry']}"
                    if n["cert_seconds_left"] >= 0
                    else f"certificate of node {n['name']} {n['cert_expiry']}",
                    "detail": "the agent renews at half-life: is it running and enrolled?",
                    "link": "nodes",
                }
            )
        if n["reported"] and not n["stale"]:
            for part in ("agent", "ztunnel"):
                if n[f"{part}_ready"] is False:
                    problems.append(
                        {
                            "what": f"{part} on node {n['name']} is not ready",
                            "detail": f"see `meshnode status` on {n['name']}",
                            "link": "nodes",
                        }
                    )
    for s in svc_rows:
        for e in s["endpoints"]:
            if e["state"] == "ejected":
                problems.append(
                    {
                        "what": f"endpoint {e['address']} ({e['workload']} on {e['node']}) "
                        f"of {s['key']}",
                        "detail": e["health"],
                        "link": "services",
                    }
                )
    for root in roots:
        left = root.not_after - now
        if left < CERT_WARNING:
            problems.append(
                {
                    "what": f"CA root {root.pin[:23]}... expires in {age(left)}",
                    "detail": "rotate the CA: meshnode ca rotate",
                    "link": "overview",
                }
            )
    fresh = _fresh(reports, now)
    edges = graph(registry, reports, now, trust_domain)["edges"]
    counts = {
        "nodes": len(registry.nodes),
        "reporting": len(fresh),
        "stale": sum(1 for n in node_rows if n["stale"]) if reports is not None else 0,
        "services": len(svc_rows),
        "endpoints": sum(len(s["endpoints"]) for s in svc_rows),
        "ejected": sum(s["ejected"] for s in svc_rows),
        "workloads": len(registry.workloads),
        "identities": len({(w.namespace, w.service_account) for w in registry.workloads.values()}),
        "grants": len(registry.grants.grants),
        "policies": len(policies(registry)),
        "edges": len(edges),
        "plaintext_edges": sum(1 for e in edges if not e["mtls"]),
    }
    return {"counts": counts, "problems": problems, "revision": registry.revision}
